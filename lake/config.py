"""Typed settings for every layer, loaded from YAML and overridden by environment variables.

One place defines the configuration schema; every job, DAG and server reads it through
`load_settings()`. Unknown keys are errors (a typo must not silently fall back to a
default), and a validation failure names the file and the dotted key.

Precedence (lowest to highest): model defaults < YAML file < environment variables.
The YAML file is `$LAMBDAREC_CONFIG` if set, else `infra/lambdarec.yaml` when present.
Environment overrides use `LAMBDAREC__<SECTION>__<KEY>` (double underscores), e.g.
`LAMBDAREC__SERVER__PORT=50052` or `LAMBDAREC__SPARK__MASTER=spark://127.0.0.1:7077`.
Each value is parsed by its field's type: text fields (strings, paths, choices) take the
value verbatim (`0755` and `no` stay text), numbers and booleans are read by pydantic
(`3`, `0.5`, `true`/`no`), `null` clears an optional field, and lists and mappings are
written as YAML/JSON (`[view, click]`, `{"view": 2}`). Inside a list or mapping the same
rule holds: YAML gives only the structure, every element is text read by its element's
type, so `[no, 0755]` for a list of strings is `["no", "0755"]` (YAML 1.1 would make it
`[False, 493]`). An error names the variable.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = PROJECT_ROOT / "infra" / "lambdarec.yaml"
ENV_PREFIX = "LAMBDAREC__"

EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase", "rating")
DEFAULT_ADMIN_TOKEN = "change-me"
"""The shipped admin token: a server started with it warns (anyone who read the docs has it)."""


class ConfigError(ValueError):
    """The configuration file or an environment override is invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


class LakeSettings(_Strict):
    root: Path = Path("var/lake")
    """Directory holding one sub-directory per Delta table."""
    commit_retries: int = Field(default=8, ge=0)
    """How often a conflicting delta-rs commit is retried before giving up."""


class SparkSettings(_Strict):
    master: str = "local[*]"
    """Spark master URL: `local[*]`, or `spark://127.0.0.1:7077` for a standalone cluster."""
    app_name: str = "lambdarec"
    """Spark application name."""
    driver_memory: str = "4g"
    """Spark driver memory."""
    executor_memory: str = "1g"
    """Executor memory on a standalone cluster."""
    shuffle_partitions: int = Field(default=8, ge=1)
    """`spark.sql.shuffle.partitions`."""
    conf: dict[str, str] = Field(default_factory=dict)
    """Extra `spark.*` settings passed verbatim to the session builder."""
    engine: Literal["auto", "spark", "arrow"] = "auto"
    """What runs compaction and gold: `spark`, `arrow` (in the job's own process on Arrow
    tables, no JVM), or `auto`: `arrow` when the master is local and the step's input has
    at most `arrow_max_rows` rows, else `spark`."""
    arrow_max_rows: int = Field(default=5_000_000, ge=0)
    """Largest input (rows, from the Delta log) that `engine: auto` gives the Arrow engine."""


Transform = Literal["none", "linear", "log1p"]


def _check_event_types(per_type: Mapping[str, Any]) -> None:
    unknown = sorted(set(per_type) - set(EVENT_TYPES))
    if unknown:
        raise ValueError(f"unknown event type(s) {unknown}; known: {list(EVENT_TYPES)}")


def _log1p_for_every_type() -> dict[str, Transform]:
    return {t: "log1p" for t in EVENT_TYPES}


