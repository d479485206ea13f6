"""Ids need a visible character and no control character; titles and properties no control
character: in one event (online ingest) and column-wise (bulk loads)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from lake.validation import (
    EventValidationError,
    id_problem,
    text_problem,
    validate_event,
    validate_events_table,
)

NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)


def event(**kw: object) -> dict[str, object]:
    return {"event_id": "e1", "user_id": "u1", "item_id": "i1", "event_type": "view",
            "ts": NOW, **kw}


@pytest.mark.parametrize("bad", ["\u200b", "\ufeff", "\u200b\u200d\u2060", "\u3000\u200b",
                                 "\u00ad", "\u2028\u202e"])
def test_ids_of_invisible_characters_only_are_refused(bad: str) -> None:
    assert id_problem(bad, 256) is not None
    with pytest.raises(EventValidationError) as exc:
        validate_event(0, event(user_id=bad), now=NOW)
    assert exc.value.field == "user_id"


@pytest.mark.parametrize("good", ["a\u200bb", "\u200bx", "é", "\U0001f600", "a b", "x\u202e"])
def test_ids_with_a_visible_character_are_kept(good: str) -> None:
    assert id_problem(good, 256) is None
    assert validate_event(0, event(item_id=good), now=NOW)["item_id"] == good


@pytest.mark.parametrize("bad", ["a\x85b", "\x9f", "a\x00", "tab\tid"])
def test_c0_and_c1_controls_in_ids_are_refused(bad: str) -> None:
    assert "control character" in (id_problem(bad, 256) or "")


def test_control_characters_in_properties_are_refused_keys_and_nested_values() -> None:
    for props in ({"note": "bell\x07"}, {"k\x01": "v"}, {"a": ["ok", {"b": "\x1b[31m"}]},
                  '{"c": "\\u0085"}'):
        with pytest.raises(EventValidationError) as exc:
            validate_event(0, event(properties=props), now=NOW)
        assert exc.value.field == "properties" and "control character" in exc.value.reason
    ok = validate_event(0, event(properties={"note": "café ☕", "n": 3}), now=NOW)
    assert json.loads(ok["properties"]) == {"note": "café ☕", "n": 3}


def test_titles_follow_the_text_rule() -> None:
    assert text_problem("Mug\x1b[31m") == "contains the control character U+001B"
    assert text_problem("Mug, blue — 350 ml") is None


def test_bulk_loads_apply_the_same_rules_column_wise() -> None:
    base = {"event_id": ["e1", "e2"], "user_id": ["u1", "u2"], "item_id": ["i1", "i2"],
            "event_type": ["view", "view"], "ts": pa.array([NOW, NOW], pa.timestamp("us", "UTC"))}
    assert validate_events_table(pa.table(base), now=NOW).num_rows == 2
    for column, values, reason in (
            ("user_id", ["u1", "\u200b\u200b"], "no visible character"),
            ("item_id", ["i\x851", "i2"], "control character U+0085")):
        with pytest.raises(EventValidationError) as exc:
            validate_events_table(pa.table({**base, column: values}), now=NOW)
        assert (exc.value.field, exc.value.row) == (column, values.index(
            next(v for v in values if v not in ("u1", "i2"))))
        assert reason in exc.value.reason
    props = pa.array([None, '{"k": "a\\u0007"}'], pa.string())
    with pytest.raises(EventValidationError) as exc:
        validate_events_table(pa.table({**base, "properties": props}), now=NOW)
    assert (exc.value.field, exc.value.row) == ("properties", 1)
