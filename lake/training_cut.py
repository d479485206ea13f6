"""Which events a model was trained on: the cut the batch layer writes and the server reads.

An event is in a model's training data when both hold:

* its `ts` is before `ts_before` (the end of the as-of day: gold counts nothing later), and
* it had reached the lake when training read it: `received_at <= received_until` (the
  latest arrival in the silver events the model was built from).

The online layer keeps every other event — late arrivals with an old `ts`, events still in
a server's WAL when the pipeline ran — and folds them in on top of the batch history, so a
reload never drops an event the new model has not seen, and never counts one twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from typing import Any, Protocol

TS_BEFORE = "events_ts_before"
RECEIVED_UNTIL = "events_received_until"


class RecordedCut(Protocol):
    """What a typed manifest (`lake.bundle.Manifest`) records about its training data."""

    @property
    def as_of(self) -> date | None: ...
    @property
    def events_ts_before(self) -> datetime | None: ...
    @property
    def events_received_until(self) -> datetime | None: ...
    @property
    def created_at(self) -> datetime | None: ...


def _recorded(manifest: Mapping[str, Any] | RecordedCut
              ) -> tuple[datetime | None, datetime | None, date | None, datetime | None]:
    """(ts_before, received_until, as_of, created_at) of a manifest, typed or as JSON."""
    if not isinstance(manifest, Mapping):
        return (manifest.events_ts_before, manifest.events_received_until, manifest.as_of,
                manifest.created_at)
    ts, received = manifest.get(TS_BEFORE), manifest.get(RECEIVED_UNTIL)
    as_of, created = manifest.get("as_of"), manifest.get("created_at")
    return (_parse(ts) if ts else None, _parse(received) if received else None,
            date.fromisoformat(str(as_of)[:10]) if as_of else None,
            _parse(created) if created else None)


def _parse(v: Any) -> datetime:
    t = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def end_of_day(d: date) -> datetime:
    return datetime.combine(d + timedelta(days=1), dtime.min, tzinfo=UTC)


@dataclass(frozen=True)
class TrainingCut:
    ts_before: datetime
    received_until: datetime | None = None
    """None: unknown (a bundle from before it was recorded): `ts` alone decides."""

    def covers(self, ts: datetime, received_at: datetime | None) -> bool:
        """True when an event with this `ts` / `received_at` is in the training data."""
        if ts >= self.ts_before:
            return False
        if self.received_until is None or received_at is None:
            return True
        return received_at <= self.received_until

    def to_manifest(self) -> dict[str, str | None]:
        return {TS_BEFORE: self.ts_before.isoformat(),
                RECEIVED_UNTIL: self.received_until.isoformat() if self.received_until else None}

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any] | RecordedCut) -> TrainingCut | None:
        """The cut a bundle records; bundles without one fall back to their as-of date."""
        ts, received, as_of, _ = _recorded(manifest)
        if ts is not None:
            return cls(ts, received)
        if as_of is not None:
            return cls(end_of_day(as_of))
        return None


def trained_from(manifest: Mapping[str, Any] | RecordedCut) -> datetime | None:
    """The earliest instant the model's training could have read the lake: the end of its
    data or its creation, whichever is first (None: unknown, so every erasure counts)."""
    cut = TrainingCut.from_manifest(manifest)
    created = _recorded(manifest)[3]
    known = [t for t in (cut.ts_before if cut is not None else None, created) if t is not None]
    return min(known) if known else None
