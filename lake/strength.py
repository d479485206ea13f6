"""Event strength: the one definition of how much an event says about a user's taste.

The batch jobs (gold interactions in Spark, the tuning search and the evaluation in NumPy)
and the online state all call this module, so a user folded in online gets exactly the
strengths the trainer saw:

    strength(e) = weight[type_e] * transform[type_e](value_e) * 0.5 ** (age_e / half_life)
    age_e       = reference_u - ts_e   (days; reference_u = the user's latest event)
    r(u, i)     = min(max_confidence, sum of strength(e) over u's events on i)

* `transform` turns the event's `value` (rating, play count, quantity) into a factor:
  `none` (1), `linear` (value) or `log1p` (log(1 + value) / log 2). Each maps a missing
  value to 1, so a plain view counts `weight[type]` under every transform; a value <= 0
  counts 0.
* Decay is measured from the **user's own latest event**, not from the wall clock or the
  as-of date: a user's recent items weigh more than their old ones, but a backfilled or
  replayed history, or a user who paused for months, is not decayed to nothing. Both
  layers can compute it from the events alone. `half_life_days=None` disables decay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Transform = Literal["none", "linear", "log1p"]
TRANSFORMS: tuple[str, ...] = ("none", "linear", "log1p")
SECONDS_PER_DAY = 86_400.0
Batch = TypeVar("Batch", pa.RecordBatch, pa.Table)
_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class StrengthParams:
    weights: Mapping[str, float]
    """Weight per event type; types absent or weighted 0 carry no signal."""
    transforms: Mapping[str, str] = field(default_factory=dict)
    """Value transform per event type (`none` when absent)."""
    half_life_days: float | None = None
    """Decay half-life measured from the user's latest event; None = no decay."""
    max_confidence: float = 100.0
    """Cap on one (user, item) strength."""

    def __post_init__(self) -> None:
        bad = {t: f for t, f in self.transforms.items() if f not in TRANSFORMS}
        if bad:
            raise ValueError(f"unknown value transform(s) {bad}; expected one of {TRANSFORMS}")
        if self.half_life_days is not None and not self.half_life_days > 0:
            raise ValueError(f"half_life_days must be > 0 or None, got {self.half_life_days}")
        if not self.max_confidence > 0:
            raise ValueError(f"max_confidence must be > 0, got {self.max_confidence}")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError(f"event weights must be >= 0, got {dict(self.weights)}")

    @classmethod
    def from_settings(cls, s: Any) -> StrengthParams:
        """From `lake.config.InteractionSettings`."""
        return cls(dict(s.weights), dict(s.value_transforms), s.half_life_days,
                   s.max_confidence)

    def to_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "transforms": dict(self.transforms),
                "half_life_days": self.half_life_days, "max_confidence": self.max_confidence}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StrengthParams:
        hl = d.get("half_life_days")
        return cls(dict(d["weights"]), dict(d.get("transforms") or {}),
                   None if hl is None else float(hl), float(d.get("max_confidence", 100.0)))

    def with_changes(self, **changes: Any) -> StrengthParams:
        return replace(self, **changes)

    @property
    def active_types(self) -> list[str]:
        return sorted(t for t, w in self.weights.items() if w > 0)

    # -- the definition ----------------------------------------------------------------
    def base(self, event_type: np.ndarray, value: np.ndarray,
             type_names: np.ndarray | None = None) -> np.ndarray:
        """weight[type] * transform[type](value) per event (float64; NaN value = missing).

        `event_type`: each event's type name, or, with `type_names`, its index into them
        (small integer codes compare far faster than strings over millions of events).
        """
        types = np.asarray(event_type)
        v = np.asarray(value, dtype=np.float64)
        out = np.zeros(types.shape, dtype=np.float64)
        if types.size == 0:
            return out
        if type_names is None and types.dtype.kind not in "US":
            types = types.astype(str)
        names = None if type_names is None else [str(n) for n in type_names]
        # one comparison per weighted type (a handful), not a sort of every event's type
        for t in self.active_types:
            if names is None:
                sel = types == t
            elif t in names:
                sel = types == names.index(t)
            else:
                continue
            out[sel] = self.weights[t] * value_factor(self.transforms.get(t, "none"), v[sel])
        return out

    def decay(self, age_days: np.ndarray) -> np.ndarray:
        """0.5 ** (age / half_life), ages below 0 count as 0 (float64)."""
        age = np.maximum(np.asarray(age_days, dtype=np.float64), 0.0)
        if self.half_life_days is None:
            return np.ones_like(age)
        return np.exp2(-age / self.half_life_days)

    def scores(self, event_type: np.ndarray, value: np.ndarray, ts_s: np.ndarray,
               reference_s: np.ndarray, type_names: np.ndarray | None = None) -> np.ndarray:
        """strength(e) per event; `ts_s` / `reference_s` in epoch seconds; `event_type` and
        `type_names` as in `base`."""
        age = (np.asarray(reference_s, np.float64) - np.asarray(ts_s, np.float64))
        return self.base(event_type, value, type_names) * self.decay(age / SECONDS_PER_DAY)

    def cap(self, summed: np.ndarray) -> np.ndarray:
        return np.minimum(np.asarray(summed, dtype=np.float64), self.max_confidence)


def value_factor(transform: str, value: np.ndarray) -> np.ndarray:
    """The factor an event's value contributes; missing (NaN) = 1, value <= 0 = 0."""
    v = np.asarray(value, dtype=np.float64)
    if transform == "none":
        return np.ones_like(v)
    known = np.where(np.isnan(v), 1.0, np.maximum(v, 0.0))
    if transform == "linear":
        return known
    if transform == "log1p":
        return np.log1p(known) / _LOG2
    raise ValueError(f"unknown value transform {transform!r}; expected one of {TRANSFORMS}")


def user_reference(user_codes: np.ndarray, ts_s: np.ndarray, n_users: int) -> np.ndarray:
    """Per-user latest event time (epoch seconds, -inf for users without events)."""
    ref = np.full(n_users, -np.inf)
    np.maximum.at(ref, np.asarray(user_codes, dtype=np.int64), np.asarray(ts_s, np.float64))
    return ref


def epoch_micros(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A timestamp column as int64 epoch microseconds."""
    us = pc.cast(pc.cast(col, pa.timestamp("us", tz="UTC")), pa.int64())
    return np.asarray(us.to_numpy(zero_copy_only=False), dtype=np.int64)


def epoch_seconds(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A timestamp column as float64 epoch seconds."""
    return epoch_micros(col) / 1e6


def score_batch(batch: Batch, params: StrengthParams) -> Batch:
    """Add `score` to a batch (or table) with `event_type`, `value`, `ts` and `ref_ts` (the
    user's latest event). This is how gold applies the definition: in Spark per batch
    (`mapInArrow`), on the Arrow engine to the whole table."""
    value = batch.column("value")
    v = np.asarray(pc.fill_null(pc.cast(value, pa.float64()), float("nan"))
                   .to_numpy(zero_copy_only=False), dtype=np.float64)
    types = np.asarray(batch.column("event_type").to_numpy(zero_copy_only=False))
    s = params.scores(types, v, epoch_seconds(batch.column("ts")),
                      epoch_seconds(batch.column("ref_ts")))
    return batch.append_column("score", pa.array(s, pa.float64()))
