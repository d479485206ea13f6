"""Accuracy: the batch pipeline's own evaluation (ALS vs popularity vs EASE on the same
split and users) on MovieLens, when the data directory is present."""

from __future__ import annotations

from typing import Any

from bench.datasets import data_available, pipeline_for
from bench.report import Report

KS = (10, 20)
METRICS = ("ndcg", "recall", "map")


def run(report: Report, *, datasets: tuple[str, ...] = ("ml-100k", "ml-1m")) -> dict[str, Any]:
    rows, skipped, out = [], [], {}
    for data in datasets:
        if not data_available(data):
            skipped.append(data)
            continue
        run_ = pipeline_for(data)
        s = run_["summary"]
        models = s["metrics"]
        als = models.get("als", {})
        for base in ("popularity", "ease"):
            if base not in models:
                continue
            for m in ("ndcg@10", "recall@20"):
                if m in als and m in models[base]:
                    report.add(f"accuracy.{data}.als.{m}", als[m], m, f"{base} {m}",
                               models[base][m])
        for name, mm in models.items():
            if isinstance(mm, dict):
                rows.append((data, name, *[mm.get(f"{m}@{k}", float("nan"))
                                           for m in METRICS for k in KS]))
        out[data] = {"metrics": models, "split": s.get("split"),
                     "n_test_users": s.get("n_test_users"), "accepted": s.get("accepted"),
                     "status": s.get("status"), "reason": s.get("reason")}
    head = " | ".join(f"{m}@{k}" for m in METRICS for k in KS)
    md = ["`spark_jobs.pipeline` end to end (load, compact, interactions, train, evaluate, "
          "gate, publish); evaluation split per dataset: "
          + ", ".join(f"{d}: {v['split']} ({v['n_test_users']} test users; gate: {v['status']} "
                      f"- {v['reason']})" for d, v in out.items()), "",
          f"| data | model | {head} |", "|---|---|" + "---:|" * (len(METRICS) * len(KS))]
    md += [f"| {r[0]} | {r[1]} | " + " | ".join(f"{x:.4f}" for x in r[2:]) + " |" for r in rows]
    if skipped:
        md += ["", f"Skipped (data directory missing): {', '.join(skipped)}."]
    report.note("Accuracy: ALS vs popularity and EASE", "\n".join(md))
    return out
