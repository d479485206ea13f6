"""Experiments: a simulated shop proves the loop (attribution + analysis) tells the truth.

A tiny synthetic shop (`lake.synthetic.world`: users with known tastes over categories)
looks at recommendation lists and reacts with known probabilities:

- it **examines** position p (0-based) with probability `EXAMINE_DECAY ** p` (position
  bias: lower slots are seen less, whatever they hold);
- it **clicks** an examined item with probability `CLICK_FLOOR + CLICK_TASTE x w`, w the
  user's taste weight for the item's category (0 outside its three categories);
- it **buys** a clicked item with probability `BUY_P`, quantity 1 or 2;
- the shop sends a click's (and its purchase's) `recommendation_id` with probability
  `EXPLICIT_SHARE`; the other events carry none and are attributed by the window rule.

The true CTR of an arm is known in advance: the expected clicks of each list served
(sum over positions of examine x click probability) over the lists. An experiment's
measured lift is what `spark_jobs.attribution` + `spark_jobs.experiment_analysis` make of
the simulated events; the bench prints it next to the true lift, and over repeated runs:

- `experiments.aa_false_positive_rate`: A/A runs (the same ranking in both arms, a new salt
  each run) declared significant on the decision metric (CTR) at alpha = 0.05 — want about
  0.05 and at most 0.10 (more means the variance is wrong, far less a test too timid);
- `experiments.ab_power`: A/B runs (popularity as control against a taste-aware ranking)
  where the better arm wins significantly — want >= 0.80.

Two paths feed the same attribution and analysis:

- **direct** (`simulate_experiment`): lists made by known rankers in this process, users
  split by the real `lake.experiments.assign`; fast, so the figures come from many runs;
- **server** (`server_experiments`): the real gRPC server (`online.server` as a
  subprocess on 127.0.0.1, any free port) serving a bundle built from the shop, an
  experiment per run created through the Admin API; simulated users call RecommendBatch,
  send their events with the `recommendation_id` through IngestEvents; after a graceful
  stop the lake's `bronze_impressions` and events are compacted and attributed by the
  batch jobs. It needs the impressions and experiments serving of issue 23.

    python -m bench.run --only experiments [--quick]
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

    from bench.report import Report
    from lake.experiments import Experiment
    from lake.synthetic import World
    from spark_jobs.experiment_analysis import Analysis

K = 10
EXAMINE_DECAY = 0.8
CLICK_FLOOR = 0.01
CLICK_TASTE = 0.5
BUY_P = 0.15
EXPLICIT_SHARE = 0.5
ALPHA = 0.05
T0 = datetime(2026, 11, 20, 8, tzinfo=UTC)
"""When simulated traffic starts (a fixed day: the tables are reproducible)."""
SESSION_GAP = timedelta(minutes=30)
"""Between a user's lists (well within the 24 h attribution window)."""