class InteractionSettings(_Strict):
    weights: dict[str, float] = Field(
        default_factory=lambda: {
            "view": 1.0,
            "click": 2.0,
            "add_to_cart": 4.0,
            "purchase": 8.0,
            "rating": 1.0,
        }
    )
    """Weight of each event type in a (user, item) confidence."""
    value_transforms: dict[str, Transform] = Field(default_factory=_log1p_for_every_type)
    """How an event's `value` (rating, play count, quantity) scales its weight: `none`,
    `linear` or `log1p` (log(1 + v) / log 2); a missing value counts 1 (`lake.strength`)."""
    half_life_days: float | None = Field(default=90.0, gt=0)
    """Decay of an event's weight with its age before the *user's latest event* (so a
    backfilled history keeps its weight); null = no decay."""
    max_confidence: float = Field(default=100.0, gt=0)
    """Cap on one (user, item) confidence."""
    lookback_days: int = Field(default=3650, ge=1)
    """Events older than this (relative to the as-of date) are ignored."""

    @field_validator("value_transforms")
    @classmethod
    def _known_transform_types(cls, v: dict[str, str]) -> dict[str, str]:
        _check_event_types(v)
        return v

    @field_validator("weights")
    @classmethod
    def _known_event_types(cls, v: dict[str, float]) -> dict[str, float]:
        _check_event_types(v)
        negative = sorted(k for k, w in v.items() if w < 0)
        if negative:
            raise ValueError(f"weights must be >= 0, negative for {negative}")
        return v


# Tuned on the synthetic e-commerce data (time split): implicit at lambda 100-150 with alpha
# 4-8 beats EASE there; MLlib's count-scaled lambda keeps Spark's customary 0.1.
# ials scales lambda by n ** reg_exponent (1 = MLlib's lambda x interactions); on MovieLens-1M
# (random 90/10) lambda 0.1 with alpha 1 was best of 0.05-0.2 (NDCG@10 0.320 at 64 factors,
# 0.329 at 128; bench/ials_speed.py). The nightly search tunes all of them (spark_jobs.tune).
DEFAULT_REGULARIZATION = {"implicit": 100.0, "mllib": 0.1, "ials": 0.1}


class TrainSettings(_Strict):
    backend: Literal["implicit", "mllib", "ials"] = "implicit"
    """ALS trainer: `implicit` (single node, fast), `mllib` (Spark, distributed) or `ials`
    (single node, numba: frequency-scaled lambda n ** reg_exponent)."""
    factors: int = Field(default=64, ge=1, le=1024)
    """Latent dimensions."""
    regularization: float | None = Field(default=None, ge=0)
    """L2 regularisation (lambda). None = the backend's default (see DEFAULT_REGULARIZATION):
    implicit's lambda is unscaled, MLlib and ials multiply it by each row's interaction count."""
    iterations: int = Field(default=15, ge=1)
    """ALS sweeps."""
    alpha: float = Field(default=6.0, gt=0)
    """Confidence c = 1 + alpha * r of an interaction of strength r (every backend)."""
    cg_steps: int = Field(default=6, ge=0, le=50)
    """`ials` only: warm-started conjugate-gradient steps per intermediate half-step (0 =
    exact solves throughout; the last user step is always exact). 6 matched exact solves'
    NDCG@10 within 0.0001 on ML-1M at 0.45x their time (bench/ials_speed.py)."""
    reg_exponent: float = Field(default=1.0, ge=0, le=2)
    """`ials` only: lambda is scaled by n ** reg_exponent for a row with n interactions
    (0 = unscaled like implicit, 1 = MLlib's count scaling; Rendle et al. 2022)."""
    seed: int = 42
    """Random seed for training."""
    use_gpu: bool | None = None
    """None = use the GPU when implicit reports CUDA, else CPU."""

    @property
    def effective_regularization(self) -> float:
        if self.regularization is not None:
            return self.regularization
        return DEFAULT_REGULARIZATION[self.backend]


