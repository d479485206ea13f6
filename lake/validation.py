"""Event validation: a batch is accepted whole or rejected whole with the row and field named.

The same rules serve bulk loads into bronze and the online IngestEvents handler (which
validates event by event and rejects only the bad ones).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa

from lake.config import EVENT_TYPES
from lake.schemas import BRONZE_EVENTS

# Timestamps outside this window are treated as unit mistakes (seconds vs ms) or garbage.
MIN_TS = datetime(1995, 1, 1, tzinfo=UTC)
MAX_FUTURE = timedelta(days=1)
MAX_ID_LENGTH = 256
REQUIRED = ("event_id", "user_id", "item_id", "event_type", "ts")
OPTIONAL = ("value", "received_at", "session_id", "properties", "recommendation_id")


class EventValidationError(ValueError):
    """An event is invalid. `row` is its position in the batch, `field` the offending field."""

    def __init__(self, row: int, field: str, message: str) -> None:
        super().__init__(f"row {row}, field {field!r}: {message}")
        self.row = row
        self.field = field
        self.reason = message


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""C0 and C1 control characters and DEL: never part of an id, a title or a property."""
_INVISIBLE_CATEGORIES = frozenset(("Cc", "Cf", "Zs", "Zl", "Zp"))
"""Controls, format characters (zero-width space, joiners, BOM) and separators: an id made
only of these looks empty everywhere it is shown."""
# The same two rules for Arrow columns (RE2 syntax) in bulk loads.
_CONTROL_RE2 = r"[\x00-\x1f\x7f-\x9f]"
_INVISIBLE_RE2 = r"^[\s\p{Cc}\p{Cf}\p{Z}]*$"


@dataclass(frozen=True)
class EventLimits:
    """Bounds on what one event may carry (`server.*` keys; the defaults are theirs)."""

    max_id_length: int = MAX_ID_LENGTH
    max_value: float = 1e6
    max_properties_bytes: int = 4096
    max_properties_keys: int = 64

    @classmethod
    def from_settings(cls, server: Any) -> EventLimits:
        """From `lake.config.ServerSettings`; ids never longer than bronze accepts."""
        return cls(min(server.max_id_length, MAX_ID_LENGTH), server.max_event_value,
                   server.max_properties_bytes, server.max_properties_keys)


def _all_invisible(v: str) -> bool:
    return all(c.isspace() or unicodedata.category(c) in _INVISIBLE_CATEGORIES for c in v)


def text_problem(v: str) -> str | None:
    """What is wrong with free text (a title, a property key or value), or None."""
    bad = _CONTROL.search(v)
    if bad:
        return f"contains the control character U+{ord(bad.group()):04X}"
    return None


def id_problem(v: str, max_len: int) -> str | None:
    """What is wrong with an id (user, item, event, session, category), or None."""
    if not v or not v.strip():
        return "must not be empty"
    if len(v) > max_len:
        return f"longer than {max_len} characters"
    problem = text_problem(v)
    if problem:
        return problem
    # ASCII without controls always has a visible character once strip() left one.
    if not v.isascii() and _all_invisible(v):
        return "has no visible character (only spaces, controls or format characters)"
    return None


def _json_text_problem(value: Any) -> str | None:
    """The first control character in a parsed JSON value's keys or strings, or None."""
    if isinstance(value, str):
        return text_problem(value)
    if isinstance(value, dict):
        items: Iterable[Any] = (x for kv in value.items() for x in kv)
    elif isinstance(value, list):
        items = value
    else:
        return None
    for x in items:
        problem = _json_text_problem(x)
        if problem:
            return problem
    return None


def _check_id(row: int, name: str, v: Any, max_len: int) -> str:
    if not isinstance(v, str):
        raise EventValidationError(row, name, f"must be a string, got {type(v).__name__}")
    problem = id_problem(v, max_len)
    if problem:
        raise EventValidationError(row, name, problem)
    return v


def _check_ts(row: int, name: str, v: Any, now: datetime) -> datetime:
    if isinstance(v, datetime):
        ts = v
    elif isinstance(v, str):
        try:
            ts = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError as exc:
            raise EventValidationError(row, name, f"not an ISO-8601 timestamp: {v!r}") from exc
    else:
        raise EventValidationError(row, name, f"must be a datetime, got {type(v).__name__}")
    if ts.tzinfo is None:
        raise EventValidationError(row, name, "must be timezone-aware (UTC)")
    ts = ts.astimezone(UTC)
    if ts < MIN_TS or ts > now + MAX_FUTURE:
        raise EventValidationError(
            row, name, f"{ts.isoformat()} is outside [{MIN_TS.date()}, now + 1 day]"
        )
    return ts


