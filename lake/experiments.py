"""Online experiments: the store every replica and batch job reads, and user assignment.

An experiment splits users between arms by a hash of (salt, user id) (`assign`, a pure
function: the same arm on every replica and after restarts). An arm is a model version
(`""`: whatever CURRENT names, the champion), or the popularity ranking alone (a holdout),
with optional serving settings (`SETTINGS`). At most one experiment runs at a time; a
stopped one is kept for its analysis.

The experiments live in one JSON file next to the lake's tables,
`<lake.root>/experiments.json` (like the access keys), written atomically (a new file
renamed over the old one) under a file lock; servers re-read it when its stat changes, at
most once per second, so an experiment created on one replica or with this CLI is served
by all of them.

    python -m lake.experiments create --name blend-test --arm control:0.5 \\
        --arm challenger:0.5:v20261122-ab12 [--arm holdout:0.1:@popularity] \\
        [--traffic 0.5] [--salt S] [--description TEXT]
    python -m lake.experiments create --name b --arm a:0.5 --arm b:0.5::blend_weight=0.2
    python -m lake.experiments list
    python -m lake.experiments show EXP
    python -m lake.experiments stop EXP
    python -m lake.experiments promote EXP ARM [--notify]   # CURRENT -> the arm's model

An `--arm` is `NAME:SHARE[:MODEL[:KEY=VALUE,...]]`; MODEL is a version, empty or
`@champion` for the champion, `@popularity` for the popularity ranking. Promotion points
CURRENT at the arm's version (`lake.rollback`'s checks and `model_runs` bookkeeping) and
stops the experiment; `python -m lake.rollback` undoes it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lake.bundle import BundleError, check_version_name, current_version, read_manifest
from lake.config import ConfigError, Settings, load_settings
from lake.tables import LakeError

FILE_NAME = "experiments.json"
RUNNING, STOPPED = "running", "stopped"
SEPARATOR = "\x1f"
"""Between salt and user id in the hashed text (a salt may not contain it)."""
SETTINGS: dict[str, str] = {
    "blend_weight": "beta of the popularity blend (`lake.blend`) for this arm's users, a "
                    "number >= 0 (0 = the model's plain scores); needs a model whose index "
                    "was built with the blend (a bundle with an active blend)",
}
"""The serving settings an arm may set, and what each does."""
CHAMPION_TOKEN, POPULARITY_TOKEN = "@champion", "@popularity"
"""The CLI's names for the champion and the popularity ranking in `--arm`."""
MAX_ARMS = 10
MAX_NAME = 100
MAX_DESCRIPTION = 2000
MAX_SALT = 128
SHARE_TOLERANCE = 1e-6
_ARM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""A description may have line breaks and tabs."""


class ExperimentError(ValueError):
    """A bad experiment definition: the message starts with the field's path."""

    def __init__(self, field_path: str, reason: str) -> None:
        super().__init__(f"{field_path}: {reason}")
        self.field = field_path
        self.reason = reason


class ExperimentConflict(ValueError):
    """A valid request the current state refuses (one running already, a missing bundle,
    too many models): FAILED_PRECONDITION for the API."""


class ExperimentNotFound(LookupError):
    """No experiment with that id."""


class StoreError(ValueError):
    """The experiments file cannot be read or is not one this module wrote."""


@dataclass(frozen=True)
class Arm:
    name: str
    share: float
    model_version: str = ""
    """"" = the champion (the version CURRENT names when the request arrives)."""
    popularity: bool = False
    """True: the popularity ranking only (a holdout arm)."""
    settings: Mapping[str, str] = field(default_factory=dict)

    @property
    def blend_weight(self) -> float | None:
        raw = self.settings.get("blend_weight")
        return None if raw is None else float(raw)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "share": self.share, "model_version": self.model_version,
                "popularity": self.popularity, "settings": dict(sorted(self.settings.items()))}


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    name: str
    salt: str
    arms: tuple[Arm, ...]
    traffic: float
    state: str
    started_at: datetime
    stopped_at: datetime | None = None
    description: str = ""

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ExperimentNotFound(f"experiment {self.experiment_id} has no arm {name!r} "
                                 f"(arms: {', '.join(a.name for a in self.arms)})")

    def model_versions(self) -> set[str]:
        """The model versions its arms name (not the champion's "", not popularity)."""
        return {a.model_version for a in self.arms if a.model_version and not a.popularity}

    def to_json(self) -> dict[str, Any]:
        return {"experiment_id": self.experiment_id, "name": self.name, "salt": self.salt,
                "arms": [a.to_json() for a in self.arms], "traffic": self.traffic,
                "state": self.state, "started_at": self.started_at.isoformat(),
                "stopped_at": self.stopped_at.isoformat() if self.stopped_at else None,
                "description": self.description}