class EvaluateSettings(_Strict):
    split: Literal["user_time", "random"] = "user_time"
    """Holdout protocol: `user_time` (each user's last `test_fraction` of distinct items, by
    first-touch time) or `random` (that share of each user's items, at random)."""
    k: list[int] = Field(default_factory=lambda: [5, 10, 20, 50])
    """Cut-offs for Recall/NDCG/MAP/coverage."""
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Share of each user's distinct items held out for testing."""
    min_user_items: int = Field(default=5, ge=2)
    """Users with fewer distinct items are never tested (they stay in training)."""
    min_test_users: int = Field(default=50, ge=1)
    """Fewer test users than this: the gate says the test set is too small to decide."""
    bootstrap: int = Field(default=500, ge=0)
    """Bootstrap resamples of the test users for confidence intervals (0 = none)."""
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    """Confidence level of the intervals (and of the gate's significance check)."""
    ease_max_items: int = Field(default=8_000, ge=0)
    """EASE baseline only up to this many items (it inverts an items x items matrix);
    above it item-kNN is the strong baseline."""
    ease_lambda: float = Field(default=1000.0, gt=0)
    """EASE baseline regularisation."""
    max_eval_users: int = Field(default=20_000, ge=1)
    """Evaluate on at most this many test users (sampled, seeded)."""
    max_eval_cells: int = Field(default=60_000_000, ge=1)
    """...and on at most this many users x items scores per model: ranking costs users x
    items, so a larger catalogue samples fewer users (20k items: 3,000 users)."""
    reuse_fit_max_share: float = Field(default=0.05, ge=0, le=1)
    """When the scored users' held-out pairs are at most this share of all pairs, the
    production fit leaves them out and the evaluation scores its item factors instead of
    fitting the recipe again (`spark_jobs.eval_sample`); 0 = always refit."""


class GateSettings(_Strict):
    metric: str = "ndcg@10"
    """Metric the gate compares."""
    min_lift_over_popularity: float = 0.10
    """New model must beat popularity by this relative margin (0.10 = +10%), and the
    paired bootstrap interval of (model - popularity) must lie above 0."""
    max_regression: float = 0.05
    """...and must not be worse than the current model by more than this relative tolerance."""


class PublishSettings(_Strict):
    into_experiment: str | None = None
    """Name of an experiment the nightly publish puts an accepted model into, as the
    `challenger` arm against the `champion` (CURRENT), instead of making it CURRENT (a
    running experiment is stopped first); null = an accepted model goes live for everyone.
    Promote the winner with `python -m lake.experiments promote EXP ARM`."""
    challenger_share: float = Field(default=0.5, gt=0, lt=1)
    """Share of the experiment's users the challenger serves (the champion the rest)."""
    experiment_traffic: float = Field(default=1.0, gt=0, le=1)
    """Share of all users in that experiment (the others get the champion, no arm)."""


class TuneSettings(_Strict):
    enabled: bool = True
    """Search hyper-parameters nightly on a validation split carved from the training data."""
    budget_s: float = Field(default=150.0, gt=0)
    """CPU seconds (all threads) the search may use; trials stop starting once it is spent.
    CPU time, not wall clock, so a busy box runs the same trials as an idle one."""
    max_trials: int = Field(default=20, ge=1)
    """Most trials of the search (the first is always the configured defaults)."""
    seed: int = 0
    """Seed of the search: the same data and seed give the same trials."""
    max_eval_users: int = Field(default=10_000, ge=100)
    """Validation users scored per trial (sampled, seeded)."""
    validation_users: float = Field(default=0.5, gt=0, lt=1)
    """Share of the users (by a seeded hash of the id) whose held-out items the search scores;
    the evaluation of a searched recipe scores only the other users."""


class BlendSettings(_Strict):
    enabled: bool = True
    """Mix a popularity prior into the personal score of users with short histories, weighted
    beta * n0 / (n0 + n_u); beta and n0 are chosen on the validation split."""


class IndexSettings(_Strict):
    exact_max_items: int = Field(default=50_000, ge=1)
    """Catalogues up to this size use an exact IndexFlatIP; above it HNSW."""
    hnsw_m: int = Field(default=32, ge=4)
    """HNSW graph degree."""
    hnsw_ef_construction: int = Field(default=80, ge=8)
    """HNSW build-time search depth."""
    hnsw_ef_search: int = Field(default=128, ge=8)
    """HNSW query-time search depth."""
    use_gpu: bool | None = None
    """None = GPU index when faiss sees a GPU (flat indexes only), else CPU."""


