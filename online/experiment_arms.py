"""Which arm serves a request: the running experiment, as this server holds it.

`ExperimentArms` follows the experiments file (`lake.experiments`, shared by every
replica on the lake): a thread stats it once per second and, when it changed, holds the
models the running experiment's arms name (`ModelManager.hold`) before serving it, so a
request never waits for a model to load. Until they are loaded (a few seconds on a replica
that learns of a new experiment from the file) the replica serves everyone the champion
with no arm, and impressions say so: no request is counted in an arm it was not served by.

`arm_for(user_id)` is the request path's one call: the user's `Assignment` (experiment,
arm, model, settings) or None. It reads one immutable snapshot and hashes the id
(`lake.experiments.assign`), so every replica and every restart picks the same arm.

Create and Stop from the Admin API go through here too: Create loads the arms' models
first (a missing or bad bundle, or more than `server.max_models`, is refused with nothing
written), then writes the file and serves the experiment at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lake.blend import BlendParams
from lake.experiments import (
    Experiment,
    ExperimentConflict,
    ExperimentError,
    ExperimentNotFound,
    ExperimentStore,
    Stamp,
    StoreError,
    assign,
    new_experiment,
)
from online.errors import FailedPrecondition, InvalidArgument, NotFound
from online.loaded_model import LoadedModel
from online.model_manager import ModelManager

log = logging.getLogger(__name__)

REFRESH_S = 1.0
"""How often the experiments file is stat'ed (a change applies within about this long,
plus the time its models take to load)."""


@dataclass(frozen=True, slots=True)
class Assignment:
    """The arm that serves one user's request."""

    experiment_id: str
    arm: str
    model: LoadedModel | None
    """The arm's model; None = the champion (`manager.current` when the request runs)."""
    popularity: bool = False
    """The popularity ranking only (a holdout arm)."""
    settings: Mapping[str, str] | None = None
    """The arm's serving settings as created (`lake.experiments.SETTINGS`)."""
    blend_weight: float | None = None
    """`settings["blend_weight"]`, parsed: the blend's beta for this arm's users."""

    def blend(self, model: LoadedModel) -> BlendParams | None:
        """The blend to query `model` with for this arm (None: the model's own)."""
        if self.blend_weight is None or not model.blend.active:
            return None
        return BlendParams(self.blend_weight, model.blend.n0)


@dataclass(frozen=True, slots=True)
class _Active:
    experiment: Experiment
    arms: dict[str, Assignment]


