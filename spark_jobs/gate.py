"""The publish gate: is a newly trained model good enough to serve?

Pure and deterministic, so the rule can be tested with known numbers. With `m` the gate
metric (`settings.gate.metric`, e.g. `ndcg@10`), a new model is accepted when

    new[m] >= popularity[m] * (1 + min_lift_over_popularity)      (beats the baseline)
    new[m] >= current[m] * (1 - max_regression)                   (no big regression;
                                                                   skipped with no current)
    new[m] > 0 and finite

`force=True` accepts anyway and says what the gate would have decided.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lake.config import GateSettings


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _metric(metrics: Mapping[str, Any] | None, name: str) -> float | None:
    if metrics is None or name not in metrics or metrics[name] is None:
        return None
    try:
        return float(metrics[name])
    except (TypeError, ValueError):
        return None


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _evaluate(
    new: Mapping[str, Any],
    popularity: Mapping[str, Any] | None,
    current: Mapping[str, Any] | None,
    gate: GateSettings,
) -> Decision:
    m = gate.metric
    v = _metric(new, m)
    if v is None:
        return Decision(False, f"new model has no {m} metric")
    if not math.isfinite(v):
        return Decision(False, f"new model {m} is not finite ({v})")
    if v <= 0:
        return Decision(False, f"new model {m} = {_fmt(v)} is not above 0")
    checks: list[str] = []
    pop = _metric(popularity, m)
    if pop is None:
        return Decision(False, f"popularity baseline has no {m} metric to compare against")
    need = pop * (1.0 + gate.min_lift_over_popularity)
    if not v >= need:
        return Decision(
            False,
            f"{m} {_fmt(v)} < popularity {_fmt(pop)} x (1 + {gate.min_lift_over_popularity:g})"
            f" = {_fmt(need)}",
        )
    checks.append(f"{m} {_fmt(v)} >= popularity {_fmt(pop)} x "
                  f"(1 + {gate.min_lift_over_popularity:g}) = {_fmt(need)}")
    cur = _metric(current, m)
    if current is not None and cur is not None and math.isfinite(cur):
        floor = cur * (1.0 - gate.max_regression)
        if not v >= floor:
            return Decision(
                False,
                f"{m} {_fmt(v)} < current {_fmt(cur)} x (1 - {gate.max_regression:g})"
                f" = {_fmt(floor)}",
            )
        checks.append(f">= current {_fmt(cur)} x (1 - {gate.max_regression:g}) = {_fmt(floor)}")
    else:
        checks.append("no current model to compare with")
    return Decision(True, "; ".join(checks))


def decide(
    new_metrics: Mapping[str, Any],
    popularity_metrics: Mapping[str, Any] | None,
    current_metrics: Mapping[str, Any] | None,
    gate: GateSettings,
    force: bool = False,
) -> Decision:
    """Decide whether the new model may be published.

    Args:
        new_metrics: metric name -> value for the new model (e.g. `{"ndcg@10": 0.31}`).
        popularity_metrics: the same for the popularity baseline on the same test set.
        current_metrics: the same for the model being served, or None when there is none.
        gate: thresholds (`settings.gate`).
        force: accept regardless (the reason records what the gate would have said).

    Returns:
        `Decision(accepted, reason)`; the reason names the numbers compared.
    """
    d = _evaluate(new_metrics, popularity_metrics, current_metrics, gate)
    if force:
        verdict = "would pass" if d.accepted else "would fail"
        return Decision(True, f"forced ({verdict}: {d.reason})")
    return d