class ModelSettings(_Strict):
    dir: Path = Path("var/models")
    """Versioned model bundles live in `<dir>/<version>/`; `<dir>/CURRENT` names the live one."""


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    """gRPC bind address."""
    port: int = Field(default=50051, ge=0, le=65535)
    """Recommender service port (0 = any free port)."""
    admin_port: int = Field(default=50052, ge=0, le=65535)
    """Admin service port (ReloadModel, ModelInfo, ForgetUser)."""
    admin_token: str = DEFAULT_ADMIN_TOKEN
    """Bearer token the admin service and the console login require. Off loopback a server
    refuses to start with the default, an empty or a short (< 16 characters) token; on
    loopback it warns."""
    auth: Literal["keys", "none"] = "keys"
    """Public service access: `keys` = every call (health checks aside) needs an access key
    (`python -m online.keys`) holding the method's scope; while no key exists, a server bound
    to loopback only runs open with a warning and any other refuses to start. `none` = open
    to anyone who reaches the port (e.g. behind your own authenticating gateway)."""
    keys_file: Path | None = None
    """Access keys of the public service (sha256 hashes and scopes, never the keys), managed
    by `python -m online.keys`; a running server picks up changes within a second. Null =
    `<lake.root>/access_keys.json`, shared by every server on the lake."""
    tls_cert: Path | None = None
    """PEM certificate chain both gRPC ports serve TLS with (with `tls_key`); null =
    plaintext. The console and reload notifications trust this file as their root."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""
    tls_client_ca: Path | None = None
    """PEM CA certificates: when set, callers must present a certificate one of them signed
    (mutual TLS); the console and reload notifications present `tls_cert`."""
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    """Prometheus metrics HTTP port (0 disables)."""
    console_port: int = Field(default=8765, ge=0, le=65535)
    """Web console port (`make run`; 0 = any free port). Every page needs the admin login;
    HTTPS with `tls_cert`; it binds `server.host` like the gRPC ports."""
    workers: int = Field(default=8, ge=1)
    """gRPC handler threads."""
    ingest_concurrency: int = Field(default=1, ge=0)
    """IngestEvents calls worked on at once; others wait their turn. Validating and folding
    in events is Python work that holds the GIL, so a second concurrent batch does not ingest
    faster but delays every Recommend answered meanwhile. 0 = no bound."""
    ingest_queue: int = Field(default=3, ge=0)
    """IngestEvents calls that may wait for a turn (at most `workers` - `ingest_concurrency` -
    1, so requests always find a handler thread); one more is answered RESOURCE_EXHAUSTED."""
    ingest_wait_s: float = Field(default=2.0, ge=0)
    """Longest an IngestEvents call waits for its turn before RESOURCE_EXHAUSTED."""
    ingest_gate_min_events: int = Field(default=1000, ge=0)
    """IngestEvents calls with fewer events skip the turn-taking above: validating them
    holds the GIL for well under a millisecond, so they cannot starve Recommend (the rate
    limits bound how many arrive), and a shop's many small concurrent calls are never
    refused for being concurrent."""
    switch_interval_ms: float = Field(default=0.5, ge=0)
    """How long a thread holding the GIL keeps it while another waits
    (`sys.setswitchinterval`, process-wide). CPython's 5 ms lets a thread busy with an ingest
    batch delay each GIL hand-over a Recommend call needs by up to 5 ms. 0 = CPython's."""
    gc_full_threshold: int = Field(default=1000, ge=0)
    """Middle-generation garbage collections between two full ones (the third
    `gc.set_threshold` value, process-wide; CPython's is 10). A full collection stops every
    thread for a scan of the whole heap, which ingest grows (0.1-0.6 s here, every second or
    two during a flood at CPython's value). 0 = CPython's."""
    wal_dir: Path = Path("var/wal")
    """Write-ahead log directory for acknowledged events (one per replica)."""
    node_id: str | None = None
    """This replica's ingest node id (its bronze app transaction). Null: the id recorded in
    `<wal_dir>/NODE`, made at first start. A second live process with the same WAL directory
    or node id on one lake is refused."""
    wal_fsync_interval_ms: float = Field(default=2.0, ge=0)
    """Group-commit window: concurrent ingests share one fsync."""
    dedupe_window_days: float = Field(default=7.0, ge=0)
    """IngestEvents stays idempotent by event_id for at least this many days of arrival,
    across restarts and crashes (ids bronze received in the window are loaded at start,
    18 bytes each); 0 = only ids still in the WAL or seen since start."""
    flush_interval_s: float = Field(default=5.0, gt=0)
    """Flush the WAL to bronze at least this often."""
    drain_s: float = Field(default=0.0, ge=0, le=300)
    """On SIGTERM, keep answering this long after health turns NOT_SERVING (gRPC health and
    `/healthz` on the metrics port), so a front door's checks move new calls elsewhere
    before the ports close. The fleet sets it for its replicas; set it to a few check
    intervals behind a load balancer (Kubernetes: with the readiness probe's period)."""
    flush_max_events: int = Field(default=10_000, ge=1)
    """...or when this many events are pending."""
    reload_poll_s: float = Field(default=0.0, ge=0)
    """Poll the model CURRENT pointer this often; 0 disables polling."""
    max_models: int = Field(default=3, ge=1, le=16)
    """Most model versions held in memory at once: the champion (CURRENT) plus those the
    running experiment's arms name (`lake.experiments`); an experiment needing more is
    refused at creation. Each costs about (users + 2 x items) x factors x 4 bytes, plus
    ~0.2 KB per user and item id and 12 bytes per training interaction
    (docs/experiments.md)."""
    max_k: int = Field(default=500, ge=1)
    """Largest k a request may ask for."""
    max_batch: int = Field(default=10_000, ge=1)
    """Most events, items or Recommend requests in one call."""
    rate_limit_calls_per_s: int = Field(default=5_000, ge=0)
    """Public calls one access key (by name; calls without a key are not limited) may make
    per second on this server, every method counted; above it RESOURCE_EXHAUSTED with a
    retry hint (message and trailing metadata `retry-after-ms`). Each replica counts on its
    own. 0 = no limit."""
    rate_limit_events_per_s: int = Field(default=20_000, ge=0)
    """Events one access key may send per second on this server (IngestEvents; counted
    before validation, duplicates included), answered like `rate_limit_calls_per_s`. At
    least `max_batch` when set. 0 = no limit."""
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """gRPC max message size."""
    max_id_length: int = Field(default=256, ge=1)
    """Longest user/item/event id accepted."""
    max_event_value: float = Field(default=1e6, gt=0)
    """Largest magnitude of an event's `value` (rating, play count, quantity) accepted."""
    max_properties_bytes: int = Field(default=4096, ge=2)
    """Largest event `properties` accepted, in bytes of JSON."""
    max_properties_keys: int = Field(default=64, ge=0)
    """Most keys in one event's `properties`."""
    max_title_length: int = Field(default=1024, ge=1)
    """Longest item title accepted by UpsertItems."""
    overfetch: int = Field(default=4, ge=1)
    """ANN over-fetch factor so filters still leave k results."""
    exact_filter_max_rows: int = Field(default=20_000, ge=0)
    """A filter admitting at most this many items is searched exactly over its own rows."""
    recent_events_per_user: int = Field(default=500, ge=1)
    """Real-time interactions kept per user for fold-in."""
    seen_items_per_user: int = Field(default=5000, ge=1)
    """Most real-time "seen" item ids kept per user for exclude-seen (the oldest seen is
    forgotten first): bounds memory against a user sending endless distinct items."""
    new_item_min_interactions: int = Field(default=3, ge=1)
    """Interactions before an unknown item is folded in and indexed."""
    seen_event_types: list[str] = Field(default_factory=lambda: list(EVENT_TYPES))
    """Event types that make an item "seen" for exclude-seen."""
    popularity_half_life_days: float = Field(default=7.0, gt=0)
    """Decay of real-time popularity counts for the fallback."""
    popularity_max_items: int = Field(default=100_000, ge=1000)
    """Most items with real-time popularity counts (the least popular tenth is dropped
    when more arrive): bounds memory against floods of made-up item ids."""
    max_pending_items: int = Field(default=100_000, ge=10)
    """Most items unknown to the model remembered until they have enough interactions to
    be folded in (those touched by the fewest users are dropped first)."""
    max_online_users: int = Field(default=200_000, ge=1)
    """Most users with real-time state in memory (their recent events and seen items; a
    few hundred bytes for a user with a few events): beyond it the user seen least recently
    is dropped. Nothing acknowledged is lost: their events are in the WAL and the lake, the
    next model learns them, and their next event brings them back. A restart rebuilds the
    users who sent the latest events since the model's training, up to both caps."""
    max_online_events: int = Field(default=1_000_000, ge=1)
    """Most real-time events plus seen item ids (about 0.1 KB each) held across all online
    users, the users seen least recently dropped first: with `max_online_users` it bounds
    the online state's memory and the restart's replay. At least `recent_events_per_user` +
    `seen_items_per_user` (one user's most)."""

    @field_validator("max_online_events")
    @classmethod
    def _one_full_user_fits(cls, v: int, info: ValidationInfo) -> int:
        one_user = (info.data.get("recent_events_per_user") or 0) + \
            (info.data.get("seen_items_per_user") or 0)
        if v < one_user:
            raise ValueError(f"must be at least server.recent_events_per_user + "
                             f"server.seen_items_per_user ({one_user}): one user may hold "
                             "that many")
        return v

    @field_validator("rate_limit_events_per_s")
    @classmethod
    def _full_batch_fits(cls, v: int, info: ValidationInfo) -> int:
        max_batch = info.data.get("max_batch")
        if v and max_batch is not None and v < max_batch:
            raise ValueError(f"must be 0 (off) or at least server.max_batch ({max_batch}): "
                             "a full batch could never pass")
        return v


