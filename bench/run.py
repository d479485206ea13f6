"""`make bench`: run the benchmark sections into one report.

    python -m bench.run [--only ann,online,ingest,flood,freshness,fleet,training,accuracy,
                               scaling,experiments]
                        [--quick] [--big-training] [--big-scaling]

Every figure is printed as one JSON line (`bench.report.Report.add`) next to a reference
measured in the same run; the report (markdown + PNGs) goes to
`bench/results/<timestamp>/report.md`. `--quick` runs small sizes of everything in a few
minutes; the full run takes about half an hour on 2 cores (the first one longer: it
builds and caches the 1M-item HNSW bundle under var/bench/). `--big-training` adds the
10M-interaction synthetic training comparison, `--big-scaling` the 20M-event pipeline run
(both long on 2 cores: opt-in).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # the reference measurements run single-threaded too

from bench.report import Report  # noqa: E402

SECTIONS = ("online", "ingest", "flood", "freshness", "fleet", "training", "accuracy", "ann",
            "scaling", "experiments")


def _sections(quick: bool, big_training: bool,
              big_scaling: bool = False) -> dict[str, Callable[[Report], Any]]:
    def online(r: Report) -> Any:
        from bench import online

        if quick:
            return online.run(r, sizes=(20_000, 100_000), n_users=20_000,
                              concurrency=(1, 8), duration=2.0, max_requests=5000,
                              n_new_users=300, n_known_with_events=300, n_requests=1500)
        return online.run(r)

    def ingest(r: Report) -> Any:
        from bench import ingest

        if quick:
            return ingest.run(r, total_events=10_000, n_items=20_000, n_users=20_000)
        return ingest.run(r)

    def flood(r: Report) -> Any:
        from bench import flood

        if quick:
            return flood.run(r, clients=2, batches=3, before_s=2.0)
        return flood.run(r)

    def freshness(r: Report) -> Any:
        from bench import freshness

        if quick:
            return freshness.run(r, n_items=20_000, n_users=20_000, trials=40)
        return freshness.run(r)

    def fleet(r: Report) -> Any:
        from bench import fleet

        if quick:
            return fleet.run(r, n_items=20_000, n_users=20_000, trials=40, concurrency=(1, 8),
                             duration=2.0, max_requests=5000, n_requests=1500)
        return fleet.run(r)

    def training(r: Report) -> Any:
        from bench import training

        if quick:
            return training.run(r, datasets=("ml-100k",), mllib_iterations=2)
        return training.run(r, datasets=("ml-1m",) + (("synthetic-10m",) if big_training
                                                       else ()))

    def accuracy(r: Report) -> Any:
        from bench import accuracy

        return accuracy.run(r, datasets=("ml-100k",) if quick else ("ml-100k", "ml-1m"))

    def ann(r: Report) -> Any:
        from bench import ann

        if quick:
            return ann.run(r, sizes=(20_000,), n_queries=200)
        return ann.run(r, sizes=(20_000, 100_000, 1_000_000))

    def scaling(r: Report) -> Any:
        from bench import scaling

        sizes = ("200k",) if quick else ("200k", "2m") + (("20m",) if big_scaling else ())
        return scaling.run(r, sizes=sizes)

    def experiments(r: Report) -> Any:
        from bench import experiments

        if quick:
            return experiments.run(r, aa_runs=100, ab_runs=40, server_runs=(60, 15))
        return experiments.run(r, aa_runs=400, ab_runs=200, server_runs=(300, 60))

    return {"online": online, "ingest": ingest, "flood": flood, "freshness": freshness,
            "fleet": fleet, "training": training, "accuracy": accuracy, "ann": ann,
            "scaling": scaling, "experiments": experiments}


def run_sections(funcs: dict[str, Callable[[Report], Any]], report: Report
                 ) -> tuple[list[tuple[str, float]], list[str]]:
    """Run each section in order; one that raises is reported as FAILED (its traceback on
    stderr, a note in the report) and the others still run. Returns (timings, failed)."""
    timings: list[tuple[str, float]] = []
    failed: list[str] = []
    for name, func in funcs.items():
        print(f"[bench] section {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            func(report)
        except Exception as exc:  # noqa: BLE001 - one failed section must not lose the rest
            traceback.print_exc()
            failed.append(name)
            report.note(f"Section {name} FAILED", f"```\n{type(exc).__name__}: {exc}\n```")
            outcome = f"FAILED ({type(exc).__name__}: {exc})"
        else:
            outcome = "done"
        took = time.perf_counter() - t0
        timings.append((name, took))
        print(f"[bench] section {name} {outcome} in {took:.0f} s", file=sys.stderr, flush=True)
    return timings, failed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections, from {','.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    p.add_argument("--big-training", action="store_true",
                   help="also train on 10M synthetic interactions (slow on 2 cores)")
    p.add_argument("--big-scaling", action="store_true",
                   help="scaling section: also run the pipeline on 20M events (slow)")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    report = Report()
    funcs = _sections(args.quick, args.big_training, args.big_scaling)
    timings, failed = run_sections({n: funcs[n] for n in SECTIONS if n in chosen}, report)
    report.note("Run", "\n".join(
        [f"- mode: {'quick' if args.quick else 'full'}; sections: {', '.join(chosen)}"]
        + [f"- {n}: {t:.0f} s" for n, t in timings]
        + ([f"- FAILED: {', '.join(failed)}"] if failed else [])))
    path = report.write()
    print(f"[bench] report: {path}", file=sys.stderr, flush=True)
    if failed:
        print(f"[bench] FAILED: {', '.join(failed)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
