"""Write-ahead log: append-only segment files of length-prefixed, CRC-checked records.

The online ingest path acknowledges an event only once its record is on stable storage.
This module owns the on-disk format and the durability protocol; it knows nothing about
events (payloads are opaque bytes with a one-byte record type).

On-disk layout (`wal_dir`):

    LOCK                         flock()ed by the one process that owns the log
    00000000000000000001.wal     segment; the name is the sequence number of its first record
    00000000000000000815.wal     ...the newest segment is the only one ever appended to

Record frame (little endian)::

    u32 length   number of bytes after the 16-byte header (= 1 + len(payload))
    u32 crc32    zlib.crc32 over seq (8 bytes) + rtype (1 byte) + payload
    u64 seq      sequence number: +1 per record, never reused, across segments
    u8  rtype    record type (opaque to the log)
    ... payload

Recovery (`WriteAheadLog.open`): every segment is scanned in order. A frame that is cut
short, has an impossible length, a CRC mismatch or a sequence number that does not follow
its predecessor ends the log: in the newest segment this is the torn tail of a write that
was never acknowledged, and the file is truncated back to the last good record. The same
damage in an older segment (which was fsynced before the next one was created) is real
corruption and raises `WALCorruptError` rather than skipping acknowledged data.

Group commit: `write()` appends a frame with `os.write` under the log's lock (so file order
is sequence order) and `sync(seq)` makes it durable. Concurrent callers share fsyncs: the
first waiter becomes the leader, optionally lingers `fsync_interval_ms` to gather more
writers (only when the previous group had company, so a lone caller pays no delay), then
fdatasyncs once for everything written so far; the others wait on a condition variable.
A failed fsync poisons the log (`WALError` for every later call): after a failed fsync
the kernel may have dropped the dirty pages, so nothing written since can be trusted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

HEADER = struct.Struct("<IIQ")
SEQ = struct.Struct("<Q")
SUFFIX = ".wal"
LOCK_NAME = "LOCK"
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
MAX_RECORD_BYTES = 256 * 1024 * 1024


class WALError(RuntimeError):
    """The log cannot be used (failed fsync, closed, I/O error)."""


class WALLockedError(WALError):
    """Another process (or another WriteAheadLog in this one) owns the directory."""


class WALCorruptError(WALError):
    """A record in an already-sealed segment is damaged: acknowledged data would be lost."""


@dataclass(frozen=True)
class Record:
    seq: int
    rtype: int
    payload: bytes


def encode_frame(seq: int, rtype: int, payload: bytes) -> bytes:
    if not 0 <= rtype <= 255:
        raise ValueError(f"record type must be 0..255, got {rtype}")
    body = SEQ.pack(seq) + bytes((rtype,)) + payload
    if len(body) - 8 > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
    return HEADER.pack(len(payload) + 1, zlib.crc32(body), seq) + body[8:]


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SUFFIX}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def scan_segment(path: Path, expect_seq: int | None) -> tuple[list[Record], int, str | None]:
    """Read the good records of one segment.

    Returns (records, end offset of the last good record, why scanning stopped early or
    None when the whole file was good). `expect_seq` is the sequence number the first
    record must carry (None: whatever the first record says).
    """
    data = path.read_bytes()
    records: list[Record] = []
    off = 0
    n = len(data)
    while off < n:
        if n - off < HEADER.size + 1:
            return records, off, f"partial header at offset {off}"
        length, crc, seq = HEADER.unpack_from(data, off)
        if length < 1 or length > MAX_RECORD_BYTES + 1:
            return records, off, f"impossible length {length} at offset {off}"
        end = off + HEADER.size + length
        if end > n:
            return records, off, f"record at offset {off} cut short ({n - off}/{end - off} bytes)"
        body = data[off + 8 : end]  # seq + rtype + payload, exactly what the CRC covers
        if zlib.crc32(body) != crc:
            return records, off, f"CRC mismatch at offset {off}"
        if expect_seq is not None and seq != expect_seq:
            return records, off, f"sequence {seq} at offset {off}, expected {expect_seq}"
        records.append(Record(seq, data[off + HEADER.size], data[off + HEADER.size + 1 : end]))
        expect_seq = seq + 1
        off = end
    return records, off, None


class WriteAheadLog:
    """An append-only, segmented, group-committed log in one directory.

    Use `WriteAheadLog.open(dir)` (it recovers the directory and takes its lock), then
    `replay()` once to read back what survived, `append()` / `write()`+`sync()` to add
    records, `release_upto(seq)` once records are safely elsewhere, `close()` at the end.
    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync_interval_ms: float = 2.0,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        min_seq: int = 1,
    ) -> None:
        if segment_bytes < 1024:
            raise ValueError(f"segment_bytes must be >= 1024, got {segment_bytes}")
        self.dir = Path(directory)
        self.fsync_interval_s = max(0.0, fsync_interval_ms) / 1000.0
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._active: Path | None = None
        self._active_size = 0
        self._segments: list[tuple[int, Path]] = []  # (first seq, path), oldest first
        self._recovered: list[Record] = []
        self._next_seq = min_seq
        self._written_seq = min_seq - 1
        self._synced_seq = min_seq - 1
        self._syncing = False
        self._last_group = 1
        self._failed: BaseException | None = None
        self._closed = False
        self.fsyncs = 0
        self.truncated: list[str] = []
        """Human-readable notes on torn tails cut off during recovery."""

    # -- opening / recovery --------------------------------------------------------------
    @classmethod
    def open(
        cls,
        directory: Path | str,
        *,
        fsync_interval_ms: float = 2.0,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        min_seq: int = 1,
    ) -> WriteAheadLog:
        """Lock and recover `directory`; new records get seq >= max(min_seq, last + 1).

        `min_seq` also states that every record below it is stored elsewhere: a gap in
        the retained segments is corruption unless it lies wholly below `min_seq`.
        """
        wal = cls(Path(directory), fsync_interval_ms=fsync_interval_ms,
                  segment_bytes=segment_bytes, min_seq=min_seq)
        wal._open(min_seq)
        return wal

    def _open(self, min_seq: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WALLockedError(f"WAL directory {self.dir} is in use by another writer") \
                    from exc
            raise
        self._lock_fd = lock_fd
        try:
            self._recover(min_seq)
        except BaseException:
            self._release_lock()
            raise

    def _recover(self, min_seq: int) -> None:
        segs = sorted(
            (int(p.name[: -len(SUFFIX)]), p)
            for p in self.dir.iterdir()
            if p.name.endswith(SUFFIX) and p.name[: -len(SUFFIX)].isdigit()
        )
        records: list[Record] = []
        prev_end = 1  # the seq the next segment should start at
        for i, (first, path) in enumerate(segs):
            if first < prev_end:
                raise WALCorruptError(f"{path.name}: starts at seq {first}, expected {prev_end}")
            if first > prev_end and first > min_seq:
                # Records prev_end..first-1 are gone. That is fine only when all of them are
                # known to be stored elsewhere (below min_seq), e.g. released segments.
                raise WALCorruptError(
                    f"{path.name}: records {prev_end}..{first - 1} are missing and not below "
                    f"min_seq {min_seq} (not known to be stored elsewhere)")
            recs, good_end, problem = scan_segment(path, first)
            if problem is not None:
                if any(p.stat().st_size > 0 for _, p in segs[i + 1:]):
                    raise WALCorruptError(f"{path.name}: {problem}, but later segments hold data")
                self.truncated.append(f"{path.name}: {problem}; truncated to {good_end} bytes")
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                    f.flush()
                    os.fsync(f.fileno())
            records.extend(recs)
            prev_end = recs[-1].seq + 1 if recs else first
        # Empty segments (a crash right after rotation, or a truncated torn first record)
        # carry nothing: remove them; appending always goes to a segment we can name.
        kept: list[tuple[int, Path]] = []
        for first, path in segs:
            if path.stat().st_size == 0:
                path.unlink()
            else:
                kept.append((first, path))
        last = records[-1].seq if records else 0
        nxt = max(min_seq, last + 1)
        self._recovered = records
        self._next_seq = nxt
        self._written_seq = self._synced_seq = nxt - 1
        self._segments = kept
        # Keep appending to the newest segment when sequence numbers continue in it and it
        # has room; otherwise start a fresh segment named by the next sequence number.
        if kept and last + 1 == nxt and kept[-1][1].stat().st_size < self.segment_bytes:
            path = kept[-1][1]
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            self._active = path
            self._active_size = path.stat().st_size
        else:
            self._new_segment(nxt)
        _fsync_dir(self.dir)

    def _new_segment(self, first_seq: int) -> None:
        path = self.dir / _segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fd = fd
        self._active = path
        self._active_size = 0
        self._segments.append((first_seq, path))

    def replay(self) -> list[Record]:
        """The records that survived recovery, in sequence order (handed out once)."""
        out, self._recovered = self._recovered, []
        return out

    # -- appending -------------------------------------------------------------------------
    def _check(self) -> None:
        if self._failed is not None:
            raise WALError(f"WAL unusable after an earlier I/O error: {self._failed}") \
                from self._failed
        if self._closed:
            raise WALError("WAL is closed")

    def write(self, rtype: int, payload: bytes) -> int:
        """Append one record to the OS (not yet durable); returns its sequence number."""
        with self._lock:
            self._check()
            seq = self._next_seq
            frame = encode_frame(seq, rtype, payload)
            if self._active_size and self._active_size + len(frame) > self.segment_bytes:
                self._rotate_locked()
            assert self._fd is not None
            try:
                view = memoryview(frame)
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
            except OSError as exc:
                self._failed = exc
                self._cond.notify_all()
                raise WALError(f"WAL write failed: {exc}") from exc
            self._active_size += len(frame)
            self._next_seq = seq + 1
            self._written_seq = seq
            return seq

    def sync(self, seq: int) -> None:
        """Return once every record up to `seq` is on stable storage (group commit)."""
        with self._lock:
            while self._synced_seq < seq:
                self._check()
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                try:
                    if self.fsync_interval_s and self._last_group > 1:
                        self._lock.release()
                        try:
                            time.sleep(self.fsync_interval_s)
                        finally:
                            self._lock.acquire()
                    target = self._written_seq
                    fd = self._fd
                    first_in_group = self._synced_seq + 1
                    self._lock.release()
                    try:
                        err: BaseException | None = None
                        try:
                            os.fdatasync(fd)  # type: ignore[arg-type]
                        except OSError as exc:
                            err = exc
                    finally:
                        self._lock.acquire()
                    self.fsyncs += 1
                    if err is not None:
                        self._failed = err
                        raise WALError(f"WAL fsync failed: {err}") from err
                    self._last_group = target - first_in_group + 1
                    if target > self._synced_seq:
                        self._synced_seq = target
                finally:
                    self._syncing = False
                    self._cond.notify_all()

    def append(self, rtype: int, payload: bytes) -> int:
        """write() + sync(): the record is durable when this returns."""
        seq = self.write(rtype, payload)
        self.sync(seq)
        return seq

    def _rotate_locked(self) -> None:
        """Seal the active segment (fsynced) and start the next one. Caller holds the lock."""
        while self._syncing:  # never close the fd under a running fsync
            self._cond.wait()
        self._check()
        assert self._fd is not None
        try:
            os.fdatasync(self._fd)
            self.fsyncs += 1
            os.close(self._fd)
            self._fd = None
            self._synced_seq = self._written_seq
            self._new_segment(self._next_seq)
            _fsync_dir(self.dir)
        except OSError as exc:
            self._failed = exc
            self._cond.notify_all()
            raise WALError(f"WAL rotation failed: {exc}") from exc
        self._cond.notify_all()

    def seal(self) -> None:
        """Seal the active segment now (fsynced) when it holds records, so `release_upto`
        deletes it as soon as its records are stored elsewhere, however small it is."""
        with self._lock:
            self._check()
            if self._active_size:
                self._rotate_locked()

    # -- trimming ----------------------------------------------------------------------------
    def release_upto(self, seq: int, *, rotate_min_bytes: int = 1024 * 1024) -> int:
        """Delete segments whose records all have seq <= `seq` (they live elsewhere now).

        The active segment is sealed and deleted too when it is wholly released and at
        least `rotate_min_bytes` long (0: always), so disk use stays bounded. Returns the
        number of segments deleted.
        """
        with self._lock:
            self._check()
            if (
                self._written_seq <= seq
                and self._active_size
                and self._active_size >= rotate_min_bytes
            ):
                self._rotate_locked()
            deleted = 0
            keep: list[tuple[int, Path]] = []
            for i, (first, path) in enumerate(self._segments):
                nxt_first = (
                    self._segments[i + 1][0] if i + 1 < len(self._segments) else None
                )
                # A sealed segment holds [first, next segment's first - 1].
                if path != self._active and nxt_first is not None and nxt_first - 1 <= seq:
                    path.unlink(missing_ok=True)
                    deleted += 1
                else:
                    keep.append((first, path))
            self._segments = keep
            if deleted:
                _fsync_dir(self.dir)
            return deleted

    # -- inspection / shutdown ----------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        return self._written_seq

    @property
    def synced_seq(self) -> int:
        return self._synced_seq

    def size_bytes(self) -> int:
        with self._lock:
            total = 0
            for _, path in self._segments:
                if path == self._active:
                    total += self._active_size
                else:
                    try:
                        total += path.stat().st_size
                    except FileNotFoundError:
                        pass
            return total

    def segments(self) -> list[Path]:
        with self._lock:
            return [p for _, p in self._segments]

    def close(self, *, delete_all: bool = False) -> None:
        """fsync and close. `delete_all` removes every segment (caller: all are released)."""
        with self._lock:
            if self._closed:
                return
            while self._syncing:
                self._cond.wait()
            try:
                if self._fd is not None:
                    if self._failed is None:
                        os.fdatasync(self._fd)
                        self.fsyncs += 1
                        self._synced_seq = self._written_seq
                    os.close(self._fd)
                    self._fd = None
                if delete_all and self._failed is None:
                    for _, path in self._segments:
                        path.unlink(missing_ok=True)
                    self._segments = []
                    _fsync_dir(self.dir)
            finally:
                self._closed = True
                self._cond.notify_all()
                self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None
