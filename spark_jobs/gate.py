"""The publish gate: is a newly trained model good enough to serve?

Pure and deterministic, so the rule can be tested with known numbers. With `m` the gate
metric (`settings.gate.metric`, e.g. `ndcg@10`), a new model is accepted when

    new[m] >= popularity[m] * (1 + min_lift_over_popularity)      (beats the baseline)
    new[m] >= current[m] * (1 - max_regression)                   (no big regression;
                                                                   skipped with no current)
    new[m] > 0 and finite

and, when the evaluation supplies its evidence (`metrics.json`: `n_test_users`,
`min_test_users`, `intervals.vs_popularity`), two checks against noise:

    n_test_users >= min_test_users                 (else: too small a test set to decide)
    lower bound of the paired interval of (new - popularity)[m] > 0   (a real lift)

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


def popularity_bar(popularity_value: float, min_lift: float) -> float:
    """The value a new model must reach on the gate metric: popularity x (1 + min_lift)."""
    return popularity_value * (1.0 + min_lift)


def _metric(metrics: Mapping[str, Any] | None, name: str) -> float | None:
    if metrics is None or name not in metrics or metrics[name] is None:
        return None
    try:
        return float(metrics[name])
    except (TypeError, ValueError):
        return None


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _noise_checks(evidence: Mapping[str, Any], m: str) -> tuple[str | None, list[str]]:
    """(rejection reason or None, passed checks) from the evaluation's evidence."""
    passed: list[str] = []
    n, need = evidence.get("n_test_users"), evidence.get("min_test_users")
    if n is not None and need is not None:
        if int(n) < int(need):
            return (f"test set too small to decide: {n} test users < evaluate.min_test_users "
                    f"= {need}"), passed
        passed.append(f"{n} test users >= {need}")
    ci = (evidence.get("intervals") or {})
    diff = (ci.get("vs_popularity") or {}).get(m)
    if diff:
        lo, hi = diff["ci"]
        level = f"{100 * float(ci.get('confidence', 0.95)):g}%"
        if not lo > 0:
            return (f"{m} lift over popularity {diff['diff']:+.4f} is within noise: paired "
                    f"{level} interval [{lo:+.4f}, {hi:+.4f}] includes 0"), passed
        passed.append(f"lift {diff['diff']:+.4f}, paired {level} interval "
                      f"[{lo:+.4f}, {hi:+.4f}] above 0")
    return None, passed


def _evaluate(
    new: Mapping[str, Any],
    popularity: Mapping[str, Any] | None,
    current: Mapping[str, Any] | None,
    gate: GateSettings,
    evidence: Mapping[str, Any] | None = None,
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
    need = popularity_bar(pop, gate.min_lift_over_popularity)
    if not v >= need:
        return Decision(
            False,
            f"{m} {_fmt(v)} < popularity {_fmt(pop)} x (1 + {gate.min_lift_over_popularity:g})"
            f" = {_fmt(need)}",
        )
    checks.append(f"{m} {_fmt(v)} >= popularity {_fmt(pop)} x "
                  f"(1 + {gate.min_lift_over_popularity:g}) = {_fmt(need)}")
    if evidence:
        why, passed = _noise_checks(evidence, m)
        if why is not None:
            return Decision(False, why)
        checks += passed
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
    evidence: Mapping[str, Any] | None = None,
) -> Decision:
    """Decide whether the new model may be published.

    Args:
        new_metrics: metric name -> value for the new model (e.g. `{"ndcg@10": 0.31}`).
        popularity_metrics: the same for the popularity baseline on the same test set.
        current_metrics: the same for the model being served, or None when there is none.
        gate: thresholds (`settings.gate`).
        force: accept regardless (the reason records what the gate would have said).
        evidence: the evaluation's `metrics.json` (test-set size and intervals), if any.

    Returns:
        `Decision(accepted, reason)`; the reason names the numbers compared.
    """
    d = _evaluate(new_metrics, popularity_metrics, current_metrics, gate, evidence)
    if force:
        verdict = "would pass" if d.accepted else "would fail"
        return Decision(True, f"forced ({verdict}: {d.reason})")
    return d
