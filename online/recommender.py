"""Recommend / SimilarItems: fold-in, FAISS over-fetch, business filters, explanations,
popularity fallback. Pure request logic: no gRPC types here (see `online.service`).

Every request takes the model reference once (`manager.current`) and uses only that
object, so a model swap in the middle of a request cannot mix two models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from lake.config import Settings
from lake.foldin import contributions
from online.catalog import Catalog, RowView
from online.errors import NoModel, NotFound
from online.experiment_arms import Assignment
from online.loaded_model import LoadedModel
from online.model_manager import ModelManager
from online.row_filters import RowFilterIndex
from online.state import OnlineState

log = logging.getLogger(__name__)

CONTEXT_EVENT_TYPE = "add_to_cart"
"""Context (session / basket) items are folded in with this event type's weight in the
serving model's strength settings (1 when they do not weigh it)."""
MAX_BECAUSE = 3
PERSONALISED, FALLBACK, POPULARITY = "personalised", "fallback", "popularity"
"""Result strategies: ranked by the user's vector; popularity because the user has none;
popularity because the user's experiment arm is the popularity ranking (a holdout; on the
wire STRATEGY_FALLBACK)."""
FALLBACK_RANKED_BATCH_ITEMS = 1000
"""Most popular batch items kept in the cached fallback ranking."""

DeadlineCheck = Callable[[str], None]


def _no_deadline(what: str) -> None:
    return None


@dataclass
class FilterSpec:
    exclude_seen: bool = True
    exclude_item_ids: frozenset[str] = frozenset()
    include_categories: frozenset[str] = frozenset()
    exclude_categories: frozenset[str] = frozenset()
    only_available: bool = True


class RowFilter:
    """The catalogue filters of one request as lookups over a model's item rows.

    `mask(rows)` says which FAISS candidates pass: available (when asked) and in / not in
    the requested categories. `include` / `exclude` are tables by category code with one
    extra False slot at the end, which codes assigned after the table was built (new
    categories from a concurrent upsert: in no filter) are clipped to.
    """

    __slots__ = ("available", "category", "include", "exclude", "n")

    def __init__(self, view: RowView, only_available: bool, include: np.ndarray | None,
                 exclude: np.ndarray | None) -> None:
        avail = view.available  # before `category`: see RowView on the order of updates
        self.category = view.category
        self.available = avail if only_available else None
        self.include = include
        self.exclude = exclude
        self.n = min(len(avail), len(self.category))

    @property
    def empty(self) -> bool:
        """True when the filter admits every row."""
        return self.available is None and self.include is None and self.exclude is None

    def mask(self, rows: np.ndarray) -> np.ndarray:
        """Boolean mask over `rows` (FAISS ids; -1 = no result; all < self.n otherwise)."""
        keep = rows >= 0
        r = np.where(keep, rows, 0)
        if self.available is not None:
            keep &= self.available[r]
        if self.include is not None or self.exclude is not None:
            codes = self.category[r]
            if self.include is not None:
                keep &= self.include[np.minimum(codes, len(self.include) - 1)]
            if self.exclude is not None:
                keep &= ~self.exclude[np.minimum(codes, len(self.exclude) - 1)]
        return keep


class ResolvedFilter(NamedTuple):
    """The catalogue part of a request's filters on one row view (`Recommender._filter`)."""

    selector: RowFilterIndex | None
    """What the search filters with (None: it does not filter)."""
    n_pass: int
    """How many rows pass."""
    rows: RowFilter
    view: RowView
    version: int
    """The view's version all of this was computed at."""
    exact: bool
    """The search applies the filter itself (or there is none): while the view is still at
    `version`, its results need no mask."""


@dataclass
class Result:
    items: list[tuple[str, float, list[str]]] = field(default_factory=list)
    model_version: str = ""
    strategy: str = PERSONALISED


