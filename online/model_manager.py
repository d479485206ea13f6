"""The models a server serves: the champion (CURRENT) and those experiments' arms name.

`ModelManager.reload()` loads a version (`online.model_loading.load_model`, off the request
path), lets the online state re-fold its users on the new factors, and then replaces one
reference; requests read `manager.current` once and finish on the model they started with.

`ModelManager.hold()` keeps the other versions a running experiment needs
(`online.experiment_arms`), at most `server.max_models` models in all with the champion: a
set that needs more, or a version that does not load, is refused whole and nothing held
changes.

Erasures (`forget`) hide the user's batch vector in every held model at once, and in every
model trained before the erasure that is loaded later. The durable record of an erasure is
the lake's `user_erasures` table (the server's `prepare` hook reads it for each model it
loads); the manager's own list only bridges the moments before that record is written and a
reload racing the erasure, so it keeps an erasure only while a model trained before it may
still be loaded next: once a model trained after it is held, older erasures are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lake.bundle import BundleError, check_version_name, current_version
from lake.config import Settings
from online.errors import FailedPrecondition, ModelLoadError, NotFound
from online.loaded_model import LoadedModel
from online.model_loading import load_model

log = logging.getLogger(__name__)


class ModelManager:
    """Holds the serving models; reloads are serialised and swap a single reference."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_new_model: Callable[[LoadedModel, LoadedModel | None], int] | None = None,
        on_swapped: Callable[[LoadedModel], None] | None = None,
        on_held: Callable[[LoadedModel], None] | None = None,
    ) -> None:
        """`on_new_model(new, old)` prepares a new champion before the swap (returns the
        users re-folded); `on_swapped(new)` runs after it; `on_held(model)` prepares a model
        an experiment holds (not the champion) before requests can reach it."""
        self.models_dir = Path(settings.model.dir)
        self.index_settings = settings.index
        self.max_models = settings.server.max_models
        self._current: LoadedModel | None = None
        self._held: dict[str, LoadedModel] = {}
        """Versions other than the champion that the running experiment needs."""
        self._reload_lock = threading.Lock()
        self._on_new_model = on_new_model
        self._on_swapped = on_swapped
        self._on_held = on_held
        self.last_seen_current: str | None = None
        self._erased: dict[str, datetime] = {}
        self._newest_trained_from: datetime | None = None
        """The latest training start of any model held: erasures before it are dropped."""
        self._swap_lock = threading.Lock()

    @property
    def current(self) -> LoadedModel | None:
        """The champion: the version CURRENT named at the last reload."""
        return self._current

    def model(self, version: str) -> LoadedModel | None:
        """The held model of `version` (the champion's included), or None."""
        cur = self._current
        if cur is not None and cur.version == version:
            return cur
        return self._held.get(version)

    def models(self) -> list[LoadedModel]:
        """Every model held: the champion first."""
        cur = self._current
        return ([cur] if cur is not None else []) + [
            m for v, m in list(self._held.items()) if cur is None or v != cur.version]

    @property
    def erasures_kept(self) -> int:
        """Erasures remembered in memory for models that may still be loaded."""
        return len(self._erased)

    # -- the champion --------------------------------------------------------------------
    def reload(self, version: str | None = None) -> dict[str, Any]:
        """Load `version` (default: CURRENT), prepare it, swap it in. Old model on failure."""
        with self._reload_lock:
            pointer = current_version(self.models_dir)
            target = version or pointer
            if not target:
                raise NotFound(f"no model version given and {self.models_dir}/CURRENT is missing")
            if version is None:
                self.last_seen_current = pointer
            try:
                check_version_name(target)
            except BundleError as e:
                raise ModelLoadError(f"version: {e}") from None
            old = self._current
            if old is not None and old.version == target:
                return {"version": target, "previous": old.version, "changed": False,
                        "refolded_users": 0, "load_seconds": 0.0}
            t0 = time.perf_counter()
            # An experiment's arm may hold it already: the same object serves both.
            new = self._held.get(target) or load_model(self.models_dir / target,
                                                       self.index_settings)
            refolded = self._on_new_model(new, old) if self._on_new_model else 0
            with self._swap_lock:  # see forget(): an erasure lands in the old or the new model
                self._apply_erasures(new)
                self._current = new  # the swap: one reference assignment
            seconds = time.perf_counter() - t0
            if self._on_swapped:
                self._on_swapped(new)
            log.info("model swapped", extra={"version": new.version,
                                             "previous": old.version if old else None,
                                             "refolded_users": refolded,
                                             "seconds": round(seconds, 3)})
            return {"version": new.version, "previous": old.version if old else "",
                    "changed": True, "refolded_users": refolded, "load_seconds": seconds}

    def poll_once(self) -> dict[str, Any] | None:
        """Reload when the CURRENT pointer changed since we last looked; None otherwise."""
        pointer = current_version(self.models_dir)
        if pointer is None or pointer == self.last_seen_current:
            return None
        try:
            return self.reload(None)
        except Exception:
            self.last_seen_current = pointer  # do not retry a bad bundle every poll
            raise

    # -- experiments' models -------------------------------------------------------------
    def check_capacity(self, versions: Collection[str], what: str = "the experiment") -> None:
        """Refuse (FailedPrecondition) a set of versions that with the champion exceeds
        `server.max_models`."""
        cur = self._current
        needed = set(versions) | ({cur.version} if cur is not None else set())
        if len(needed) > self.max_models:
            raise FailedPrecondition(
                f"{what} needs {len(needed)} models in memory ({', '.join(sorted(needed))}, "
                f"the champion included), above server.max_models {self.max_models}")

    def hold(self, versions: Collection[str]) -> dict[str, Any]:
        """Hold exactly `versions` besides the champion: load the missing ones, release the
        others. All or nothing: a version that does not load (FailedPrecondition naming it)
        or too many versions leave the held models as they were."""
        wanted = set(versions)
        with self._reload_lock:
            self.check_capacity(wanted)
            loaded: dict[str, LoadedModel] = {}
            cur = self._current
            for version in sorted(wanted):
                if version in self._held or (cur is not None and cur.version == version):
                    continue
                loaded[version] = self.load_for_arm(version)
            with self._swap_lock:
                for model in loaded.values():
                    self._apply_erasures(model)
                held = {v: m for v, m in self._held.items() if v in wanted}
                released = sorted(set(self._held) - wanted)
                # The champion's own version is kept too: a reload to another champion
                # must not leave an arm without its model.
                for v in wanted:
                    if v not in held and v not in loaded and cur is not None \
                            and cur.version == v:
                        held[v] = cur
                self._held = {**held, **loaded}
        if loaded or released:
            log.info("experiment models held", extra={"loaded": sorted(loaded),
                                                      "released": released,
                                                      "held": sorted(self._held)})
        return {"loaded": sorted(loaded), "released": released, "held": sorted(self._held)}

    def load_for_arm(self, version: str) -> LoadedModel:
        """Load and prepare `version` for an arm; nothing held changes. A missing or bad
        bundle is a FailedPrecondition naming it."""
        try:
            check_version_name(version)
            model = load_model(self.models_dir / version, self.index_settings)
        except BundleError as e:
            raise FailedPrecondition(f"model version {version!r}: {e}") from None
        except (NotFound, ModelLoadError) as e:  # for an experiment: its precondition
            raise FailedPrecondition(f"model version {version!r}: {e.message}") from None
        if self._on_held is not None:
            self._on_held(model)
        return model

    # -- erasures ------------------------------------------------------------------------
    def forget(self, user_id: str) -> None:
        """Stop serving the user's batch vector, in every held model and in every model
        trained before now that is loaded later (also by a reload running right now)."""
        with self._swap_lock:
            self._erased[user_id] = datetime.now(UTC)
            for model in self.models():
                model.forgotten.add(user_id)

    def _apply_erasures(self, model: LoadedModel) -> None:
        """Hide in `model` the erasures it may hold, then drop those no model that could
        still come needs (caller holds the swap lock)."""
        since = model.bundle.manifest.trained_from
        model.forgotten |= {u for u, at in self._erased.items()
                            if since is None or at >= since}
        if since is None:
            return
        if self._newest_trained_from is None or since > self._newest_trained_from:
            self._newest_trained_from = since
        # A model trained after an erasure read the lake after it (its rows were gone):
        # only a rollback to an older model could need it, and that model's load reads
        # the erasure from the lake's user_erasures table.
        newest = self._newest_trained_from
        self._erased = {u: at for u, at in self._erased.items() if at >= newest}