class DataSettings(_Strict):
    source: Literal["synthetic", "ml-100k", "ml-1m", "none"] = "synthetic"
    """Sample data loaded into an empty lake by `make run` / `make pipeline`; `none` loads
    nothing: start on an empty lake and fill it through the API (IngestEvents, UpsertItems)."""
    dir: Path = PROJECT_ROOT.parent / "shared" / "data"
    """Where the MovieLens folders live (`<dir>/ml-100k`, `<dir>/ml-1m`)."""
    synthetic_events: int = Field(default=200_000, ge=1)
    """Synthetic generator size: events."""
    synthetic_users: int = Field(default=5_000, ge=1)
    """Synthetic generator size: users."""
    synthetic_items: int = Field(default=2_000, ge=1)
    """Synthetic generator size: items."""
    seed: int = 7
    """Synthetic generator seed."""


class AirflowSettings(_Strict):
    spark_conn_id: str = "spark_default"
    """Airflow connection the DAG submits Spark jobs to."""
    reload_targets: list[str] | None = None
    """Admin endpoints asked to reload after publish (DAG and `make pipeline`); None = this
    configuration's own server, `server.host:server.admin_port`."""


class FleetSettings(_Strict):
    redis_url: str = ""
    """Redis 7 the replicas share their acknowledged events, availability changes and
    erasures through (a Stream); empty = a single process, nothing shared. `make run
    REPLICAS=N` (N > 1) starts its own `redis-server` when this is empty."""
    stream: str = "lambdarec:fleet"
    """Redis Stream key of the cross-replica channel."""
    stream_maxlen: int = Field(default=100_000, ge=100)
    """Entries (one per ingest batch, upsert or erasure) the stream retains, roughly: a
    replica that starts replays the retained events its peers have not flushed yet."""
    publish_buffer: int = Field(default=100_000, ge=1)
    """Messages a replica keeps while Redis is unreachable, sent when it is back (the oldest
    are dropped beyond this; ingest never waits for Redis)."""
    run_dir: Path = Path("var/run")
    """Where `make run REPLICAS=N` writes `fleet.json`, the HAProxy config and Redis' files."""