def validate_event(
    row: int,
    event: Mapping[str, Any],
    *,
    now: datetime | None = None,
    limits: EventLimits | None = None,
) -> dict[str, Any]:
    """Check one event and return it normalised to the bronze schema's columns."""
    now = now or datetime.now(UTC)
    limits = limits or EventLimits()
    max_id_length = limits.max_id_length
    unknown = sorted(set(event) - set(REQUIRED) - set(OPTIONAL) - {"event_date"})
    if unknown:
        raise EventValidationError(row, unknown[0], "unknown field")
    for name in REQUIRED:
        if event.get(name) is None:
            raise EventValidationError(row, name, "is required")
    out: dict[str, Any] = {
        name: _check_id(row, name, event[name], max_id_length)
        for name in ("event_id", "user_id", "item_id")
    }
    etype = event["event_type"]
    if etype not in EVENT_TYPES:
        raise EventValidationError(
            row, "event_type", f"unknown event type {etype!r}; expected one of {list(EVENT_TYPES)}"
        )
    out["event_type"] = etype
    value = event.get("value")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EventValidationError(
                row, "value", f"must be a number, got {type(value).__name__}"
            )
        if not math.isfinite(value):
            raise EventValidationError(row, "value", f"must be finite, got {value}")
        if abs(value) > limits.max_value:
            raise EventValidationError(
                row, "value", f"magnitude {value:g} above server.max_event_value "
                              f"{limits.max_value:g}")
        value = float(value)
    if etype == "rating" and value is not None and not (0 <= value <= 10):
        raise EventValidationError(row, "value", f"rating {value} outside [0, 10]")
    out["value"] = value
    out["ts"] = _check_ts(row, "ts", event["ts"], now)
    received = event.get("received_at")
    out["received_at"] = now if received is None else _check_ts(row, "received_at", received, now)
    session = event.get("session_id")
    out["session_id"] = (
        None if session is None else _check_id(row, "session_id", session, max_id_length)
    )
    props = event.get("properties")
    if props is not None:
        if isinstance(props, Mapping):
            props = json.dumps(props, sort_keys=True, separators=(",", ":"))
        elif isinstance(props, str):
            try:
                parsed = json.loads(props)
            except json.JSONDecodeError as exc:
                raise EventValidationError(row, "properties", f"not valid JSON: {exc}") from exc
            if not isinstance(parsed, dict):
                raise EventValidationError(row, "properties", "must be a JSON object")
        else:
            raise EventValidationError(row, "properties", "must be a JSON object or mapping")
        parsed_props = json.loads(props)
        n_keys = len(parsed_props)
        problem = _json_text_problem(parsed_props)
        if problem:
            raise EventValidationError(row, "properties", problem)
        if n_keys > limits.max_properties_keys:
            raise EventValidationError(row, "properties", f"{n_keys} keys, more than "
                                       f"server.max_properties_keys {limits.max_properties_keys}")
        size = len(props.encode())
        if size > limits.max_properties_bytes:
            raise EventValidationError(row, "properties", f"{size} bytes of JSON, more than "
                                       f"server.max_properties_bytes {limits.max_properties_bytes}")
    out["properties"] = props
    # The list the event came from (`Event.recommendation_id`): an id, or none at all
    # (None and "" both mean none and are stored as "").
    rec = event.get("recommendation_id")
    out["recommendation_id"] = "" if rec is None or rec == "" else \
        _check_id(row, "recommendation_id", rec, max_id_length)
    out["event_date"] = out["ts"].date()
    out["tenant"] = ""  # not the event's to say: the ingest sets its caller's tenant
    return out


def events_to_table(
    events: Iterable[Mapping[str, Any]], *, now: datetime | None = None
) -> pa.Table:
    """Validate a batch of event dicts and build a bronze-schema Arrow table (all or nothing)."""
    now = now or datetime.now(UTC)
    rows = [validate_event(i, e, now=now) for i, e in enumerate(events)]
    cols = {f.name: [r[f.name] for r in rows] for f in BRONZE_EVENTS.schema}
    return pa.table(cols, schema=BRONZE_EVENTS.schema)


