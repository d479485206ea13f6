"""Access keys of the public Recommender service: the keys file and its CLI.

    python -m online.keys create --name shop1 --scopes recommend,ingest   # prints the key once
    python -m online.keys create --name support --scopes recommend,history  # + explain reasons
    python -m online.keys list
    python -m online.keys revoke shop1                                    # by name or id

The file (`server.keys_file`) holds each key's name, id, scopes and the sha256 of the key,
never the key itself: keys are 256-bit random strings, so a plain hash is enough (no slow
password hash needed) and a leaked file lets nobody in. Writes are atomic (a new file renamed
over the old one, under a lock), so a running server never reads half a file.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import secrets
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from lake.config import ConfigError, Settings, load_settings

SCOPES: tuple[str, ...] = ("recommend", "ingest", "catalogue", "history")
"""recommend: Recommend, RecommendBatch, SimilarItems; ingest: IngestEvents;
catalogue: UpsertItems; history: the user's own items as the "because" reasons of
`explain=true` (a user's history is personal data: without this scope explain answers the
recommendations without them)."""
KEY_PREFIX = "lrk_"


def keys_file(settings: Settings) -> Path:
    """`server.keys_file`, by default next to the lake's tables (shared by its servers)."""
    return settings.server.keys_file or settings.lake.root / "access_keys.json"


class KeysError(ValueError):
    """A bad keys file or a bad request to change it: one line for the caller."""


@dataclass(frozen=True)
class AccessKey:
    id: str
    name: str
    scopes: tuple[str, ...]
    sha256: str
    created_at: str


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_scopes(text: str) -> tuple[str, ...]:
    scopes = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise KeysError(f"--scopes: unknown scope {unknown[0]!r} (known: {', '.join(SCOPES)})"
                        if unknown else f"--scopes: give at least one of {', '.join(SCOPES)}")
    return scopes


class KeyStore:
    """The keys file: read by the server, changed by the CLI."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> list[AccessKey]:
        """The keys; a missing file is no keys, an unreadable one a `KeysError`."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise KeysError(f"{self.path}: cannot read: {exc.strerror or exc}") from exc
        try:
            rows = json.loads(text)["keys"]
            return [AccessKey(id=str(r["id"]), name=str(r["name"]),
                              scopes=tuple(r["scopes"]), sha256=str(r["sha256"]),
                              created_at=str(r["created_at"])) for r in rows]
        except (ValueError, KeyError, TypeError) as exc:
            raise KeysError(f"{self.path}: not a keys file written by `python -m online.keys` "
                            f"({type(exc).__name__}: {exc})") from exc

    @contextmanager
    def _locked(self) -> Iterator[list[AccessKey]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield self.load()

    def _write(self, keys: list[AccessKey]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # hashes, still private
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [asdict(k) for k in keys]}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def create(self, name: str, scopes: Sequence[str]) -> tuple[AccessKey, str]:
        """A new key named `name`; returns it and the secret (shown once, never stored)."""
        if not name.strip():
            raise KeysError("--name: must not be blank")
        with self._locked() as keys:
            if any(k.name == name for k in keys):
                raise KeysError(f"--name: a key named {name!r} exists (revoke it first)")
            secret = KEY_PREFIX + secrets.token_urlsafe(32)
            key = AccessKey(id=secrets.token_hex(4), name=name, scopes=tuple(scopes),
                            sha256=key_hash(secret),
                            created_at=datetime.now(UTC).isoformat(timespec="seconds"))
            self._write([*keys, key])
        return key, secret

    def revoke(self, name_or_id: str) -> AccessKey:
        with self._locked() as keys:
            gone = [k for k in keys if name_or_id in (k.name, k.id)]
            if not gone:
                raise KeysError(f"no key named or with id {name_or_id!r} in {self.path}")
            self._write([k for k in keys if k not in gone])
        return gone[0]


def _public(k: AccessKey) -> dict[str, object]:
    return {"id": k.id, "name": k.name, "scopes": list(k.scopes), "created_at": k.created_at}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m online.keys", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, help="keys file (default: server.keys_file)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create a key and print it (shown only this once)")
    c.add_argument("--name", required=True, help="who uses the key, e.g. the shop backend")
    c.add_argument("--scopes", required=True,
                   help=f"comma-separated: {','.join(SCOPES)} (history: the 'because' items "
                        "of Recommend explain=true, i.e. the user's own history)")
    sub.add_parser("list", help="the keys (names, ids, scopes; never the keys)")
    r = sub.add_parser("revoke", help="delete a key (running servers drop it within a second)")
    r.add_argument("key", help="name or id")
    args = p.parse_args(argv)
    try:
        store = KeyStore(args.file or keys_file(load_settings()))
        if args.cmd == "create":
            key, secret = store.create(args.name, parse_scopes(args.scopes))
            out: object = {**_public(key), "key": secret,
                           "note": "send as 'authorization: Bearer <key>'; it is not stored "
                                   "and cannot be shown again"}
        elif args.cmd == "list":
            out = {"file": str(store.path), "keys": [_public(k) for k in store.load()]}
        else:
            out = {"revoked": _public(store.revoke(args.key))}
    except (KeysError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