class ImpressionsSettings(_Strict):
    sample_rate: float = Field(default=1.0, ge=0, le=1)
    """Share of answers (Recommend, each RecommendBatch entry, SimilarItems) recorded in
    `bronze_impressions`, decided by a hash of the answer's `recommendation_id` (so every
    replay and every reader agrees); every answer carries an id either way. 0 = none."""
    write_interval_ms: float = Field(default=5.0, gt=0, le=1000)
    """Answers wait in memory at most about this long before a background thread appends
    them to the write-ahead log (one record for all of them): Recommend never waits for
    the log. A crash (kill -9, power loss) loses what waited, plus what was appended but
    not yet fsynced; a graceful stop loses nothing."""
    write_max: int = Field(default=2000, ge=1)
    """...or sooner, once this many impressions wait."""
    max_buffered: int = Field(default=100_000, ge=1)
    """Most impressions held in memory waiting for the log; beyond it (the log or the lake
    is stuck) new ones are dropped and counted (`lambdarec_impressions_dropped_total`),
    never refused to the caller."""


class AttributionSettings(_Strict):
    window_hours: float = Field(default=24.0, gt=0)
    """An event without a `recommendation_id` is attributed to the last list that showed its
    item to its user at most this many hours before it (`spark_jobs.attribution`)."""
    explicit_lookback_days: int = Field(default=30, ge=0)
    """How many days before an event the list its `recommendation_id` names is looked up;
    an older (or unknown) id leaves the event unattributed."""


