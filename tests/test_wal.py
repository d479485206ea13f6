"""The write-ahead log on real files: round trip, torn tails, corruption, rotation, group commit."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from online.wal import (
    HEADER,
    WALCorruptError,
    WALLockedError,
    WriteAheadLog,
    encode_frame,
)


def payload(i: int, size: int = 20) -> bytes:
    return (f"record-{i:05d}-" + "x" * size).encode()


def fill(d: Path, n: int, **kw: object) -> None:
    wal = WriteAheadLog.open(d, **kw)  # type: ignore[arg-type]
    for i in range(1, n + 1):
        assert wal.append(1, payload(i)) == i
    wal.close()


def reopen(d: Path, **kw: object) -> tuple[WriteAheadLog, list]:
    wal = WriteAheadLog.open(d, **kw)  # type: ignore[arg-type]
    return wal, wal.replay()


def only_segment(d: Path) -> Path:
    (seg,) = sorted(d.glob("*.wal"))
    return seg


def test_round_trip_and_sequence_continues(tmp_path: Path) -> None:
    wal = WriteAheadLog.open(tmp_path)
    assert wal.replay() == []
    seqs = [wal.append(7, b"a"), wal.append(9, b""), wal.append(255, bytes(range(256)))]
    assert seqs == [1, 2, 3]
    wal.close()
    wal, recs = reopen(tmp_path)
    assert [(r.seq, r.rtype, r.payload) for r in recs] == [
        (1, 7, b"a"), (2, 9, b""), (3, 255, bytes(range(256)))]
    assert wal.append(1, b"next") == 4
    wal.close()
    wal, recs = reopen(tmp_path)
    assert [r.seq for r in recs] == [1, 2, 3, 4]
    assert recs[-1].payload == b"next"
    wal.close()


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(lambda: encode_frame(6, 1, payload(6))[:-7], id="half-record"),
        pytest.param(lambda: encode_frame(6, 1, payload(6))[:HEADER.size - 3], id="half-header"),
        pytest.param(lambda: b"\x00" * 4096, id="zero-filled"),
        pytest.param(lambda: os.urandom(1000), id="garbage"),
        pytest.param(lambda: b"\xff\xff\xff\x7f" + b"\x00" * 40, id="huge-length"),
    ],
)
def test_torn_tail_is_truncated_never_misread(tmp_path: Path, tail) -> None:  # type: ignore[no-untyped-def]
    fill(tmp_path, 5)
    seg = only_segment(tmp_path)
    good_size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(tail())
    wal, recs = reopen(tmp_path)
    assert [r.seq for r in recs] == [1, 2, 3, 4, 5]
    assert [r.payload for r in recs] == [payload(i) for i in range(1, 6)]
    assert seg.stat().st_size == good_size
    assert wal.truncated and seg.name in wal.truncated[0]
    assert wal.append(1, b"after") == 6  # appends continue right after the last good record
    wal.close()
    wal, recs = reopen(tmp_path)
    assert [r.seq for r in recs] == [1, 2, 3, 4, 5, 6]
    assert wal.truncated == []
    wal.close()


def test_flipped_bit_in_last_record_drops_only_that_record(tmp_path: Path) -> None:
    fill(tmp_path, 5)
    seg = only_segment(tmp_path)
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0x01  # inside record 5's payload: its CRC no longer matches
    seg.write_bytes(bytes(data))
    wal, recs = reopen(tmp_path)
    assert [r.seq for r in recs] == [1, 2, 3, 4]
    assert "CRC" in wal.truncated[0]
    assert wal.append(1, b"again") == 5
    wal.close()


def test_damage_in_a_sealed_segment_is_an_error_not_a_skip(tmp_path: Path) -> None:
    fill(tmp_path, 120, segment_bytes=1024)  # ~45-byte records: several segments
    segs = sorted(tmp_path.glob("*.wal"))
    assert len(segs) >= 5
    data = bytearray(segs[0].read_bytes())
    data[HEADER.size + 3] ^= 0xFF
    segs[0].write_bytes(bytes(data))
    with pytest.raises(WALCorruptError, match="later segments hold data"):
        WriteAheadLog.open(tmp_path, segment_bytes=1024)
    # the failed open released the directory lock; a missing segment is corruption too...
    segs[0].unlink()
    segs[2].unlink()
    second = int(segs[1].stem)
    third_end = int(segs[3].stem) - 1
    with pytest.raises(WALCorruptError, match="missing"):
        WriteAheadLog.open(tmp_path, segment_bytes=1024)
    # ...unless the caller knows the missing records are stored elsewhere (below min_seq)
    with pytest.raises(WALCorruptError, match="missing"):
        WriteAheadLog.open(tmp_path, segment_bytes=1024, min_seq=second)
    wal = WriteAheadLog.open(tmp_path, segment_bytes=1024, min_seq=third_end + 1)
    seqs = [r.seq for r in wal.replay()]
    assert seqs[0] == second and third_end + 1 in seqs and seqs[-1] == 120
    wal.close()


def test_rotation_release_and_min_seq(tmp_path: Path) -> None:
    wal = WriteAheadLog.open(tmp_path, segment_bytes=1024)
    for i in range(1, 101):
        wal.append(1, payload(i))
    segs = wal.segments()
    assert len(segs) > 3
    firsts = [int(p.stem) for p in segs]
    assert firsts[0] == 1 and firsts == sorted(firsts)
    deleted = wal.release_upto(50)
    assert deleted >= 1
    remaining = [int(p.stem) for p in wal.segments()]
    assert remaining[0] <= 51  # the segment holding 51 is kept
    assert all(p.exists() for p in wal.segments())
    wal.close()
    with pytest.raises(WALCorruptError, match="missing"):  # 1..first-1 released: say so
        WriteAheadLog.open(tmp_path, segment_bytes=1024)
    wal, recs = reopen(tmp_path, segment_bytes=1024, min_seq=51)
    seqs = [r.seq for r in recs]
    assert seqs == list(range(remaining[0], 101))
    wal.close()
    # Everything released and removed: a new log must continue above min_seq, not at 1.
    wal = WriteAheadLog.open(tmp_path, segment_bytes=1024, min_seq=51)
    wal.replay()
    wal.release_upto(100, rotate_min_bytes=0)
    wal.close(delete_all=True)
    assert list(tmp_path.glob("*.wal")) == []
    wal = WriteAheadLog.open(tmp_path, segment_bytes=1024, min_seq=101)
    assert wal.append(1, b"x") == 101
    wal.close()
    # min_seq may jump ahead of a retained log (e.g. the lake committed further than the log)
    wal = WriteAheadLog.open(tmp_path, segment_bytes=1024, min_seq=500)
    assert [r.seq for r in wal.replay()] == [101]
    assert wal.append(1, b"y") == 500
    wal.close()
    wal, recs = reopen(tmp_path, segment_bytes=1024, min_seq=500)
    assert [r.seq for r in recs] == [101, 500]
    wal.close()
    with pytest.raises(WALCorruptError, match="missing"):  # 102..499 unaccounted for
        WriteAheadLog.open(tmp_path, segment_bytes=1024)


def test_directory_is_locked_to_one_writer(tmp_path: Path) -> None:
    wal = WriteAheadLog.open(tmp_path)
    with pytest.raises(WALLockedError):
        WriteAheadLog.open(tmp_path)
    wal.close()
    WriteAheadLog.open(tmp_path).close()


def test_group_commit_shares_fsyncs_across_threads(tmp_path: Path) -> None:
    threads, per_thread = 8, 60
    wal = WriteAheadLog.open(tmp_path, fsync_interval_ms=2.0)
    acked: list[list[int]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def worker(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            seq = wal.append(1, f"{t}:{i}".encode())
            assert wal.synced_seq >= seq  # acknowledged only once durable
            acked[t].append(seq)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    total = threads * per_thread
    fsyncs = wal.fsyncs
    wal.close()
    all_seqs = sorted(s for a in acked for s in a)
    assert all_seqs == list(range(1, total + 1))  # unique, gap-free sequence numbers
    assert fsyncs < total / 2, f"{fsyncs} fsyncs for {total} appends: no group commit"
    wal, recs = reopen(tmp_path)
    got = {r.payload.decode() for r in recs}
    assert got == {f"{t}:{i}" for t in range(threads) for i in range(per_thread)}
    # each thread's records are in its own order
    for t in range(threads):
        mine = [int(r.payload.decode().split(":")[1]) for r in recs
                if r.payload.decode().startswith(f"{t}:")]
        assert mine == list(range(per_thread))
    wal.close()
