"""Which ingest node a process is, and proof that no live process is the same node.

Every replica flushes its WAL to bronze under the Delta app transaction
`lambdarec-wal-<node_id>`; the transaction's version says which WAL records bronze already
holds. Two live replicas with one node id would each skip the other's sequence numbers and
release WAL records that never reached bronze, so a process claims its identity before it
touches the WAL:

* the id lives in `<wal_dir>/NODE`, written once: a fresh WAL directory gets
  `node-<12 hex>` (random, so two machines with the same path never collide) unless
  `server.node_id` names one; a WAL directory with segments but no NODE file was written
  before ids were recorded and keeps the old fixed id `node-0`;
* `<wal_dir>/NODE` is flock()ed for the life of the process (a second process on the same
  WAL directory is refused), and so is `<lake root>/_nodes/<node_id>.lock` when the lake is
  a local directory (a second process with the same id on another WAL directory is refused;
  an object-store lake cannot be locked this way: give each replica its own `server.node_id`).

flock() locks die with their process, so a crash leaves nothing to clean up.
"""

from __future__ import annotations

import fcntl
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from online.wal import SUFFIX

NODE_FILE = "NODE"
NODES_DIR = "_nodes"
LEGACY_NODE_ID = "node-0"
_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class NodeIdentityError(RuntimeError):
    """The node id is invalid, disagrees with the WAL directory, or a live process holds it."""


def check_node_id(node_id: str, source: str = "server.node_id") -> str:
    if not _NODE_ID.fullmatch(node_id):
        raise NodeIdentityError(
            f"{source}: must be 1-64 characters of [A-Za-z0-9_-], got {node_id!r}")
    return node_id


def _flock(path: Path) -> int | None:
    """An exclusive, non-blocking flock on `path` (created if missing), or None if held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _holder_pid(path: Path) -> str:
    try:
        return path.read_text().split("pid=")[-1].strip() or "?"
    except OSError:
        return "?"


@dataclass
class NodeClaim:
    """A held node identity; `release()` (or process exit) gives it up."""

    node_id: str
    wal_dir: Path
    _fds: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def acquire(cls, wal_dir: Path | str, lake_root: Path | str | None,
                configured: str | None = None) -> NodeClaim:
        wal = Path(wal_dir)
        wal.mkdir(parents=True, exist_ok=True)
        if configured is not None:
            check_node_id(configured)
        node_file = wal / NODE_FILE
        fd = _flock(node_file)
        if fd is None:
            raise NodeIdentityError(
                f"server.wal_dir: {wal} is in use by another live process; "
                "each replica needs its own WAL directory")
        claim = cls("", wal, [fd])
        try:
            claim.node_id = claim._resolve(fd, configured)
            if lake_root is not None and "://" not in str(lake_root):
                claim._hold_in_lake(Path(lake_root))
        except BaseException:
            claim.release()
            raise
        return claim

    def _resolve(self, fd: int, configured: str | None) -> str:
        recorded = os.pread(fd, 256, 0).decode("ascii", "replace").strip()
        if recorded:
            check_node_id(recorded, f"{self.wal_dir / NODE_FILE}")
            if configured is not None and configured != recorded:
                raise NodeIdentityError(
                    f"server.node_id: {configured!r} differs from {recorded!r} recorded in "
                    f"{self.wal_dir / NODE_FILE}; a WAL directory keeps the id it was written "
                    "under (unset server.node_id, or give this node a new WAL directory)")
            return recorded
        has_segments = any(p.suffix == SUFFIX for p in self.wal_dir.iterdir())
        if has_segments:
            if configured is not None and configured != LEGACY_NODE_ID:
                raise NodeIdentityError(
                    f"server.node_id: {configured!r}, but {self.wal_dir} holds WAL segments "
                    f"written as {LEGACY_NODE_ID!r}; start once without server.node_id")
            node_id = LEGACY_NODE_ID
        else:
            node_id = configured or f"node-{uuid.uuid4().hex[:12]}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{node_id}\n".encode("ascii"), 0)
        os.fsync(fd)
        return node_id

    def _hold_in_lake(self, lake_root: Path) -> None:
        nodes = lake_root / NODES_DIR
        nodes.mkdir(parents=True, exist_ok=True)
        path = nodes / f"{self.node_id}.lock"
        fd = _flock(path)
        if fd is None:
            raise NodeIdentityError(
                f"server.node_id: {self.node_id!r} is held by another live process on this "
                f"lake (pid {_holder_pid(path)}); each replica needs its own node id")
        self._fds.append(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"wal_dir={self.wal_dir.resolve()} pid={os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the descriptor drops its flock
        self._fds.clear()