@dataclass(frozen=True)
class Shop:
    """The simulated shop: the synthetic world and its known behaviour."""

    world: World
    item_ids: np.ndarray
    user_ids: np.ndarray

    @classmethod
    def make(cls, n_users: int = 4000, n_items: int = 400, seed: int = 11) -> Shop:
        from lake.synthetic import world

        w = world(n_users, n_items, seed, drift_share=0.0)
        return cls(w, np.char.add("i", np.arange(n_items).astype(str)),
                   np.char.add("u", np.arange(n_users).astype(str)))

    @property
    def n_users(self) -> int:
        return int(self.user_ids.size)

    def taste_matrix(self) -> np.ndarray:
        """[n_users, n_categories]: each user's taste weight per category."""
        u = self.world.users
        m = np.zeros((u.taste.shape[0], len(self.world.items.categories)))
        np.add.at(m, (np.arange(u.taste.shape[0])[:, None], u.taste), u.taste_weights)
        return m

    def click_p(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Click probability of examined items ([n, K] item indices for n users)."""
        taste = self.taste_matrix()
        w = taste[users[:, None], self.world.items.item_category[items]]
        return CLICK_FLOOR + CLICK_TASTE * w

    def expected_clicks(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Expected clicks of each list (position bias x click probability)."""
        examine = EXAMINE_DECAY ** np.arange(items.shape[1])
        return (self.click_p(users, items) * examine).sum(axis=1)

    def price(self, items: np.ndarray) -> np.ndarray:
        return self.world.items.price[items]


Ranker = Callable[[Shop, np.ndarray], np.ndarray]
"""(shop, user indices) -> [n, K] item indices of the lists those users are shown."""


def popularity_ranker(shop: Shop, users: np.ndarray) -> np.ndarray:
    """The same top-K by popularity for everyone (a holdout arm)."""
    top = np.argsort(-shop.world.items.popularity, kind="stable")[:K]
    return np.broadcast_to(top, (users.size, K)).copy()


def taste_ranker(shop: Shop, users: np.ndarray) -> np.ndarray:
    """Popularity within the user's tastes: score = taste weight x popularity (what a
    collaborative model learns from the shop's history, without its noise)."""
    taste = shop.taste_matrix()[users]
    scores = taste[:, shop.world.items.item_category] * shop.world.items.popularity
    return np.argsort(-scores, axis=1, kind="stable")[:, :K]


# --------------------------------------------------------------------------- behaviour


@dataclass
class Served:
    """Lists shown: one row per list."""

    user: np.ndarray
    """[n] user index."""
    items: np.ndarray
    """[n, K] item indices."""
    rec_ids: list[str]
    arm: list[str]
    ts: list[datetime]


def react(shop: Shop, served: Served, rng: np.random.Generator, seq: int = 0, *,
          delay: timedelta = timedelta(seconds=5)) -> list[dict[str, Any]]:
    """The events the simulated users send for `served` (silver-event dicts): a click on
    position p `delay` x (4 + p) after the list, its purchase 24 `delay`s later."""
    n = served.user.size
    examined = rng.random((n, K)) < EXAMINE_DECAY ** np.arange(K)
    clicked = examined & (rng.random((n, K)) < shop.click_p(served.user, served.items))
    bought = clicked & (rng.random((n, K)) < BUY_P)
    explicit = rng.random((n, K)) < EXPLICIT_SHARE
    quantity = 1 + (rng.random((n, K)) < 0.3)
    events: list[dict[str, Any]] = []
    rows, cols = np.nonzero(clicked)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        user = str(shop.user_ids[served.user[r]])
        item = str(shop.item_ids[served.items[r, c]])
        rec = served.rec_ids[r] if explicit[r, c] else ""
        ts = served.ts[r] + delay * (4 + c)
        seq += 1
        events.append(_event(f"c{seq}", user, item, "click", ts, rec))
        if bought[r, c]:
            events.append(_event(f"p{seq}", user, item, "purchase", ts + delay * 24,
                                 rec, float(quantity[r, c])))
    return events


def _event(eid: str, user: str, item: str, etype: str, ts: datetime, rec: str,
           value: float | None = None) -> dict[str, Any]:
    return {"event_id": eid, "user_id": user, "item_id": item, "event_type": etype,
            "value": value, "ts": ts, "received_at": ts, "tenant": "",
            "recommendation_id": rec}


# --------------------------------------------------------------------------- direct path


def experiment(name: str, arms: Sequence[str], salt: str) -> Experiment:
    from lake.experiments import new_experiment

    share = 1.0 / len(arms)
    return new_experiment(name, [{"name": a, "share": share} for a in arms], salt=salt,
                          now=T0)


def serve_direct(shop: Shop, exp: Experiment, rankers: dict[str, Ranker],
                 lists_per_user: int, users: np.ndarray) -> Served:
    """Lists the rankers give each user's arm (`lake.experiments.assign`), one every
    `SESSION_GAP` per user."""
    from lake.experiments import assign

    arm_of = np.array([assign(exp, str(shop.user_ids[u])) or "" for u in users])
    user_rows, item_rows, arms = [], [], []
    for arm, ranker in rankers.items():
        mine = users[arm_of == arm]
        if mine.size:
            lists = ranker(shop, mine)
            user_rows.append(np.repeat(mine, lists_per_user))
            item_rows.append(np.repeat(lists, lists_per_user, axis=0))
            arms += [arm] * (mine.size * lists_per_user)
    user = np.concatenate(user_rows)
    n = user.size
    nth = np.tile(np.arange(lists_per_user), n // lists_per_user)
    ts = [T0 + int(k) * SESSION_GAP + timedelta(seconds=int(u % 600)) for k, u in
          zip(nth, user, strict=True)]
    rec_ids = [f"{exp.experiment_id}-{i}" for i in range(n)]
    return Served(user, np.concatenate(item_rows), rec_ids, arms, ts)


def impressions_table(shop: Shop, served: Served, experiment_id: str) -> pa.Table:
    """`served` as `bronze_impressions` rows (the issue-23 contract's columns)."""
    import pyarrow as pa

    from lake import schemas

    items = [[{"item_id": str(shop.item_ids[i]), "position": p, "score": 1.0 - 0.01 * p}
              for p, i in enumerate(row)] for row in served.items.tolist()]
    n = served.user.size
    table = {
        "recommendation_id": served.rec_ids, "tenant": [""] * n, "surface": ["recommend"] * n,
        "user_id": [str(shop.user_ids[u]) for u in served.user], "anchor_item_id": [None] * n,
        "items": items, "model_version": ["sim"] * n, "strategy": ["personalised"] * n,
        "experiment_id": [experiment_id] * n, "arm": served.arm, "context": [""] * n,
        "ts": served.ts, "impression_date": [t.date() for t in served.ts],
    }
    return pa.Table.from_pylist([dict(zip(table, r, strict=True)) for r in zip(*table.values(),
                                                                                strict=True)],
                                schema=schemas.BRONZE_IMPRESSIONS.schema)


def events_table(events: list[dict[str, Any]]) -> pa.Table:
    import pyarrow as pa

    from lake.schemas import TS

    return pa.Table.from_pylist(events, schema=pa.schema([
        ("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()),
        ("event_type", pa.string()), ("value", pa.float64()), ("ts", TS),
        ("received_at", TS), ("tenant", pa.string()), ("recommendation_id", pa.string())]))


def items_table(shop: Shop) -> pa.Table:
    import pyarrow as pa

    return pa.table({"item_id": shop.item_ids.tolist(),
                     "price": shop.world.items.price.astype(np.float64)})


@dataclass
class Outcome:
    """One simulated experiment: what the analysis said and what was true."""

    analysis: Analysis
    true_ctr: dict[str, float]
    """Per arm: expected clicks per list of the lists it served."""

    @property
    def treatment(self) -> str:
        return list(self.true_ctr)[1]

    def row(self, metric: str = "ctr") -> dict[str, Any]:
        return next(r for r in self.analysis.rows
                    if r["arm"] == self.treatment and r["metric"] == metric)

    @property
    def significant(self) -> bool:
        p = self.row()["pvalue"]
        return p is not None and p < ALPHA

    @property
    def measured_lift(self) -> float:
        return float(self.row()["rel_lift"])

    @property
    def true_lift(self) -> float:
        """The lift of the expected CTRs of the lists the arms served."""
        control, treatment = self.true_ctr.values()
        return treatment / control - 1

    @property
    def covers_true_lift(self) -> bool:
        r = self.row()
        return r["rel_lift_ci_lower"] <= self.true_lift <= r["rel_lift_ci_upper"]


def analyse_tables(shop: Shop, served: Served, events: list[dict[str, Any]],
                   exp: Experiment, impressions: pa.Table) -> Outcome:
    """Attribution + analysis (the batch jobs' Arrow transforms) of one experiment."""
    from spark_jobs.attribution import attribute_events_arrow
    from spark_jobs.experiment_analysis import analyse, per_user_table, spec_of

    attributed = attribute_events_arrow(events_table(events), impressions, items_table(shop),
                                        window_hours=24.0)
    per_user, _ = per_user_table(impressions, attributed, exp.experiment_id)
    spec = spec_of(exp)
    analysis = analyse(per_user, spec.arms, alpha=ALPHA, min_users_per_arm=2)
    expected = shop.expected_clicks(served.user, served.items)
    arms = np.asarray(served.arm)
    true_ctr = {a.name: float(expected[arms == a.name].mean()) for a in spec.arms}
    return Outcome(analysis, true_ctr)


def simulate_experiment(shop: Shop, rankers: dict[str, Ranker], *, seed: int,
                        n_users: int = 2000, lists_per_user: int = 3) -> Outcome:
    """One experiment on the direct path: a new salt, `n_users` users drawn from the shop,
    lists from `rankers` (arm name -> ranker; the first is the control)."""
    rng = np.random.default_rng(seed)
    users = rng.choice(shop.n_users, size=min(n_users, shop.n_users), replace=False)
    exp = experiment(f"sim-{seed}", list(rankers), salt=f"salt-{seed}")
    served = serve_direct(shop, exp, rankers, lists_per_user, users)
    events = react(shop, served, rng)
    return analyse_tables(shop, served, events, exp,
                          impressions_table(shop, served, exp.experiment_id))


def population_ctr(shop: Shop, ranker: Ranker) -> float:
    """The true CTR of a ranker: expected clicks per list over every user of the shop."""
    users = np.arange(shop.n_users)
    return float(shop.expected_clicks(users, ranker(shop, users)).mean())


def true_lift(shop: Shop, rankers: dict[str, Ranker]) -> float:
    """The treatment's true relative CTR lift over the control (0 for an A/A)."""
    control, treatment = rankers.values()
    if control is treatment:
        return 0.0
    return population_ctr(shop, treatment) / population_ctr(shop, control) - 1


@dataclass
class Summary:
    runs: int
    significant: int
    measured_lift: float
    """Mean over the runs."""
    true_lift: float
    """Of the whole shop's users (`true_lift`)."""
    covered: int
    """Runs whose lift interval held the true lift of the lists they served."""
    seconds: float

    @property
    def rate(self) -> float:
        return self.significant / self.runs if self.runs else float("nan")


def repeat(shop: Shop, rankers: dict[str, Ranker], runs: int, *, seed: int = 0,
           n_users: int = 2000, lists_per_user: int = 3,
           wins: Callable[[Outcome], bool] | None = None) -> Summary:
    """`runs` experiments (seeds `seed ..`): how many were significant (or `wins`)."""
    t0 = time.perf_counter()
    hits, covered, measured = 0, 0, []
    for i in range(runs):
        o = simulate_experiment(shop, rankers, seed=seed + i, n_users=n_users,
                                lists_per_user=lists_per_user)
        hits += bool(wins(o) if wins else o.significant)
        covered += o.covers_true_lift
        measured.append(o.measured_lift)
    return Summary(runs, hits, float(np.mean(measured)), true_lift(shop, rankers), covered,
                   time.perf_counter() - t0)


def better_wins(o: Outcome) -> bool:
    """The treatment (the better arm) wins significantly: p < alpha and a positive lift."""
    return o.significant and o.measured_lift > 0


AA: dict[str, Ranker] = {"control": taste_ranker, "treatment": taste_ranker}
AB: dict[str, Ranker] = {"control": popularity_ranker, "treatment": taste_ranker}


# --------------------------------------------------------------------------- server path


class ServerPathUnavailable(RuntimeError):
    """The server in this tree cannot run experiments end to end (yet)."""


EVENT_WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0}
MODEL_VERSION = "vsim"
TOKEN = "bench-experiments-admin-token"


def build_model(shop: Shop, models_dir: Any, *, n_events: int = 80_000, seed: int = 11) -> str:
    """Train implicit ALS on the shop's own history (`lake.synthetic.generate`, the same
    world) and publish it as the bundle CURRENT names; returns its version."""
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    from lake.bundle import set_current, write_bundle
    from lake.config import IndexSettings, TrainSettings
    from lake.foldin import FoldInParams
    from lake.synthetic import generate_table
    from lake.vector_index import build_and_save
    from spark_jobs.als import implicit_model

    n_users, n_items = shop.n_users, int(shop.item_ids.size)
    events = generate_table(n_events, n_users, n_items, seed, drift_share=0.0)
    users = np.char.lstrip(np.asarray(events["user_id"].to_pylist(), dtype=str), "u")
    items = np.char.lstrip(np.asarray(events["item_id"].to_pylist(), dtype=str), "i")
    weights = np.array([EVENT_WEIGHTS[t] for t in events["event_type"].to_pylist()])
    csr = sp.csr_matrix((weights.astype(np.float32), (users.astype(int), items.astype(int))),
                        shape=(n_users, n_items))
    csr.sum_duplicates()
    train = TrainSettings(factors=32, iterations=12, regularization=10.0, alpha=2.0)
    cui = csr.copy()
    cui.data += np.float32(1.0 / train.alpha)  # confidence 1 + alpha r, as ImplicitTrainer
    with threadpool_limits(1, "blas"):
        model = implicit_model(train)  # loads implicit's BLAS inside the limit
        model.fit(cui, show_progress=False)
    write_bundle(
        models_dir, MODEL_VERSION, user_ids=shop.user_ids, item_ids=shop.item_ids,
        user_factors=np.asarray(model.user_factors, np.float32),
        item_factors=np.asarray(model.item_factors, np.float32), user_items=csr,
        item_popularity=np.asarray(csr.sum(axis=0)).ravel(),
        foldin=FoldInParams.for_backend("implicit", alpha=train.alpha,
                                        regularization=train.effective_regularization),
        backend="implicit", params={"factors": train.factors, "simulated_shop": True},
        write_index=lambda f, path: build_and_save(f, path, IndexSettings()))
    set_current(models_dir, MODEL_VERSION)
    return MODEL_VERSION


def _index(ids: Sequence[str], prefix: str) -> np.ndarray:
    return np.array([int(i.removeprefix(prefix)) for i in ids], dtype=np.int64)


def serve_through(client: Any, shop: Shop, exp_id: str, users: np.ndarray,
                  batch: int = 100) -> Served:
    """One RecommendBatch answer per user; every answer must carry its recommendation_id
    and the experiment's arm."""
    user_rows, item_rows, rec_ids, arms, ts = [], [], [], [], []
    for lo in range(0, users.size, batch):
        chunk = users[lo:lo + batch]
        # exclude_seen off: every run compares the same two rankings, however much the
        # simulated users clicked in earlier runs
        resp = client.recommend_batch([{"user_id": str(shop.user_ids[u]), "k": K,
                                        "exclude_seen": False} for u in chunk])
        now = datetime.now(UTC)
        for u, r in zip(chunk.tolist(), resp.responses, strict=True):
            if not r.recommendation_id:
                raise ServerPathUnavailable("RecommendResponse.recommendation_id is empty: "
                                            "the server records no impressions")
            if r.experiment_id != exp_id or not r.arm:
                raise ServerPathUnavailable(f"user {u} was served experiment "
                                            f"{r.experiment_id!r} arm {r.arm!r}, not {exp_id}")
            got = [it.item_id for it in r.items][:K]
            if len(got) < K:
                continue
            user_rows.append(u)
            item_rows.append(_index(got, "i"))
            rec_ids.append(r.recommendation_id)
            arms.append(r.arm)
            ts.append(now)
    return Served(np.asarray(user_rows, np.int64), np.vstack(item_rows), rec_ids, arms, ts)


def _send(client: Any, events: list[dict[str, Any]], batch: int = 500) -> None:
    from lambdarec_client.client import make_event

    for lo in range(0, len(events), batch):
        resp = client.ingest([make_event(e) for e in events[lo:lo + batch]], timeout=60.0)
        if resp.rejected:
            raise RuntimeError(f"IngestEvents rejected {len(resp.rejected)} events: "
                               f"{resp.rejected[0].reason}")


SERVER_DELAY = timedelta(milliseconds=1)
"""Simulated reaction times on the server path (the next lists follow at once)."""


def _sleep_past(ts: datetime | None) -> None:
    if ts is not None:
        time.sleep(max(0.0, (ts - datetime.now(UTC)).total_seconds()) + 0.002)


def _wait_for(client: Any, shop: Shop, exp_id: str, timeout: float = 15.0) -> None:
    """Until the server serves the new experiment (it re-reads the file within ~1 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.recommend(str(shop.user_ids[0]), K)
        if r.experiment_id == exp_id:
            return
        time.sleep(0.2)
    raise ServerPathUnavailable(f"the server did not serve experiment {exp_id} within "
                                f"{timeout:.0f} s")


@dataclass
class ServerRun:
    kind: str
    """"A/A" or "A/B"."""
    experiment_id: str
    true_ctr: dict[str, float]


def server_experiments(shop: Shop, *, aa_runs: int, ab_runs: int, n_users: int = 1000,
                       rounds: int = 3, seed: int = 0) -> dict[str, Any]:
    """A/A and A/B experiments through the real server, attributed and analysed by the
    batch jobs on the lake it wrote (see the module docstring)."""
    from bench.fixtures import scratch_dir
    from lake.config import load_settings
    from lake.synthetic import catalogue
    from lake.tables import Lake

    t0 = time.perf_counter()
    work = scratch_dir("lambdarec-bench-experiments-")
    try:
        lake_root, models = work / "lake", work / "models"
        Lake(lake_root).append("items", catalogue(int(shop.item_ids.size), 11, updated_at=T0))
        build_model(shop, models)
        runs = _serve_runs(shop, work, aa_runs=aa_runs, ab_runs=ab_runs, n_users=n_users,
                           rounds=rounds, seed=seed)
        settings = load_settings(env={}, overrides={
            "lake": {"root": str(lake_root)}, "model": {"dir": str(models)},
            "spark": {"engine": "arrow"}, "experiments": {"min_users_per_arm": 2}})
        outcomes, attributed = analyse_lake(settings, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    took = time.perf_counter() - t0
    out: dict[str, Any] = {}
    for kind in ("A/A", "A/B"):
        mine = [o for r, o in zip(runs, outcomes, strict=True) if r.kind == kind]
        if not mine:
            continue
        hits = sum(o.significant if kind == "A/A" else better_wins(o) for o in mine)
        out[kind] = Summary(len(mine), hits, float(np.mean([o.measured_lift for o in mine])),
                            float(np.mean([o.true_lift for o in mine])),
                            sum(o.covers_true_lift for o in mine), took)
    out["attribution"] = attributed
    return out


def _serve_runs(shop: Shop, work: Path, *, aa_runs: int, ab_runs: int, n_users: int,
                rounds: int, seed: int) -> list[ServerRun]:
    """`python -m online.server` on `work`'s lake and models: one experiment per run
    (created, served to `n_users` users `rounds` times, their events sent, stopped); a
    graceful stop at the end flushes the WAL (events and impressions) to bronze."""
    import subprocess

    from lambdarec_client import Client

    from bench.fixtures import thread_env, wait_serving
    from lake.config import PROJECT_ROOT
    from online.ports import free_port

    port, admin = free_port(), free_port()
    env = {"LAMBDAREC__LAKE__ROOT": str(work / "lake"),
           "LAMBDAREC__MODEL__DIR": str(work / "models"),
           "LAMBDAREC__SERVER__WAL_DIR": str(work / "wal"),
           "LAMBDAREC__SERVER__HOST": "127.0.0.1", "LAMBDAREC__SERVER__PORT": str(port),
           "LAMBDAREC__SERVER__ADMIN_PORT": str(admin),
           "LAMBDAREC__SERVER__METRICS_PORT": "0", "LAMBDAREC__SERVER__AUTH": "none",
           "LAMBDAREC__SERVER__ADMIN_TOKEN": TOKEN,
           "LAMBDAREC__SERVER__RATE_LIMIT_CALLS_PER_S": "0",
           "LAMBDAREC__SERVER__RATE_LIMIT_EVENTS_PER_S": "0"}
    log_path = work / "server.log"
    runs: list[ServerRun] = []
    rng = np.random.default_rng(seed)
    with log_path.open("wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "online.server"], cwd=PROJECT_ROOT,
                                env=thread_env(env), stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        target = f"127.0.0.1:{port}"
        wait_serving(target, proc, 120.0, log_path)
        with Client(target, f"127.0.0.1:{admin}", token=TOKEN, timeout=30.0) as client:
            plan = [("A/A", i) for i in range(aa_runs)] + [("A/B", i) for i in range(ab_runs)]
            for kind, i in plan:
                arms = ([{"name": "control", "share": 0.5}, {"name": "treatment", "share": 0.5}]
                        if kind == "A/A" else
                        [{"name": "control", "share": 0.5, "popularity": True},
                         {"name": "treatment", "share": 0.5}])
                exp = client.create_experiment(f"sim-{kind}-{i}", arms,
                                               salt=f"bench-{kind}-{seed}-{i}")
                _wait_for(client, shop, exp.experiment_id)
                users = rng.choice(shop.n_users, size=min(n_users, shop.n_users),
                                   replace=False)
                expected: dict[str, list[float]] = {"control": [], "treatment": []}
                for rnd in range(rounds):
                    served = serve_through(client, shop, exp.experiment_id, users)
                    e = shop.expected_clicks(served.user, served.items)
                    for arm in expected:
                        expected[arm] += e[np.asarray(served.arm) == arm].tolist()
                    # events must not be later than what the users are shown next: the
                    # window rule would give them to those lists (another run's arm)
                    events = react(shop, served, rng, seq=len(runs) * 10**7 + rnd * 10**6,
                                   delay=SERVER_DELAY)
                    _send(client, events)
                    _sleep_past(max((e["ts"] for e in events), default=None))
                client.stop_experiment(exp.experiment_id)
                runs.append(ServerRun(kind, exp.experiment_id,
                                      {a: float(np.mean(v)) for a, v in expected.items()}))
    finally:
        if proc.poll() is None:
            proc.terminate()  # graceful: flushes the WAL (events, impressions) to bronze
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return runs


def analyse_lake(settings: Any, runs: Sequence[ServerRun]
                 ) -> tuple[list[Outcome], dict[str, Any]]:
    """Compaction, attribution and the analysis of each run's experiment on the lake;
    returns the outcomes and the attribution job's result."""
    from lake.experiments import ExperimentStore, experiments_file
    from lake.tables import Lake
    from spark_jobs import attribution, compact
    from spark_jobs.experiment_analysis import analyse_experiment, spec_of

    lake = Lake.from_settings(settings.lake)
    compact.run(settings)
    store = ExperimentStore(experiments_file(settings))
    found = {e.experiment_id: e for e in store.load()}
    days = sorted({found[r.experiment_id].started_at.date() for r in runs}
                  | {datetime.now(UTC).date()})
    attributed = attribution.run(settings, start=days[0], end=days[-1])
    outcomes = []
    for r in runs:
        _, analysis, _ = analyse_experiment(lake, spec_of(found[r.experiment_id]), days[-1],
                                            settings.experiments)
        outcomes.append(Outcome(analysis, r.true_ctr))
    return outcomes, attributed


# --------------------------------------------------------------------------- bench entry


def _attribution_line(server: dict[str, Any]) -> str:
    a = server.get("attribution") or {}
    return (f"{a.get('attributed')} of {a.get('events')} clicks and purchases attributed "
            f"({a.get('explicit')} by their recommendation_id, {a.get('window')} by the "
            f"window rule), {a.get('unattributed_claims')} recommendation_ids that did not "
            f"hold; {a.get('impressions')} impressions in the lake.")


def _rows(named: Sequence[tuple[str, Summary]]) -> list[str]:
    return [
        "| runs | significant | share | mean measured lift | true lift | interval held "
        "the truth | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(f"| {name} | {x.significant}/{x.runs} | {x.rate:.3f} | {x.measured_lift:+.4f} | "
          f"{x.true_lift:+.4f} | {x.covered}/{x.runs} | {x.seconds:.0f} |"
          for name, x in named),
    ]


def run(report: Report, *, aa_runs: int = 200, ab_runs: int = 100, n_users: int = 2000,
        server_runs: tuple[int, int] = (40, 10), server_users: int = 1000) -> dict[str, Any]:
    """Run both paths and print the figures: `experiments.aa_false_positive_rate`,
    `experiments.ab_power` and `experiments.ab_measured_lift` (against the true lift) from
    the server path, `experiments.direct_*` from the direct one. Without a server path
    (`server_runs` (0, 0), or a server that cannot run it yet: the note says why) the named
    figures come from the direct path."""
    shop = Shop.make()
    aa = repeat(shop, AA, aa_runs, seed=1_000, n_users=n_users)
    ab = repeat(shop, AB, ab_runs, seed=5_000, n_users=n_users, wins=better_wins)
    out: dict[str, Any] = {"direct": {"aa": aa, "ab": ab}}
    server: dict[str, Any] | None = None
    why = "not asked for (server_runs 0)"
    if any(server_runs):
        try:
            server = server_experiments(shop, aa_runs=server_runs[0], ab_runs=server_runs[1],
                                        n_users=server_users)
        except ServerPathUnavailable as exc:
            why = str(exc)
            print(f"[bench] experiments: server path unavailable: {why}", file=sys.stderr,
                  flush=True)
    named_aa, named_ab = (server["A/A"], server["A/B"]) if server else (aa, ab)
    report.add("experiments.aa_false_positive_rate", named_aa.rate, "share of A/A runs",
               "nominal alpha", ALPHA)
    report.add("experiments.ab_power", named_ab.rate, "share of A/B runs", "wanted", 0.80)
    report.add("experiments.ab_measured_lift", named_ab.measured_lift, "relative CTR lift",
               "true lift (simulator)", named_ab.true_lift)
    if server:
        out["server"] = server
        report.add("experiments.direct_aa_false_positive_rate", aa.rate, "share of A/A runs",
                   "nominal alpha", ALPHA)
        report.add("experiments.direct_ab_power", ab.rate, "share of A/B runs", "wanted", 0.80)
        report.add("experiments.direct_ab_measured_lift", ab.measured_lift,
                   "relative CTR lift", "true lift (simulator)", ab.true_lift)
    lines = [
        f"Simulated shop: {shop.n_users} users with known tastes, lists of {K}, "
        f"position bias {EXAMINE_DECAY}^p, click {CLICK_FLOOR} + {CLICK_TASTE} x taste, "
        f"buy {BUY_P:.0%} of clicks, {EXPLICIT_SHARE:.0%} of events with their "
        "recommendation_id (the rest attributed by the window rule). Significant: p < "
        f"{ALPHA} on CTR (per-user delta method).",
        "",
        "**Through the server**: " + (
            f"{server['A/A'].runs} A/A and {server['A/B'].runs} A/B experiments of "
            f"{server_users} users x 3 RecommendBatch rounds, created with the Admin API; "
            "true lift = of the expected CTRs of the lists each arm served. Attribution: "
            + _attribution_line(server) if server else f"not run: {why}."),
        "",
        *(_rows([("A/A", server["A/A"]), ("A/B (popularity vs the trained model)",
                                          server["A/B"])]) if server else []),
        "",
        f"**Direct path**: {aa.runs} A/A and {ab.runs} A/B experiments of {n_users} users x 3 "
        "lists from known rankers, split by `lake.experiments.assign`; true lift = of the "
        "rankers over the whole shop.",
        "",
        *_rows([("A/A", aa), ("A/B (popularity vs taste)", ab)]),
    ]
    report.note("Experiments: A/A false positives, A/B power, measured vs true lift",
                "\n".join(lines))
    for path, (a, b) in ([("server", (server["A/A"], server["A/B"]))] if server else []) + \
            [("direct", (aa, ab))]:
        print(f"[bench] experiments {path}: A/A {a.significant}/{a.runs}, A/B "
              f"{b.significant}/{b.runs}, lift {b.measured_lift:+.3f} vs true "
              f"{b.true_lift:+.3f}", file=sys.stderr, flush=True)
    return out
