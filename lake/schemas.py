"""Explicit Arrow schemas and layout of every Delta table in the lake.

This module is the table catalog: the batch jobs, the online server, the SQL CLI and
the tests all take table names, schemas and partition columns from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
"""What an event carries (the fields of `IngestEvents` and of bulk loads)."""

TENANT = _f("tenant", pa.string())
"""Who sent an event: the name of the access key its IngestEvents call used ("" for none:
an open port, the console, bulk loads). Event ids are unique per tenant, not globally.
Nullable only so that tables written before the column existed gain it on their next write
(Delta adds only nullable columns); writers store "", and reads give "" for older files."""


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    partition_by: tuple[str, ...] = ()
    description: str = ""
    key: tuple[str, ...] = ()
    """Columns that identify a row (for merges/upserts and de-duplication)."""
    defaults: tuple[tuple[str, Any], ...] = ()
    """(column, value) for nullable columns whose nulls mean that value: writers store the
    value instead, readers fill it in (rows of files written before the column existed)."""

    @property
    def default_values(self) -> dict[str, Any]:
        return dict(self.defaults)


RECOMMENDATION_ID = _f("recommendation_id", pa.string())
"""The list that led to an event (`Event.recommendation_id`, a `bronze_impressions` key),
"" when the sender did not say. Nullable, with the default "", for the reason `TENANT` is."""

EVENT_TABLE_FIELDS: list[pa.Field] = [*EVENT_FIELDS, TENANT, RECOMMENDATION_ID]
"""Bronze and silver columns; the columns added later come last, where schema evolution
adds them."""
EVENT_DEFAULTS: tuple[tuple[str, Any], ...] = (("tenant", ""), ("recommendation_id", ""))


BRONZE_EVENTS = TableSpec(
    "bronze_events",
    pa.schema(EVENT_TABLE_FIELDS),
    ("event_date",),
    "Raw events, append-only, as acknowledged by IngestEvents or loaded in bulk.",
    ("tenant", "event_id"),
    EVENT_DEFAULTS,
)

SILVER_EVENTS = TableSpec(
    "silver_events",
    pa.schema(EVENT_TABLE_FIELDS),
    ("event_date",),
    "Validated, de-duplicated per tenant (first arrival wins), typed events; rewritten per "
    "date.",
    ("tenant", "event_id"),
    EVENT_DEFAULTS,
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


GOLD_ATTRIBUTED_EVENTS = TableSpec(
    "gold_attributed_events",
    pa.schema(
        [
            _f("event_id", pa.string(), False),
            _f("tenant", pa.string(), False),
            _f("user_id", pa.string(), False),
            _f("item_id", pa.string(), False),
            _f("event_type", pa.string(), False),  # click | add_to_cart | purchase
            _f("ts", TS, False),
            _f("recommendation_id", pa.string(), False),
            _f("rule", pa.string(), False),  # explicit | window
            _f("position", pa.int32(), False),  # of the item in the list, 0-based
            _f("model_version", pa.string()),
            _f("strategy", pa.string()),
            _f("experiment_id", pa.string()),
            _f("arm", pa.string()),
            _f("surface", pa.string()),
            _f("impression_ts", TS, False),  # when the list was shown
            _f("revenue", pa.float64()),  # purchases: items.price x quantity; else null
            _f("event_date", pa.date32(), False),  # partition column, = UTC date of `ts`
        ]
    ),
    ("event_date",),
    "Click, add-to-cart and purchase events tied to the recommendation list that earned "
    "them (spark_jobs.attribution): each at most once; rewritten per event date.",
    ("tenant", "event_id"),
)

GOLD_RECOMMENDATION_METRICS = TableSpec(
    "gold_recommendation_metrics",
    pa.schema(
        [
            _f("impression_date", pa.date32(), False),  # partition: the day lists were shown
            _f("model_version", pa.string(), False),
            _f("strategy", pa.string(), False),
            _f("experiment_id", pa.string(), False),  # "" = no experiment
            _f("arm", pa.string(), False),
            _f("position", pa.int32()),  # 0-based; null = all positions
            _f("impressions", pa.int64(), False),
            _f("users", pa.int64(), False),
            _f("clicks", pa.int64(), False),
            _f("carts", pa.int64(), False),
            _f("purchases", pa.int64(), False),
            _f("purchasers", pa.int64(), False),
            _f("revenue", pa.float64(), False),
            _f("ctr", pa.float64()),
            _f("conversion", pa.float64()),
            _f("revenue_per_user", pa.float64()),
        ]
    ),
    ("impression_date",),
    "Daily outcome of the lists shown, by model version, strategy, experiment arm and "
    "position (spark_jobs.attribution); rewritten per impression date.",
    ("impression_date", "model_version", "strategy", "experiment_id", "arm", "position"),
)

EXPERIMENT_RESULTS = TableSpec(
    "experiment_results",
    pa.schema(
        [
            _f("as_of", pa.date32(), False),  # partition: the day the analysis covers up to
            _f("experiment_id", pa.string(), False),  # partition
            _f("experiment_name", pa.string()),
            _f("arm", pa.string(), False),
            _f("control_arm", pa.string(), False),
            _f("share", pa.float64(), False),  # configured share of the experiment's users
            _f("metric", pa.string(), False),  # ctr | conversion | revenue_per_user[_winsorised]
            _f("users", pa.int64(), False),
            _f("impressions", pa.int64(), False),
            _f("value", pa.float64()),
            _f("ci_lower", pa.float64()),
            _f("ci_upper", pa.float64()),
            _f("control_value", pa.float64()),
            _f("rel_lift", pa.float64()),  # vs the control arm; null on the control's rows
            _f("rel_lift_ci_lower", pa.float64()),
            _f("rel_lift_ci_upper", pa.float64()),
            _f("pvalue", pa.float64()),
            _f("winsor_cap", pa.float64()),  # revenue_per_user_winsorised: the cap applied
            _f("srm_pvalue", pa.float64()),
            _f("status", pa.string(), False),  # invalid | collecting | decided
            _f("decision", pa.string(), False),  # better | worse | no_difference | ""
            _f("decision_metric", pa.string(), False),
            _f("decided_on", pa.date32()),  # the first as_of that reached the horizon
            _f("data_start", TS),
            _f("data_end", TS),
            _f("computed_at", TS, False),
        ]
    ),
    ("as_of", "experiment_id"),
    "Per experiment, analysis date, arm and metric: estimate with its interval, relative "
    "lift vs the control arm, SRM check and the fixed-horizon decision "
    "(spark_jobs.experiment_analysis).",
    ("as_of", "experiment_id", "arm", "metric"),
)

IMPRESSION_ITEM = pa.struct([
    pa.field("item_id", pa.string(), False),
    pa.field("position", pa.int32(), False),  # 0-based rank in the answer
    pa.field("score", pa.float32(), False),
])
"""One shown item of an impression."""

BRONZE_IMPRESSIONS = TableSpec(
    "bronze_impressions",
    pa.schema(
        [
            _f("recommendation_id", pa.string(), False),
            _f("tenant", pa.string()),  # the caller's key name, "" for none (as bronze_events)
            _f("surface", pa.string(), False),  # recommend | similar
            _f("user_id", pa.string()),  # null: a SimilarItems call that named no viewer
            _f("anchor_item_id", pa.string()),  # SimilarItems' item; null for Recommend
            _f("items", pa.list_(pa.field("element", IMPRESSION_ITEM, False)), False),
            _f("model_version", pa.string()),
            _f("strategy", pa.string()),  # personalised | fallback | popularity | similar
            _f("experiment_id", pa.string()),  # "" = no experiment
            _f("arm", pa.string()),
            _f("context", pa.string()),  # JSON: {"filters": {...}, "context_item_ids": [...]}
            _f("ts", TS, False),  # when the answer was made
            _f("impression_date", pa.date32(), False),  # partition column, = UTC date of `ts`
        ]
    ),
    ("impression_date",),
    "What each Recommend / RecommendBatch entry / SimilarItems answer showed (sampled by "
    "impressions.sample_rate), append-only, exactly once from the servers' WALs.",
    ("recommendation_id",),
    (("tenant", ""),),
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
        BRONZE_IMPRESSIONS,
        GOLD_ATTRIBUTED_EVENTS,
        GOLD_RECOMMENDATION_METRICS,
        EXPERIMENT_RESULTS,
    )
}