def validate_events_table(table: pa.Table, *, now: datetime | None = None) -> pa.Table:
    """Validate an Arrow table of events column-wise and conform it to the bronze schema.

    Raises EventValidationError naming the first bad row and field; nothing is written
    by callers when this raises.
    """
    now = now or datetime.now(UTC)
    schema = BRONZE_EVENTS.schema
    names = set(table.column_names)
    unknown = sorted(names - {f.name for f in schema})
    if unknown:
        raise EventValidationError(0, unknown[0], "unknown column")
    import pyarrow.compute as pc

    n = table.num_rows
    cols: dict[str, pa.Array] = {}
    for f in schema:
        if f.name not in names:
            if f.name == "event_date" and "ts" in names:
                continue
            if f.name == "received_at":
                cols[f.name] = pa.array([now] * n, type=f.type)
                continue
            if not f.nullable:
                raise EventValidationError(0, f.name, "is required (column missing)")
            cols[f.name] = pa.nulls(n, type=f.type)
            continue
        col = table.column(f.name)
        try:
            col = col.cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise EventValidationError(
                _first_uncastable(col, f.type), f.name, f"expected {f.type}, got {col.type}"
            ) from exc
        if not f.nullable and col.null_count:
            raise EventValidationError(_first(pc.is_null(col)), f.name, "is required")
        cols[f.name] = col
    for name in ("event_id", "user_id", "item_id"):
        lens = pc.utf8_length(cols[name])
        bad = pc.or_(pc.equal(lens, 0), pc.greater(lens, MAX_ID_LENGTH))
        if pc.any(bad).as_py():
            i = _first(bad)
            raise EventValidationError(i, name, f"must be 1..{MAX_ID_LENGTH} characters")
        bad = pc.or_(pc.match_substring_regex(cols[name], _CONTROL_RE2),
                     pc.match_substring_regex(cols[name], _INVISIBLE_RE2))
        if pc.any(bad).as_py():
            i = _first(bad)
            raise EventValidationError(i, name, id_problem(cols[name][i].as_py(), MAX_ID_LENGTH)
                                       or "has no visible character")
    bad_type = pc.invert(pc.is_in(cols["event_type"], value_set=pa.array(EVENT_TYPES)))
    if pc.any(bad_type).as_py():
        i = _first(bad_type)
        raise EventValidationError(
            i, "event_type",
            f"unknown event type {cols['event_type'][i].as_py()!r}; "
            f"expected one of {list(EVENT_TYPES)}",
        )
    value = cols["value"]
    bad_value = pc.fill_null(pc.invert(pc.is_finite(value)), False)
    if pc.any(bad_value).as_py():
        i = _first(bad_value)
        raise EventValidationError(i, "value", f"must be finite, got {value[i].as_py()}")
    lo = pa.scalar(MIN_TS, type=schema.field("ts").type)
    hi = pa.scalar(now + MAX_FUTURE, type=schema.field("ts").type)
    for name in ("ts", "received_at"):
        c = cols[name]
        bad_ts = pc.fill_null(pc.or_(pc.less(c, lo), pc.greater(c, hi)), False)
        if pc.any(bad_ts).as_py():
            i = _first(bad_ts)
            raise EventValidationError(
                i, name, f"{c[i].as_py()} is outside [{MIN_TS.date()}, now + 1 day]"
            )
    rec = cols["recommendation_id"]
    if rec.null_count < n:  # optional: null and "" mean none; anything else is an id
        given = pc.fill_null(pc.not_equal(rec, ""), False)
        bad = pc.and_(given, pc.or_(
            pc.greater(pc.utf8_length(rec), MAX_ID_LENGTH),
            pc.or_(pc.match_substring_regex(rec, _CONTROL_RE2),
                   pc.match_substring_regex(rec, _INVISIBLE_RE2))))
        if pc.any(bad).as_py():
            i = _first(bad)
            raise EventValidationError(i, "recommendation_id",
                                       id_problem(rec[i].as_py(), MAX_ID_LENGTH)
                                       or "has no visible character")
    props = cols["properties"]
    if props.null_count < n:
        # Parse each distinct text once: bulk loads repeat a handful of property objects.
        problems = {p: _properties_problem(p) for p in pc.unique(props).to_pylist()
                    if p is not None}
        bad = [p for p, problem in problems.items() if problem]
        if bad:
            i = _first(pc.is_in(props, value_set=pa.array(bad, pa.string())))
            raise EventValidationError(i, "properties", problems[props[i].as_py()] or "")
    cols["event_date"] = pc.cast(cols["ts"], pa.date32())  # UTC date: ts is tz=UTC
    return pa.table([cols[f.name] for f in schema], schema=schema)


def _properties_problem(text: str) -> str | None:
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return "must be a JSON object"
    if not isinstance(parsed, dict):
        return "must be a JSON object"
    return _json_text_problem(parsed)


def _first(mask: pa.ChunkedArray | pa.Array) -> int:
    import pyarrow.compute as pc

    return int(pc.index(mask, True).as_py())


def _first_uncastable(col: pa.ChunkedArray, typ: pa.DataType) -> int:
    for i, v in enumerate(col.to_pylist()):
        try:
            pa.array([v]).cast(typ)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return i
    return 0


def event_date(ts: datetime) -> date:
    return ts.astimezone(UTC).date()
