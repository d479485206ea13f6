"""The evaluation a bundle records, as the structured fields of `Admin.ModelInfo`.

A bundle's manifest keeps the evaluation's `metrics.json` (`spark_jobs.staging`):
`models` (the served model under `als`, each baseline under its name), `intervals`
(`confidence`, `models.<name>.<metric>: [low, high]`) and `n_test_users`. Bundles written
before that shape (and hand-made test bundles) hold a flat `{metric: value}` mapping,
read as the served model's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from online.pb import admin_pb2

SERVED = "als"
"""Key of the trained model in the evaluation's `models` (`spark_jobs.evaluate.MODEL_KEY`)."""


def _metrics(values: Mapping[str, Any], intervals: Mapping[str, Any]
             ) -> dict[str, admin_pb2.Metric]:
    out = {}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            continue
        m = admin_pb2.Metric(value=float(value))
        ci = intervals.get(name)
        if isinstance(ci, list | tuple) and len(ci) == 2:
            m.interval_low, m.interval_high = float(ci[0]), float(ci[1])
        out[str(name)] = m
    return out


def evaluation_fields(evaluation: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments of `ModelInfoResponse`: `metrics`, `baselines`,
    `interval_confidence`, `n_test_users` (empty when the bundle recorded no evaluation)."""
    if not evaluation:
        return {}
    models = evaluation.get("models")
    if not isinstance(models, Mapping):  # the flat shape: the served model's metrics only
        return {"metrics": _metrics(evaluation, {})}
    intervals = evaluation.get("intervals") or {}
    per_model = intervals.get("models") or {}
    fields: dict[str, Any] = {
        "metrics": _metrics(models.get(SERVED) or {}, per_model.get(SERVED) or {}),
        "baselines": {name: admin_pb2.Metrics(metrics=_metrics(m, per_model.get(name) or {}))
                      for name, m in models.items()
                      if name != SERVED and isinstance(m, Mapping)},
        "n_test_users": int(evaluation.get("n_test_users") or 0),
    }
    if per_model:
        fields["interval_confidence"] = float(intervals.get("confidence") or 0.0)
    return fields