class ExperimentArms:
    """The running experiment as this server serves it (see the module docstring)."""

    def __init__(self, store: ExperimentStore, manager: ModelManager, *,
                 refresh_s: float = REFRESH_S) -> None:
        self.store = store
        self.manager = manager
        self.refresh_s = refresh_s
        self._active: _Active | None = None
        self._stamp: Stamp | None = None
        self._lock = threading.Lock()  # one change at a time: refresh, create, stop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the request path ----------------------------------------------------------------
    def arm_for(self, user_id: str) -> Assignment | None:
        """The user's arm in the running experiment, or None (no experiment, or the user is
        outside its traffic)."""
        active = self._active
        if active is None:
            return None
        name = assign(active.experiment, user_id)
        return active.arms.get(name) if name is not None else None

    @property
    def running(self) -> Experiment | None:
        """The experiment this server serves now (None: none)."""
        active = self._active
        return active.experiment if active is not None else None

    # -- following the file --------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="experiments", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _follow(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the thread must outlive any one bad change
                log.exception("experiments refresh failed; serving the last good state")

    def refresh(self, *, force: bool = False) -> bool:
        """Apply the file when it changed since the last look; returns whether it did.

        A file that cannot be read, or an experiment whose models do not load here, leaves
        this server without an experiment (the champion for everyone, no arm): a warning,
        retried when the file changes again."""
        stamp = self.store.stamp()
        if not force and stamp == self._stamp:
            return False
        with self._lock:
            stamp = self.store.stamp()
            if not force and stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                running = self.store.running()
            except StoreError as exc:
                log.warning("experiments file unreadable; keeping the experiment served "
                            "before", extra={"error": str(exc)})
                return False
            current = self._active.experiment if self._active is not None else None
            if running == current:
                return False
            try:
                self._serve(running)
            except (FailedPrecondition, NotFound) as exc:
                log.error("cannot serve experiment %s: %s; serving the champion to everyone",
                          running.experiment_id if running else None, exc.message)
                self._active = None
                self.manager.hold(())
            return True

    def _serve(self, experiment: Experiment | None) -> None:
        """Hold `experiment`'s models, then serve it (None: serve none, release them)."""
        if experiment is None:
            self._active = None
            self.manager.hold(())
            log.info("no experiment running")
            return
        self.manager.hold(experiment.model_versions())
        self._active = _Active(experiment, self._assignments(experiment))
        log.info("experiment served", extra={"experiment_id": experiment.experiment_id,
                                             "arms": [a.name for a in experiment.arms]})

    def _assignments(self, experiment: Experiment) -> dict[str, Assignment]:
        out = {}
        for a in experiment.arms:
            model = self.manager.model(a.model_version) if a.model_version else None
            if a.model_version and model is None:
                raise FailedPrecondition(f"model {a.model_version} of arm {a.name!r} is not "
                                         "held")
            out[a.name] = Assignment(experiment.experiment_id, a.name, model, a.popularity,
                                     dict(a.settings), a.blend_weight)
        return out

    # -- the Admin API -------------------------------------------------------------------
    def create(self, name: str, arms: Sequence[Mapping[str, Any]], *, traffic: float = 1.0,
               salt: str = "", description: str = "") -> Experiment:
        """Check, load its models, record and serve a new experiment.

        Raises:
            InvalidArgument: a bad field (named).
            FailedPrecondition: one is running already, a bundle is missing or refused, a
                `blend_weight` on a model without the blend, too many models.
        """
        try:
            experiment = new_experiment(name, arms, traffic=traffic, salt=salt,
                                        description=description)
        except ExperimentError as exc:
            raise InvalidArgument(exc.field, exc.reason) from None
        with self._lock:
            try:
                running = self.store.running()
            except StoreError as exc:
                raise FailedPrecondition(str(exc)) from None
            if running is not None:
                raise FailedPrecondition(
                    f"experiment {running.experiment_id} ({running.name!r}) is running; at "
                    "most one runs at a time: stop it first")
            before = self._active
            # Load first: a bundle that does not load is refused before anything is written.
            self.manager.hold(experiment.model_versions())
            try:
                self._assignments(experiment)
                self._check_blend(experiment)
                self.store.create(experiment, models_dir=self.manager.models_dir,
                                  max_models=self.manager.max_models)
            except BaseException as exc:
                self.manager.hold(before.experiment.model_versions() if before else ())
                if isinstance(exc, ExperimentConflict):
                    raise FailedPrecondition(str(exc)) from None
                raise
            self._active = _Active(experiment, self._assignments(experiment))
            self._stamp = self.store.stamp()
        log.info("experiment created", extra={"experiment_id": experiment.experiment_id,
                                              "arms": [a.to_json() for a in experiment.arms],
                                              "traffic": experiment.traffic})
        return experiment

    def _check_blend(self, experiment: Experiment) -> None:
        for i, a in enumerate(experiment.arms):
            if a.blend_weight is None:
                continue
            model = self.manager.model(a.model_version) if a.model_version \
                else self.manager.current
            if model is None or not model.blend.active:
                raise FailedPrecondition(
                    f"arms[{i}].settings.blend_weight: model "
                    f"{model.version if model else '(none loaded)'} was built without the "
                    "popularity blend, so its index cannot take a blend weight")

    def stop(self, experiment_id: str) -> Experiment:
        """Stop an experiment (NotFound for an unknown id); this server stops serving it
        at once, the others within a second."""
        try:
            stopped = self.store.stop(experiment_id)
        except ExperimentNotFound as exc:
            raise NotFound(str(exc.args[0])) from None
        self.refresh(force=True)
        return stopped

    def get(self, experiment_id: str) -> Experiment:
        try:
            return self.store.get(experiment_id)
        except ExperimentNotFound as exc:
            raise NotFound(str(exc.args[0])) from None
        except StoreError as exc:
            raise FailedPrecondition(str(exc)) from None

    def list(self) -> list[Experiment]:
        try:
            return self.store.load()
        except StoreError as exc:
            raise FailedPrecondition(str(exc)) from None
