"""The experiments report: per experiment its arms, intervals, SRM and decision, and plots
of each arm's metric and the lift over time, from `experiment_results`.

Written by the `lambdarec_experiments` DAG after the analysis, as
`<model.dir>/reports/experiments/<as_of>/report.md` with one PNG per experiment (the
retrain report's layout: `spark_jobs.report_plots`). Every figure names the experiment
in its title, so a PNG opened on its own still says what it shows.

    python -m spark_jobs.experiment_report --as-of 2026-11-21
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lake.config import Settings
from spark_jobs.cli import job_parser, parse_date, run_main, settings_from_args

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def report_dir(models_dir: Path, as_of: date) -> Path:
    """Where the report of `as_of` goes."""
    return Path(models_dir) / "reports" / "experiments" / as_of.isoformat()


def over_time(rows: Sequence[dict[str, Any]], metric: str, *, experiment: str) -> Figure:
    """Left: each arm's `metric` per analysis date with its interval (a band); right: each
    treatment's relative lift vs the control with its interval, and the zero line."""
    from matplotlib.figure import Figure

    # outside pyplot, as spark_jobs.report_plots draws: no global registry, no GUI backend
    fig = Figure(figsize=(12, 3.9))
    left, right = fig.subplots(1, 2)
    mine = sorted((r for r in rows if r["metric"] == metric), key=lambda r: r["as_of"])
    arms = list(dict.fromkeys(r["arm"] for r in mine))
    control = mine[0]["control_arm"] if mine else ""
    for arm in arms:
        pts = [r for r in mine if r["arm"] == arm and r["value"] is not None]
        x = [r["as_of"] for r in pts]
        line = left.plot(x, [r["value"] for r in pts], marker="o", label=arm)[0]
        lo = [_nan(r["ci_lower"]) for r in pts]
        hi = [_nan(r["ci_upper"]) for r in pts]
        left.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
        if arm == control:
            continue
        lifts = [r for r in pts if r["rel_lift"] is not None]
        lx = [r["as_of"] for r in lifts]
        color = line.get_color()  # the arm's colour on both panels
        right.plot(lx, [100 * r["rel_lift"] for r in lifts], marker="o", color=color,
                   label=f"{arm} vs {control}")
        right.fill_between(lx, [100 * _nan(r["rel_lift_ci_lower"]) for r in lifts],
                           [100 * _nan(r["rel_lift_ci_upper"]) for r in lifts], alpha=0.2,
                           color=color)
    right.axhline(0, color="black", linewidth=1)
    left.set_title(f"{metric} per arm (interval band)")
    right.set_title(f"relative lift of {metric}, % (interval band)")
    for ax in (left, right):
        ax.set_xlabel("analysis date (as of)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"experiment {experiment}: {metric} over time")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.22, top=0.84, wspace=0.2)
    return fig


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.2f}%" if pct else f"{v:.4g}"


def markdown(rows: Sequence[dict[str, Any]], as_of: date) -> str:
    """One experiment's section of the report for `as_of` (its rows of that date)."""
    today = [r for r in rows if r["as_of"] == as_of]
    first = today[0]
    lines = [
        f"## {first['experiment_name'] or first['experiment_id']} (`{first['experiment_id']}`)",
        "",
        f"- status: **{first['status']}**"
        + (f", decided on {first['decided_on']}" if first["decided_on"] else "")
        + f"; decision metric `{first['decision_metric']}`",
        f"- sample ratio mismatch p-value: {_fmt(first['srm_pvalue'])}"
        + (" — **assignment or logging is broken: no decision**"
           if first["status"] == "invalid" else ""),
        f"- data: {first['data_start']} to {first['data_end']}",
        "",
        "| arm | share | users | impressions | metric | value | interval | lift vs "
        f"{first['control_arm']} | lift interval | p-value | decision |",
        "|---|---:|---:|---:|---|---:|---|---:|---|---:|---|",
    ]
    for r in today:
        interval = f"[{_fmt(r['ci_lower'])}, {_fmt(r['ci_upper'])}]"
        lift_ci = "-" if r["rel_lift"] is None else \
            f"[{_fmt(r['rel_lift_ci_lower'], True)}, {_fmt(r['rel_lift_ci_upper'], True)}]"
        lines.append(
            f"| {r['arm']} | {r['share']:.3g} | {r['users']} | {r['impressions']} | "
            f"{r['metric']} | {_fmt(r['value'])} | {interval} | {_fmt(r['rel_lift'], True)} "
            f"| {lift_ci} | {_fmt(r['pvalue'])} | {r['decision'] or '-'} |")
    cap = next((r["winsor_cap"] for r in today if r["winsor_cap"] is not None), None)
    if cap is not None:
        lines += ["", f"Winsorised revenue caps each user's revenue at {cap:.4g}."]
    return "\n".join(lines)


def write_report(settings: Settings, as_of: date, *, days: int = 90) -> dict[str, Any]:
    """Write the report of the experiments analysed on `as_of` (plots: the last `days`).

    Returns:
        `{"job", "as_of", "report", "experiments", "plots"}`.
    """
    import pyarrow.dataset as ds

    from lake.tables import Lake
    from spark_jobs.report_plots import save

    lake = Lake.from_settings(settings.lake)
    out_dir = report_dir(settings.model.dir, as_of)
    results = lake.read("experiment_results", filters=(ds.field("as_of") <= as_of)
                        & (ds.field("as_of") >= as_of - timedelta(days=days))).to_pylist() \
        if lake.exists("experiment_results") else []
    ids = sorted({r["experiment_id"] for r in results if r["as_of"] == as_of})
    parts = [f"# Experiments as of {as_of}", "",
             "Per-user analysis (`spark_jobs.experiment_analysis`): intervals at "
             f"{100 * (1 - settings.experiments.alpha):g}%, lift vs the control arm, fixed "
             f"horizon of {settings.experiments.min_users_per_arm} users per arm."]
    if not ids:
        parts += ["", "No experiment ran on this day."]
    plots = []
    for exp_id in ids:
        rows = [r for r in results if r["experiment_id"] == exp_id]
        metric = rows[0]["decision_metric"]
        metric = "revenue_per_user_winsorised" if metric == "revenue_per_user" else metric
        png = save(over_time(rows, metric, experiment=exp_id), out_dir / f"{exp_id}.png")
        plots.append(str(png))
        parts += ["", markdown(rows, as_of), "", f"![{metric} over time]({png.name})"]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return {"job": "experiment_report", "as_of": as_of, "report": str(path),
            "experiments": len(ids), "plots": plots}


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spark_jobs.experiment_report",
                        "Write the experiments report of a date from experiment_results.")
    parser.add_argument("--as-of", dest="as_of", type=parse_date, required=True,
                        help="the analysis date to report")

    def body(args: Any) -> dict[str, Any]:
        return write_report(settings_from_args(args), args.as_of)

    return run_main(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
