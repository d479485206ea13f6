"""The evaluation's sample of test users, shared by the train and evaluate jobs.

At scale the evaluation scores a sample of the test users (`evaluate.max_eval_users`,
`max_eval_cells`: 3,000 of 50,000 users at 20k items). Their held-out pairs are then a
small share of all pairs (1.6% of the synthetic 2M log), and fitting the recipe a second
time on the training split just to score them costs as much as the training itself. So,
when that share is at most `evaluate.reuse_fit_max_share`:

1. the train job fits on every pair but the sampled users' held-out ones, then re-solves
   those users on all their pairs (the exact ALS user step against the final item
   factors, `spark_jobs.als.scaled_half_step`), so the bundle serves them as if nothing had
   been left out; the staged model records the `fingerprint` of the pairs it left out;
2. the evaluate job solves the same users from their training-split rows against the
   staged item factors and scores them: no second fit. It does so only when its own
   sample has the fingerprint the staged model recorded, and refits otherwise.

The item factors evaluated are then the shipped ones. They also learned from the other
test users' held-out pairs, which the refit leaves out, but never from the scored users'
own. On the 2M log both protocols gave the same NDCG@10 to 4 decimals (0.1445), with
recall@20 0.2398 against 0.2403. Where every test user is scored (MovieLens-sized data),
the share is the holdout's own (~20%) and the evaluation refits as before.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from lake.config import EvaluateSettings, Settings
from spark_jobs.als import ALSFactors, scaled_half_step
from spark_jobs.cli import JobError
from spark_jobs.matrix import InteractionMatrix, lookup_ids
from spark_jobs.recipe import sample_users, tuning_path
from spark_jobs.splits import tuning_users

if TYPE_CHECKING:
    from lake.foldin import FoldInParams
    from lake.strength import StrengthParams
    from spark_jobs.event_log import EventLog, Holdout

HELD_OUT_KEY = "eval_held_out"
"""The staged model's `info` key: what its fit left out (fingerprint, users, pairs, share)."""


@dataclass(frozen=True)
class EvalSample:
    """The test users the evaluation scores, with what the train job needs to leave out."""

    users: np.ndarray
    """Sorted row codes (of the event log) of the scored users."""
    train: sp.csr_matrix
    """The recipe's strengths of the training events (event-log codes)."""
    item_ids: np.ndarray
    """str ids of `train`'s columns."""
    held_user_ids: np.ndarray
    """str ids of the scored users' held-out pairs, with `held_item_ids`."""
    held_item_ids: np.ndarray
    total_pairs: int
    """Training pairs plus every held-out pair: what a production fit sees."""
    excluded_tuning_users: int

    @property
    def held_share(self) -> float:
        """The scored users' held-out pairs as a share of all pairs."""
        return len(self.held_user_ids) / max(self.total_pairs, 1)

    @property
    def facts(self) -> dict[str, float | int]:
        return {"n_test_users": int(len(self.users)), "held_out_share": self.held_share}

    @property
    def fingerprint(self) -> str:
        """Names the set of held-out pairs (ids, not codes: the train job reads gold's)."""
        h = hashlib.sha256()
        for u, i in zip(self.held_user_ids.tolist(), self.held_item_ids.tolist(), strict=True):
            h.update(f"{u}\t{i}\n".encode())
        return h.hexdigest()[:16]


def eval_user_limit(ev: EvaluateSettings, n_items: int) -> int:
    """How many test users to score: `max_eval_users`, fewer when users x items would pass
    `max_eval_cells`, never below `min_test_users` (the gate's own minimum)."""
    return max(ev.min_test_users, min(ev.max_eval_users, ev.max_eval_cells // max(n_items, 1)))


def searched_users(log: EventLog, settings: Settings, version: str) -> np.ndarray | None:
    """The users the recipe search of `version` scored (None when no search ran): the
    evaluation leaves them out, so the recipe is never judged on the users it was picked on."""
    if not tuning_path(settings.model.dir, version).exists():
        return None
    return tuning_users(log.user_ids, settings.tune.validation_users, settings.train.seed)


def eval_sample(log: EventLog, test: Holdout, strength: StrengthParams, settings: Settings,
                exclude: np.ndarray | None = None) -> EvalSample:
    """The scored users: a seeded sample of the test users with training events.

    Args:
        exclude: bool mask over users not to score (the users the recipe search scored).
    """
    matrix = log.matrix(strength, test.train_events)
    candidates = test.test
    if exclude is not None:
        candidates = sp.diags((~exclude).astype(np.float64)) @ test.test
        candidates.eliminate_zeros()
    users = sample_users(candidates, eval_user_limit(settings.evaluate, matrix.shape[1]),
                         settings.train.seed)
    users = users[np.diff(matrix.indptr)[users] > 0]  # users with nothing to train on: cold
    if len(users) == 0:
        raise JobError("the holdout has no test users with training events")
    held = sp.csr_matrix(test.test)[users].tocoo()  # canonical: sorted by (user, item) id
    return EvalSample(
        users=users, train=matrix, item_ids=log.item_ids,
        held_user_ids=log.user_ids[users[held.row]], held_item_ids=log.item_ids[held.col],
        total_pairs=int(matrix.nnz + test.test.nnz),
        excluded_tuning_users=int(exclude.sum()) if exclude is not None else 0)


def version_sample(log: EventLog, test: Holdout, strength: StrengthParams, settings: Settings,
                   version: str) -> EvalSample:
    """`eval_sample` for staged `version`: the users its recipe search scored are left out."""
    return eval_sample(log, test, strength, settings,
                       exclude=searched_users(log, settings, version))


def leave_out(matrix: InteractionMatrix, sample: EvalSample) -> sp.csr_matrix | None:
    """`matrix`'s strengths without the sample's held-out pairs; None when one of them is
    not in `matrix` (gold and the event log disagree: the evaluation then refits)."""
    rows = matrix.user_index(sample.held_user_ids)
    cols = matrix.item_index(sample.held_item_ids)
    if (rows < 0).any() or (cols < 0).any():
        return None
    held = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=matrix.shape)
    kept = sp.csr_matrix(matrix.csr - matrix.csr.multiply(held))
    kept.eliminate_zeros()
    return kept


def resolve_users(strengths: sp.csr_matrix, item_factors: np.ndarray,
                  params: FoldInParams) -> np.ndarray:
    """The exact ALS user step for every row of `strengths` (what fold-in computes)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        return scaled_half_step(strengths, item_factors, params.alpha, params.regularization,
                                params.reg_exponent)


def staged_factors(item_ids: np.ndarray, item_factors: np.ndarray, params: FoldInParams,
                   sample: EvalSample) -> tuple[ALSFactors, float] | None:
    """Factors in event-log codes for scoring the sample: the staged item factors, the
    sampled users solved from their training rows (others 0). None when an item of the log
    has no staged factor. Also returns the seconds the solve took."""
    cols = lookup_ids(item_ids, sample.item_ids)
    if (cols < 0).any():
        return None
    t0 = time.perf_counter()
    y = np.ascontiguousarray(item_factors[cols])
    x = np.zeros((sample.train.shape[0], y.shape[1]), dtype=np.float32)
    x[sample.users] = resolve_users(sample.train[sample.users], y, params)
    return ALSFactors(x, y, params, {}), round(time.perf_counter() - t0, 3)
