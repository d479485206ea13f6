"""Explicit Arrow schemas and layout of every Delta table in the lake.

This module is the table catalog: the batch jobs, the online server, the SQL CLI and
the tests all take table names, schemas and partition columns from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")


def _f(name: str, typ: pa.DataType, nullable: bool = True) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


EVENT_FIELDS: list[pa.Field] = [
    _f("event_id", pa.string(), False),
    _f("user_id", pa.string(), False),
    _f("item_id", pa.string(), False),
    _f("event_type", pa.string(), False),
    _f("value", pa.float64()),
    _f("ts", TS, False),
    _f("received_at", TS, False),
    _f("session_id", pa.string()),
    _f("properties", pa.string()),  # JSON object text; any Delta reader can parse it
    _f("event_date", pa.date32(), False),  # partition column, = UTC date of `ts`
]


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    partition_by: tuple[str, ...] = ()
    description: str = ""
    key: tuple[str, ...] = ()
    """Columns that identify a row (for merges/upserts and de-duplication)."""


BRONZE_EVENTS = TableSpec(
    "bronze_events",
    pa.schema(EVENT_FIELDS),
    ("event_date",),
    "Raw events, append-only, as acknowledged by IngestEvents or loaded in bulk.",
    ("event_id",),
)

SILVER_EVENTS = TableSpec(
    "silver_events",
    pa.schema(EVENT_FIELDS),
    ("event_date",),
    "Validated, de-duplicated (first arrival wins), typed events; rewritten per date.",
    ("event_id",),
)

GOLD_INTERACTIONS = TableSpec(
    "gold_interactions",
    pa.schema(
        [
            _f("user_id", pa.string(), False),
            _f("item_id", pa.string(), False),
            _f("confidence", pa.float64(), False),
            _f("n_events", pa.int64(), False),
            _f("last_ts", TS, False),
            _f("as_of", pa.date32(), False),
        ]
    ),
    ("as_of",),
    "Per (user, item) confidence = sum weight(event_type) x time decay, capped; per as-of date.",
    ("as_of", "user_id", "item_id"),
)

ITEMS = TableSpec(
    "items",
    pa.schema(
        [
            _f("item_id", pa.string(), False),
            _f("category", pa.string()),
            _f("price", pa.float64()),
            _f("available", pa.bool_(), False),
            _f("title", pa.string()),
            _f("updated_at", TS, False),
        ]
    ),
    (),
    "Item catalogue, upserted by item_id (category, price, availability).",
    ("item_id",),
)

MODEL_RUNS = TableSpec(
    "model_runs",
    pa.schema(
        [
            _f("model_version", pa.string(), False),
            _f("created_at", TS, False),
            _f("as_of", pa.date32()),
            _f("backend", pa.string(), False),
            _f("params", pa.string(), False),  # JSON
            _f("metrics", pa.string()),  # JSON: model and baselines
            _f("status", pa.string(), False),  # published | rejected | current | failed
            _f("gate_reason", pa.string()),
            _f("bundle_path", pa.string()),
        ]
    ),
    (),
    "One row per training run: params, metrics, gate decision, bundle location.",
    ("model_version",),
)


def _factor_table(name: str, id_col: str, what: str) -> TableSpec:
    return TableSpec(
        name,
        pa.schema(
            [
                _f(id_col, pa.string(), False),
                _f("factors", pa.list_(pa.field("element", pa.float32(), False)), False),
                _f("model_version", pa.string(), False),
            ]
        ),
        ("model_version",),
        f"ALS {what} factors, one partition per model version.",
        ("model_version", id_col),
    )


USER_FACTORS = _factor_table("user_factors", "user_id", "user")
ITEM_FACTORS = _factor_table("item_factors", "item_id", "item")

USER_ERASURES = TableSpec(
    "user_erasures",
    pa.schema([_f("user_id", pa.string(), False), _f("requested_at", TS, False)]),
    (),
    "Users erased with ForgetUser. Their rows are deleted everywhere else; servers keep "
    "hiding their vectors in models trained before the erasure (restarts included).",
)

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        BRONZE_EVENTS,
        SILVER_EVENTS,
        GOLD_INTERACTIONS,
        ITEMS,
        MODEL_RUNS,
        USER_FACTORS,
        ITEM_FACTORS,
        USER_ERASURES,
    )
}