class Recommender:
    def __init__(self, settings: Settings, manager: ModelManager, state: OnlineState,
                 catalog: Catalog) -> None:
        self.settings = settings
        self.manager = manager
        self.state = state
        self.catalog = catalog
        self.overfetch = settings.server.overfetch
        self.exact_max_rows = settings.server.exact_filter_max_rows
        self._fb_cache: tuple[tuple[int, int], tuple[list[tuple[str, float]], float, int]] | \
            None = None

    # -- filters -----------------------------------------------------------------------
    def _passes(self, item_id: str, f: FilterSpec) -> bool:
        if item_id in f.exclude_item_ids:
            return False
        if f.only_available or f.include_categories or f.exclude_categories:
            info = self.catalog.get(item_id)
            if f.only_available and not info.available:
                return False
            if f.include_categories and info.category not in f.include_categories:
                return False
            if f.exclude_categories and info.category in f.exclude_categories:
                return False
        return True

    def _row_filter(self, model: LoadedModel, f: FilterSpec) -> RowFilter:
        """The catalogue part of `f` as arrays over `model`'s rows (see `RowFilter`)."""
        view = self.catalog.rows(model)
        include = exclude = None
        inc_codes: tuple[int, ...] = ()
        exc_codes: tuple[int, ...] = ()
        if f.include_categories:
            inc_codes = tuple(sorted(self.catalog.category_codes(f.include_categories)))
            include = self._code_table(inc_codes)
        if f.exclude_categories:
            exc_codes = tuple(sorted(self.catalog.category_codes(f.exclude_categories)))
            exclude = self._code_table(exc_codes)
        return RowFilter(view, f.only_available, include, exclude)

    def _code_table(self, codes: Sequence[int]) -> np.ndarray:
        """True at `codes`, plus a False slot for codes made later."""
        table = np.zeros(self.catalog.n_codes + 2, dtype=bool)
        table[list(codes)] = True
        return table

    def _filter(self, model: LoadedModel, f: FilterSpec) -> ResolvedFilter:
        """The catalogue part of `f` on `model`'s rows, cached on the row view by the
        filter's catalogue fields until the view changes (a filter in use costs a request
        one lookup).

        Besides the row lookups (`RowFilter`) it holds the search-time form of the filter:
        with it the search returns only rows that pass, so a selective filter (a small
        category) costs one search instead of rounds of ever larger over-fetches; one that
        admits few rows is searched exactly over them. No selector when the filter admits
        every row or the index cannot filter while searching."""
        view = self.catalog.rows(model)
        key = (f.only_available, f.include_categories, f.exclude_categories)
        found, hit = view.get_derived(key)
        if found:
            return hit  # type: ignore[no-any-return]
        version = view.version  # before reading the arrays: a later change recomputes
        rf = self._row_filter(model, f)
        sel: RowFilterIndex | None = None
        if rf.empty:
            n_pass = model.n_items
        else:
            keep = rf.mask(np.arange(rf.n, dtype=np.int64))
            n_pass = int(np.count_nonzero(keep))
            if n_pass < keep.size:
                sel = model.selector(keep, n_pass, self.exact_max_rows)
        entry = ResolvedFilter(sel, n_pass, rf, view, version,
                               exact=rf.empty or sel is not None or n_pass == rf.n)
        view.put_derived(key, version, entry, nbytes=getattr(sel, "nbytes", 0))
        return entry

    def _search(
        self, model: LoadedModel, query: np.ndarray, k: int, f: FilterSpec,
        skip_rows: set[int], check: DeadlineCheck,
    ) -> list[tuple[int, float]]:
        """Top-k rows by inner product that pass the filters; over-fetches, then grows.

        `skip_rows` are rows never to return (seen items, excluded ids, the query item);
        the catalogue filters run as array operations over each batch of candidates, unless
        the search applied them itself on the catalogue as it still is.
        """
        total = model.n_items
        flt = self._filter(model, f)
        rf, sel, n_pass = flt.rows, flt.selector, flt.n_pass
        if n_pass == 0 and rf.n >= total:
            return []  # nothing in the catalogue passes (e.g. an unknown category)
        if sel is not None:
            # FAISS filters by itself: only the rows to skip can still drop out, and no
            # search needs more than every passing row (+ items added since).
            total = min(total, n_pass + total - sel.n)
            fetch = min(total, k + len(skip_rows))
        else:
            fetch = min(total, k * self.overfetch + len(skip_rows))
        while True:
            check("vector search")
            scores, rows = model.search(query, fetch, sel)
            rows_l = rows.tolist()
            out: list[tuple[int, float]] = []
            # plain lists: indexing numpy arrays per element costs more than the search's
            # Python wrapper (this loop was the largest Python self-time of a Recommend)
            if flt.exact and flt.view.version == flt.version and (
                    not rows_l or max(rows_l) < rf.n):
                # The search admitted exactly the rows the filter passes on the catalogue as
                # it still is: only "no result" (-1) and the rows to skip drop out.
                for r, s in zip(rows_l, scores.tolist(), strict=True):
                    if r >= 0 and r not in skip_rows:
                        out.append((r, s))
                        if len(out) == k:
                            return out
            else:
                if model.n_items > rf.n and rows_l and max(rows_l) >= rf.n:
                    # items added to the model since the view last grew
                    rf = self._row_filter(model, f)
                keep = rf.mask(rows)  # the catalogue as of now (the selector may be older)
                for r, s, ok in zip(rows_l, scores.tolist(), keep.tolist(), strict=True):
                    if ok and r not in skip_rows:
                        out.append((r, s))
                        if len(out) == k:
                            return out
            if fetch >= total:
                return out
            fetch = min(total, fetch * 4)

    # -- Recommend ---------------------------------------------------------------------
    def recommend(
        self,
        user_id: str,
        k: int,
        f: FilterSpec,
        *,
        context_item_ids: Sequence[str] = (),
        explain: bool = False,
        check: DeadlineCheck = _no_deadline,
        arm: Assignment | None = None,
    ) -> Result:
        """Top-k for `user_id`; `arm` (`ExperimentArms.arm_for`): the experiment arm that
        serves the user, its model (None: the champion), popularity or settings."""
        model = arm.model if arm is not None and arm.model is not None \
            else self.manager.current  # once per request
        if model is None:
            return self._fallback(None, k, f, set(context_item_ids), user_id, check,
                                  POPULARITY if arm is not None and arm.popularity
                                  else FALLBACK)
        context_rows: dict[int, float] = {}
        if context_item_ids:
            weight = self.context_weight(model)
            for iid in context_item_ids:
                r = model.item_row.get(iid)
                if r is not None:
                    context_rows[r] = context_rows.get(r, 0.0) + weight
        check("fold-in")
        prof = self.state.profile(model, user_id, context_rows or None)
        seen_ids: AbstractSet[str] = frozenset()
        if f.exclude_seen:  # (the profile's set as it is when there is no context: no copy)
            seen_ids = prof.seen_ids | set(context_item_ids) if context_item_ids \
                else prof.seen_ids
        if arm is not None and arm.popularity:  # the holdout: seen items still excluded
            if f.exclude_seen and prof.batch_rows.size:
                seen_ids = set(seen_ids) | {model.item_ids[r] for r in prof.batch_rows.tolist()}
            return self._fallback(model, k, f, seen_ids, user_id, check, POPULARITY)
        if prof.vector is None or not np.count_nonzero(prof.vector):  # (faster than any())
            return self._fallback(model, k, f, seen_ids, user_id, check)
        # Seen = the batch history + real-time events of `seen_event_types` (by id) + context.
        skip_rows = set(prof.batch_rows.tolist()) if f.exclude_seen else set()
        item_row = model.item_row
        for iid in (*seen_ids, *f.exclude_item_ids):
            r = item_row.get(iid)
            if r is not None:
                skip_rows.add(r)
        query = model.user_query(prof.vector, int(prof.rows.size),
                                 arm.blend(model) if arm is not None else None)
        hits = self._search(model, query, k, f, skip_rows, check)
        item_ids = model.item_ids
        if explain and prof.rows.size:
            items = [(item_ids[r], s, self._because(model, prof.rows, r)) for r, s in hits]
        else:
            items = [(item_ids[r], s, []) for r, s in hits]
        return Result(items, model.version, PERSONALISED)

    def context_weight(self, model: LoadedModel) -> float:
        """What one context item adds to the user's strength on `model`: a fresh
        `CONTEXT_EVENT_TYPE` event (no value, no decay) weighed as the model's fold-in
        weighs events, with the settings it was trained with."""
        return float(self.state.params(model).weights.get(CONTEXT_EVENT_TYPE, 1.0))

    def _because(self, model: LoadedModel, rows: np.ndarray, target: int) -> list[str]:
        factors = model.item_factors
        c = contributions(np.empty(0), factors, rows, factors[target])
        order = np.argsort(-c, kind="stable")[:MAX_BECAUSE]
        return [model.item_ids[int(rows[i])] for i in order if c[i] > 0 and rows[i] != target]

    def _fallback(
        self, model: LoadedModel | None, k: int, f: FilterSpec, seen_ids: AbstractSet[str],
        user_id: str, check: DeadlineCheck, strategy: str = FALLBACK,
    ) -> Result:
        """Popularity: 0.5 x batch popularity + 0.5 x real-time decayed counts (each scaled
        to max 1), exact top-k under the filters.

        The ranking of (top batch items + the top real-time items) is cached per (model,
        real-time version); items outside it score at most `floor` (0.5 x the batch and
        0.5 x the real-time bound), so the walk only continues down the batch order when
        the filters eat the whole ranking."""
        check("popularity fallback")
        ranking, floor, walked = self._popularity_ranking(model)

        def ok(iid: str) -> bool:
            return iid not in seen_ids and self._passes(iid, f)

        picked: list[tuple[str, float]] = []
        above = 0  # picked items that nothing outside the ranking can beat
        for iid, score in ranking:
            if above >= k:
                break
            if ok(iid):
                picked.append((iid, score))
                above += score >= floor
        if above < k and model is not None and walked < model.popularity_order.size:
            in_ranking = {iid for iid, _ in ranking}
            found, start, chunk = 0, walked, k * self.overfetch
            order = model.popularity_order
            realtime = self.state.popularity
            while found < k and start < order.size:
                check("popularity fallback")
                for r in order[start:start + chunk].tolist():
                    iid = model.item_ids[r]
                    if iid in in_ranking or not ok(iid):
                        continue
                    picked.append((iid, 0.5 * float(model.popularity[r])
                                   + 0.5 * realtime.score(iid)))
                    found += 1
                start += chunk
                chunk *= 4
        top = sorted(picked, key=lambda kv: (-kv[1], kv[0]))[:k]
        return Result([(iid, s, []) for iid, s in top],
                      model.version if model is not None else "", strategy)

    def _popularity_ranking(
        self, model: LoadedModel | None
    ) -> tuple[list[tuple[str, float]], float, int]:
        """(ranking, floor, batch items walked), cached until the model or counts change.

        Costs O(FALLBACK_RANKED_BATCH_ITEMS + the real-time top), whatever the number of
        items with real-time counts (`Popularity` keeps its top incrementally)."""
        pop = self.state.popularity
        key = (model.generation if model is not None else 0, pop.version)
        cached = self._fb_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        realtime, rt_floor = pop.ranking()
        scores: dict[str, float] = {}
        batch_floor, walked = 0.0, 0
        if model is not None:
            walked = min(model.n_base_items, FALLBACK_RANKED_BATCH_ITEMS)
            top_rows = model.popularity_order[:walked].tolist()
            for r in top_rows:
                iid = model.item_ids[r]
                scores[iid] = 0.5 * float(model.popularity[r]) + 0.5 * pop.score(iid)
            if walked < model.n_base_items:
                batch_floor = float(model.popularity[model.popularity_order[walked]])
        for iid, rt in realtime:
            row = model.item_row.get(iid) if model is not None else None
            batch = float(model.popularity[row]) if model is not None and row is not None \
                and row < model.n_base_items else 0.0
            scores[iid] = 0.5 * batch + 0.5 * rt
        ranking = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
        out = (ranking, 0.5 * batch_floor + 0.5 * rt_floor, walked)
        self._fb_cache = (key, out)
        return out

    def answer_bounds(self) -> tuple[int, int, int]:
        """(most items one answer can hold, longest item id it can name in UTF-8 bytes,
        model version length): what bounds the size of a Recommend answer, on any model
        held (an experiment's arms included)."""
        models = self.manager.models()
        pop = self.state.popularity
        items = len(pop) + max((m.n_items for m in models), default=0)
        longest = max(pop.longest_id_bytes, *(m.longest_item_id_bytes for m in models))
        return items, longest, max((len(m.version.encode()) for m in models), default=0)

    # -- SimilarItems ------------------------------------------------------------------
    def similar(self, item_id: str, k: int, f: FilterSpec,
                check: DeadlineCheck = _no_deadline) -> Result:
        model = self.manager.current
        if model is None:
            raise NoModel("no model is loaded yet")
        row = model.item_row.get(item_id)
        if row is None:
            raise NotFound(f"item_id: {item_id!r} is not in model {model.version}")
        query = model.item_query(row)
        skip_rows = {row}
        for iid in f.exclude_item_ids:
            r = model.item_row.get(iid)
            if r is not None:
                skip_rows.add(r)
        hits = self._search(model, query, k, f, skip_rows, check)
        return Result([(model.item_ids[r], float(s), []) for r, s in hits], model.version,
                      PERSONALISED)

    # -- events ------------------------------------------------------------------------
    def apply_events(self, events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Fold accepted events into the online state on the serving model."""
        return self.state.apply(self.manager.current, events)

    def forget_user(self, user_id: str) -> bool:
        """Stop serving the user: their batch vector (until a retrain) and online state.
        Returns whether they had online state."""
        self.manager.forget(user_id)
        return self.state.forget(user_id)