class ExperimentsSettings(_Strict):
    min_users_per_arm: int = Field(default=1000, ge=2)
    """Fixed horizon: an experiment is decided at the first analysis where every arm has
    at least this many users with impressions; before that it is `collecting`, and the
    decision then made is kept by later analyses (no peeking)."""
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    """Significance level of the decision (two-sided); intervals are at 1 - alpha."""
    srm_alpha: float = Field(default=0.001, gt=0, lt=0.5)
    """A sample-ratio-mismatch p-value below this marks the result `invalid`: assignment
    or logging is broken and no decision is shown."""
    decision_metric: Literal["ctr", "conversion", "revenue_per_user"] = "ctr"
    """The metric the decision reads (revenue per user: its winsorised mean)."""
    revenue_winsor_quantile: float = Field(default=0.99, gt=0.5, le=1)
    """Revenue per user is capped at this quantile of the purchasers' revenue (all arms
    pooled) for `revenue_per_user_winsorised`; 1 = no cap."""


class Settings(_Strict):
    lake: LakeSettings = Field(default_factory=LakeSettings)
    spark: SparkSettings = Field(default_factory=SparkSettings)
    interactions: InteractionSettings = Field(default_factory=InteractionSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    blend: BlendSettings = Field(default_factory=BlendSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)
    impressions: ImpressionsSettings = Field(default_factory=ImpressionsSettings)
    attribution: AttributionSettings = Field(default_factory=AttributionSettings)
    experiments: ExperimentsSettings = Field(default_factory=ExperimentsSettings)

    def resolved(self, base: Path = PROJECT_ROOT) -> Settings:
        """Return a copy whose relative paths are anchored at `base` (the project root)."""
        data = self.model_dump()
        for section, key in (("lake", "root"), ("model", "dir"), ("server", "wal_dir"),
                             ("server", "keys_file"), ("server", "tls_cert"),
                             ("server", "tls_key"), ("server", "tls_client_ca"),
                             ("data", "dir"), ("fleet", "run_dir")):
            if data[section][key] is None:
                continue
            p = Path(data[section][key])
            data[section][key] = p if p.is_absolute() else (base / p)
        if data["airflow"]["reload_targets"] is None:
            srv = data["server"]
            data["airflow"]["reload_targets"] = [f"{srv['host']}:{srv['admin_port']}"]
        return Settings.model_validate(data)


def _set_dotted(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot override {'.'.join(keys)}: {k} is not a section")
    node[keys[-1]] = value


def _field_annotation(keys: list[str]) -> Any:
    """The type annotation of the setting at `keys` (None: no such setting)."""
    model: Any = Settings
    annotation: Any = None
    for k in keys:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        f = model.model_fields.get(k)
        if f is None:
            return None
        annotation = model = f.annotation
    return annotation


def _parse_env_value(name: str, raw: str, annotation: Any) -> Any:
    """An environment string as the value its field's type expects."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and \
        type(None) in args
    if optional and raw.strip().lower() in ("", "null", "none", "~"):
        return None
    inner = [a for a in args if a is not type(None)] if optional else [annotation]
    base = inner[0] if len(inner) == 1 else None
    origin = typing.get_origin(base)
    if origin in (list, dict) or base in (list, dict) or \
            (isinstance(base, type) and issubclass(base, BaseModel)):
        try:
            # BaseLoader: YAML/JSON flow syntax for the structure, but no YAML 1.1 scalar
            # resolution (`no` -> False, `0755` -> 493): every scalar stays a string and
            # pydantic reads it by the element's type, the same rule as a plain value.
            value = yaml.load(raw, Loader=yaml.BaseLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: cannot parse {raw!r} as a list or mapping: {exc}") \
                from exc
        want = dict if origin is dict or base is dict or origin is None else list
        if not isinstance(value, want):
            raise ConfigError(f"{name}: expected a {want.__name__} written as YAML/JSON, "
                              f"got {raw!r}")
        return value
    return raw  # text verbatim; pydantic reads numbers and booleans from their text


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """Turn `LAMBDAREC__SECTION__KEY=value` variables into a nested dict, each value
    parsed by its field's type."""
    tree: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__") if k]
        if len(keys) < 2:
            raise ConfigError(f"{name}: expected {ENV_PREFIX}<SECTION>__<KEY>")
        _set_dotted(tree, keys, _parse_env_value(name, raw, _field_annotation(keys)))
    return tree


def env_variable(loc: tuple[Any, ...], env: Mapping[str, str]) -> str | None:
    """The environment variable that set the setting at `loc` (or one of its parents)."""
    for n in range(len(loc), 1, -1):
        name = ENV_PREFIX + "__".join(str(p).upper() for p in loc[:n])
        if name in env:
            return name
    return None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load settings: defaults < YAML file < env < explicit `overrides` (a nested dict).

    Relative paths are resolved against the project root, so jobs behave the same
    whatever their working directory.
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get("LAMBDAREC_CONFIG") or (
            DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None
        )
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded
    data = _merge(data, env_overrides(env))
    if overrides:
        data = _merge(data, dict(overrides))
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(err, source, env) for err in exc.errors())
        raise ConfigError(problems) from exc
    return settings.resolved()


def _known_keys(loc: Sequence[str | int]) -> list[str]:
    """The field names allowed next to the key at `loc` (empty when not a settings model)."""
    model: Any = Settings
    for part in loc[:-1]:
        ann = getattr(getattr(model, "model_fields", {}).get(str(part)), "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe(err: Any, source: str, env: Mapping[str, str]) -> str:
    """One problem as `<where>: <dotted key>: <what>`, naming the environment variable when
    the value came from one, with a did-you-mean for a misspelt key."""
    dotted = ".".join(str(p) for p in err["loc"])
    name = env_variable(tuple(err["loc"]), env)
    where = f"environment variable {name}" if name else source
    if err["type"] == "extra_forbidden":
        known = _known_keys(err["loc"])
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        parent = ".".join(str(p) for p in err["loc"][:-1])
        hint = ""
        if close:
            hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?"
        elif known:
            hint = f"; known keys{' of ' + parent if parent else ''}: {', '.join(known)}"
        return f"{where}: unknown key {dotted}{hint}"
    return f"{where}: {dotted}: {err['msg']}"


def settings_table() -> str:
    """The configuration reference (docs/configuration.md), rendered from the model so the two
    cannot drift."""
    rows = ["| key | environment variable | default | meaning |", "|---|---|---|---|"]
    for section, field_info in Settings.model_fields.items():
        model = field_info.default_factory() if field_info.default_factory else None  # type: ignore[call-arg]
        if model is None:
            continue
        for key, f in type(model).model_fields.items():
            default = getattr(model, key)
            if isinstance(default, Path) and not default.is_absolute():
                shown = str(default)
            elif isinstance(default, Path):
                shown = "../shared/data"
            else:
                shown = str(default).replace("|", "\\|")
            doc = (f.description or "").replace("\n", " ")
            rows.append(
                f"| `{section}.{key}` | `{ENV_PREFIX}{section.upper()}__{key.upper()}` "
                f"| `{shown}` | {doc} |"
            )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lake.config",
        description="Print the configuration reference (docs/configuration.md), or check the "
                    "effective configuration (YAML file + LAMBDAREC__* environment).")
    p.add_argument("--check", action="store_true",
                   help="load the configuration and print it as JSON; a bad key or value "
                        "prints one line and exits 2")
    args = p.parse_args(argv)
    if not args.check:
        print(settings_table())
        return 0
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(settings.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