# -- assignment --------------------------------------------------------------------------
def bucket(salt: str, user_id: str) -> float:
    """The user's point in [0, 1): the first 8 bytes of sha256(salt + US + user id) as a
    big-endian integer over 2**64."""
    digest = hashlib.sha256(f"{salt}{SEPARATOR}{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(experiment: Experiment, user_id: str) -> str | None:
    """The arm `user_id` is in, or None when the user is outside the experiment's traffic.

    With h = `bucket(salt, user_id)`: the user takes part iff h < traffic; then
    u = h / traffic in [0, 1) picks the first arm (in the listed order) whose cumulative
    share exceeds u. Depends on nothing but the salt, traffic, arms and the id.
    """
    h = bucket(experiment.salt, user_id)
    if h >= experiment.traffic:
        return None
    u = h / experiment.traffic
    total = 0.0
    for a in experiment.arms:
        total += a.share
        if u < total:
            return a.name
    return experiment.arms[-1].name  # shares sum to 1 up to rounding


# -- validation --------------------------------------------------------------------------
def _text(path: str, value: Any, max_len: int, *, required: bool,
          lines: bool = False) -> str:
    if not isinstance(value, str):
        raise ExperimentError(path, f"must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise ExperimentError(path, "must not be empty")
    if len(value) > max_len:
        raise ExperimentError(path, f"longer than {max_len} characters")
    bad = (_CONTROL_BUT_LINES if lines else _CONTROL).search(value)
    if bad:
        raise ExperimentError(path, f"contains the control character U+{ord(bad.group()):04X}")
    return value


def _number(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ExperimentError(path, f"must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ExperimentError(path, f"must be finite, got {v}")
    return v


def check_setting(path: str, key: str, value: Any) -> str:
    """One arm setting, checked; returns its value as stored (text)."""
    if key not in SETTINGS:
        raise ExperimentError(path, f"unknown setting {key!r} (known: {', '.join(SETTINGS)})")
    if not isinstance(value, str):
        raise ExperimentError(f"{path}.{key}", f"must be text, got {type(value).__name__}")
    try:
        w = float(value)
    except ValueError:
        raise ExperimentError(f"{path}.{key}", f"not a number: {value!r}") from None
    if not math.isfinite(w) or w < 0:
        raise ExperimentError(f"{path}.{key}", f"must be finite and >= 0, got {value!r}")
    return value


def make_arm(i: int, raw: Mapping[str, Any]) -> Arm:
    """Arm `i` of a definition (a mapping with `Arm`'s fields), checked."""
    p = f"arms[{i}]"
    unknown = set(raw) - {"name", "share", "model_version", "popularity", "settings"}
    if unknown:
        raise ExperimentError(f"{p}.{sorted(unknown)[0]}", "unknown field")
    name = raw.get("name", "")
    if not isinstance(name, str) or not _ARM_NAME.fullmatch(name):
        raise ExperimentError(f"{p}.name", f"{name!r} is not an arm name "
                                           "(1-64 ASCII letters, digits, '_', '.' or '-')")
    share = _number(f"{p}.share", raw.get("share", 0.0))
    if not 0 < share <= 1:
        raise ExperimentError(f"{p}.share", f"must be in (0, 1], got {share}")
    popularity = raw.get("popularity", False)
    if not isinstance(popularity, bool):
        raise ExperimentError(f"{p}.popularity", f"must be true or false, got {popularity!r}")
    version = raw.get("model_version", "") or ""
    if not isinstance(version, str):
        raise ExperimentError(f"{p}.model_version", "must be text")
    if popularity:
        version = ""  # the popularity ranking needs no model (the proto: ignored)
    elif version:
        try:
            check_version_name(version)
        except BundleError as exc:
            raise ExperimentError(f"{p}.model_version", str(exc)) from None
    settings = raw.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise ExperimentError(f"{p}.settings", "must be a mapping of setting to value")
    if popularity and settings:
        raise ExperimentError(f"{p}.settings", "a popularity arm has no model to apply "
                                               "settings to")
    checked = {k: check_setting(f"{p}.settings", k, v) for k, v in settings.items()}
    return Arm(name, share, version, popularity, checked)


def new_experiment(name: str, arms: Sequence[Mapping[str, Any]], *, traffic: float = 1.0,
                   salt: str = "", description: str = "",
                   now: datetime | None = None) -> Experiment:
    """A running experiment from a definition, checked (`ExperimentError` naming the
    field); a new random salt unless one is given, a new id."""
    now = now or datetime.now(UTC)
    name = _text("name", name, MAX_NAME, required=True)
    description = _text("description", description, MAX_DESCRIPTION, required=False,
                        lines=True)
    if salt:
        salt = _text("salt", salt, MAX_SALT, required=True)  # controls (the separator) refused
    else:
        salt = secrets.token_hex(16)
    traffic = _number("traffic", traffic)
    if not 0 < traffic <= 1:
        raise ExperimentError("traffic", f"must be in (0, 1], got {traffic}")
    if len(arms) < 2:
        raise ExperimentError("arms", f"need at least 2 arms, got {len(arms)}")
    if len(arms) > MAX_ARMS:
        raise ExperimentError("arms", f"at most {MAX_ARMS} arms, got {len(arms)}")
    checked = tuple(make_arm(i, a) for i, a in enumerate(arms))
    seen: set[str] = set()
    for i, a in enumerate(checked):
        if a.name in seen:
            raise ExperimentError(f"arms[{i}].name", f"duplicate arm name {a.name!r}")
        seen.add(a.name)
    total = math.fsum(a.share for a in checked)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise ExperimentError("arms", f"shares must sum to 1, got {total:.6g}")
    experiment_id = f"exp-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    return Experiment(experiment_id, name, salt, checked, traffic, RUNNING, now,
                      description=description)


def _parse_time(path: str, value: Any) -> datetime:
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        raise ExperimentError(path, f"not an ISO timestamp: {value!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def from_json(raw: Mapping[str, Any]) -> Experiment:
    """An experiment as the file stores it, checked like a new one."""
    if not isinstance(raw, Mapping):
        raise ExperimentError("experiment", "must be a JSON object")
    arms = raw.get("arms")
    if not isinstance(arms, list) or not all(isinstance(a, Mapping) for a in arms):
        raise ExperimentError("arms", "must be a list of objects")
    if not raw.get("salt"):
        raise ExperimentError("salt", "must not be empty")
    started = _parse_time("started_at", raw.get("started_at"))
    exp = new_experiment(raw.get("name", ""), arms, traffic=raw.get("traffic", 1.0),
                         salt=raw.get("salt") or "", description=raw.get("description", ""),
                         now=started)
    state = raw.get("state")
    if state not in (RUNNING, STOPPED):
        raise ExperimentError("state", f"must be {RUNNING!r} or {STOPPED!r}, got {state!r}")
    experiment_id = raw.get("experiment_id")
    if not isinstance(experiment_id, str) or not _ARM_NAME.fullmatch(experiment_id):
        raise ExperimentError("experiment_id", f"not an experiment id: {experiment_id!r}")
    stopped = raw.get("stopped_at")
    return replace(exp, experiment_id=experiment_id, state=state,
                   stopped_at=_parse_time("stopped_at", stopped) if stopped else None)


# -- models ------------------------------------------------------------------------------
def check_models(experiment: Experiment, models_dir: Path, max_models: int) -> None:
    """What a server will need for `experiment` exists on disk: each named version is a
    published bundle (an index), a `blend_weight` arm's model has a blend, and with the
    champion they fit in `server.max_models`. Raises `ExperimentConflict`."""
    champion = current_version(models_dir)
    needed = experiment.model_versions() | ({champion} if champion else set())
    if len(needed) > max_models:
        raise ExperimentConflict(
            f"the experiment needs {len(needed)} models in memory ({', '.join(sorted(needed))}"
            f", the champion included), above server.max_models {max_models}")
    for i, a in enumerate(experiment.arms):
        if a.popularity:
            continue
        version = a.model_version or champion
        if version is None:
            if a.blend_weight is not None:
                raise ExperimentConflict(f"arms[{i}]: no champion ({models_dir}/CURRENT is "
                                         "missing) to apply blend_weight to")
            continue
        try:
            manifest = read_manifest(models_dir / version)
        except (BundleError, OSError) as exc:
            raise ExperimentConflict(f"arms[{i}].model_version: {version!r} is not a "
                                     f"readable bundle in {models_dir}: {exc}") from None
        if manifest.index is None:
            raise ExperimentConflict(f"arms[{i}].model_version: {version!r} has no index "
                                     "(a staged model, not published)")
        if a.blend_weight is not None and not manifest.blend.active:
            raise ExperimentConflict(
                f"arms[{i}].settings.blend_weight: model {version} was built without the "
                "popularity blend, so its index cannot take a blend weight")


# -- the store ---------------------------------------------------------------------------
def experiments_file(settings: Settings) -> Path:
    """`<lake.root>/experiments.json`: shared by every server and job on the lake."""
    return Path(settings.lake.root) / FILE_NAME


Stamp = tuple[int, int, int]


class ExperimentStore:
    """The experiments file: read by servers and jobs, changed by the Admin API and CLI."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def stamp(self) -> Stamp | None:
        """(inode, mtime ns, size) of the file, None when missing: changes with each write."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def load(self) -> list[Experiment]:
        """Every experiment, newest first; a missing file is none (`StoreError` if bad)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read: {exc.strerror or exc}") from exc
        try:
            rows = json.loads(text)["experiments"]
            if not isinstance(rows, list):
                raise TypeError("'experiments' is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{self.path}: not an experiments file written by "
                             f"lake.experiments ({type(exc).__name__}: {exc})") from exc
        out = []
        for i, r in enumerate(rows):
            try:
                out.append(from_json(r))
            except ExperimentError as exc:
                raise StoreError(f"{self.path}: experiments[{i}].{exc}") from exc
        return sorted(out, key=lambda e: (e.started_at, e.experiment_id), reverse=True)

    def get(self, experiment_id: str) -> Experiment:
        for e in self.load():
            if e.experiment_id == experiment_id:
                return e
        raise ExperimentNotFound(f"no experiment {experiment_id!r} in {self.path}")

    def running(self) -> Experiment | None:
        return next((e for e in self.load() if e.running), None)

    @contextmanager
    def _locked(self) -> Iterator[list[Experiment]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield self.load()

    def _write(self, experiments: list[Experiment]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"experiments": [e.to_json() for e in experiments]}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a crash
        finally:
            os.close(fd)

    def create(self, experiment: Experiment, *, models_dir: Path | None = None,
               max_models: int | None = None) -> Experiment:
        """Add a running experiment. Refused (`ExperimentConflict`) while another runs, and,
        given `models_dir`, when its models are missing or too many (`check_models`)."""
        with self._locked() as experiments:
            running = next((e for e in experiments if e.running), None)
            if running is not None:
                raise ExperimentConflict(
                    f"experiment {running.experiment_id} ({running.name!r}) is running; at "
                    "most one runs at a time: stop it first")
            if any(e.experiment_id == experiment.experiment_id for e in experiments):
                raise ExperimentConflict(f"experiment id {experiment.experiment_id} exists")
            if models_dir is not None:
                check_models(experiment, models_dir, max_models or sys.maxsize)
            self._write([experiment, *experiments])
        return experiment

    def stop(self, experiment_id: str, *, now: datetime | None = None) -> Experiment:
        """Stop an experiment (a stopped one is returned unchanged: a retry is harmless)."""
        with self._locked() as experiments:
            found = next((e for e in experiments if e.experiment_id == experiment_id), None)
            if found is None:
                raise ExperimentNotFound(f"no experiment {experiment_id!r} in {self.path}")
            if not found.running:
                return found
            stopped = replace(found, state=STOPPED, stopped_at=now or datetime.now(UTC))
            self._write([stopped if e is found else e for e in experiments])
        return stopped


# -- the nightly challenger --------------------------------------------------------------
CHAMPION_ARM, CHALLENGER_ARM = "champion", "challenger"


def publish_challenger(settings: Settings, name: str, *, champion: str, challenger: str,
                       share: float, traffic: float = 1.0) -> Experiment:
    """Run experiment `name`: arm `champion` (that version, pinned, `1 - share` of its
    users) against arm `challenger` (`share`), for `traffic` of all users.

    Repeatable: an experiment of that name already running these two versions is returned
    as it is (a retried publish). Another running experiment is stopped first (the nightly
    challenger replaces it). Raises `ExperimentConflict` when a bundle is missing or the
    two do not fit in `server.max_models`."""
    store = ExperimentStore(experiments_file(settings))
    wanted = ((CHAMPION_ARM, champion), (CHALLENGER_ARM, challenger))
    running = store.running()
    if running is not None and running.name == name and tuple(
            (a.name, a.model_version) for a in running.arms) == wanted:
        return running
    try:
        experiment = new_experiment(
            name, [{"name": CHAMPION_ARM, "share": 1.0 - share, "model_version": champion},
                   {"name": CHALLENGER_ARM, "share": share, "model_version": challenger}],
            traffic=traffic,
            description=f"nightly challenger {challenger} against the champion {champion}")
    except ExperimentError as exc:  # a config value out of range
        raise ExperimentConflict(f"publish.into_experiment: {exc}") from None
    models_dir = Path(settings.model.dir)
    check_models(experiment, models_dir, settings.server.max_models)  # before stopping any
    if running is not None:
        store.stop(running.experiment_id)
    return store.create(experiment, models_dir=models_dir,
                        max_models=settings.server.max_models)


# -- promotion ---------------------------------------------------------------------------
def promote(settings: Settings, experiment_id: str, arm_name: str, *,
            notify: bool = False) -> dict[str, Any]:
    """Make the arm's model the champion and stop the experiment.

    CURRENT is moved with `lake.rollback.run` (the version must be a valid, not rejected
    bundle; `model_runs` records it `current`, the old champion `published`, so
    `python -m lake.rollback` returns to it). The champion's own arm changes nothing but
    the experiment's state. `notify`: ask `airflow.reload_targets` to reload now (servers
    otherwise pick CURRENT up when they poll or restart).
    """
    from lake import rollback
    from lake.model_runs import PUBLISHED

    store = ExperimentStore(experiments_file(settings))
    experiment = store.get(experiment_id)
    arm = experiment.arm(arm_name)
    if arm.popularity:
        raise ExperimentConflict(f"arm {arm_name!r} is the popularity ranking: there is no "
                                 "model to promote")
    models_dir = Path(settings.model.dir)
    out: dict[str, Any] = {"job": "promote", "experiment_id": experiment_id, "arm": arm_name,
                           "previous_current": current_version(models_dir)}
    if arm.model_version and arm.model_version != out["previous_current"]:
        try:
            moved = rollback.run(settings, version=arm.model_version,
                                 previous_status=PUBLISHED)
        except rollback.RollbackError as exc:
            raise ExperimentConflict(f"cannot promote arm {arm_name!r}: {exc}") from None
        out["current"] = moved["current"]
    else:
        out["current"] = out["previous_current"]
    if arm.settings:
        out["note"] = (f"the arm's settings {dict(arm.settings)} are serving settings, not "
                       "part of the model: they do not carry over")
    out["experiment"] = store.stop(experiment_id).to_json()
    if notify and out["current"]:
        from lake.reload_notice import notify_reload
        from lake.tls import own_client_tls

        out["reload"] = notify_reload(settings.airflow.reload_targets or [],
                                      settings.server.admin_token, out["current"],
                                      fleet_dir=settings.fleet.run_dir,
                                      tls=own_client_tls(settings.server))
    return out


# -- CLI ---------------------------------------------------------------------------------
def parse_arm(text: str) -> dict[str, Any]:
    """`NAME:SHARE[:MODEL[:KEY=VALUE,...]]` as an arm definition (see the module doc)."""
    parts = text.split(":", 3)
    if len(parts) < 2:
        raise ExperimentError("--arm", f"{text!r}: expected NAME:SHARE[:MODEL[:KEY=VALUE,...]]")
    try:
        share = float(parts[1])
    except ValueError:
        raise ExperimentError("--arm", f"{text!r}: share {parts[1]!r} is not a number") from None
    model = parts[2] if len(parts) > 2 else ""
    arm: dict[str, Any] = {"name": parts[0], "share": share, "model_version": "",
                           "popularity": model == POPULARITY_TOKEN}
    if model not in ("", CHAMPION_TOKEN, POPULARITY_TOKEN):
        arm["model_version"] = model
    settings = {}
    for pair in (parts[3].split(",") if len(parts) > 3 and parts[3] else []):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ExperimentError("--arm", f"{text!r}: setting {pair!r} is not KEY=VALUE")
        settings[key.strip()] = value.strip()
    arm["settings"] = settings
    return arm


def main(argv: Sequence[str] | None = None) -> int:
    """Print the result as JSON; a problem the caller can fix is one line on stderr, exit 2."""
    p = argparse.ArgumentParser(prog="python -m lake.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help="YAML settings file (default: $LAMBDAREC_CONFIG or infra/lambdarec.yaml)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="start an experiment (at most one runs at a time)")
    c.add_argument("--name", required=True)
    c.add_argument("--arm", action="append", required=True, metavar="NAME:SHARE[:MODEL[:K=V]]",
                   help=f"an arm; MODEL: a version, empty or {CHAMPION_TOKEN} (the champion), "
                        f"{POPULARITY_TOKEN}; settings: {', '.join(SETTINGS)}")
    c.add_argument("--traffic", type=float, default=1.0, help="share of users taking part")
    c.add_argument("--salt", default="", help="assignment salt (default: a random one)")
    c.add_argument("--description", default="")
    sub.add_parser("list", help="every experiment, newest first")
    for name, text in (("show", "one experiment"), ("stop", "stop an experiment")):
        sub.add_parser(name, help=text).add_argument("experiment_id")
    pr = sub.add_parser("promote", help="make an arm's model CURRENT and stop the experiment")
    pr.add_argument("experiment_id")
    pr.add_argument("arm")
    pr.add_argument("--notify", action="store_true",
                    help="ask airflow.reload_targets to reload now")
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        settings = load_settings(args.config)
        store = ExperimentStore(experiments_file(settings))
        out: Any
        if args.cmd == "create":
            exp = new_experiment(args.name, [parse_arm(a) for a in args.arm],
                                 traffic=args.traffic, salt=args.salt,
                                 description=args.description)
            out = store.create(exp, models_dir=Path(settings.model.dir),
                               max_models=settings.server.max_models).to_json()
        elif args.cmd == "list":
            out = {"file": str(store.path), "experiments": [e.to_json() for e in store.load()]}
        elif args.cmd == "show":
            out = store.get(args.experiment_id).to_json()
        elif args.cmd == "stop":
            out = store.stop(args.experiment_id).to_json()
        else:
            out = promote(settings, args.experiment_id, args.arm, notify=args.notify)
    except (ConfigError, ExperimentError, ExperimentConflict, StoreError, BundleError,
            LakeError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    except ExperimentNotFound as exc:
        print(f"{p.prog}: error: {exc.args[0]}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
