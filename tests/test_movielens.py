"""MovieLens loaders against the real files, checked with the published counts.

The data is read in place from `settings.data.dir` (never copied); tests skip when it is absent.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from lake import movielens
from lake.config import load_settings
from lake.schemas import BRONZE_EVENTS, ITEMS
from lake.validation import validate_events_table


def _data_dir(source: str) -> Path:
    d = load_settings().data.dir
    if not (d / source).is_dir():
        pytest.skip(f"MovieLens {source} not found at {d / source} (set LAMBDAREC__DATA__DIR)")
    return d


@pytest.fixture(scope="module")
def ml100k() -> tuple[pa.Table, pa.Table]:
    d = _data_dir("ml-100k")
    return pa.concat_tables(movielens.ml100k_events(d)), movielens.ml100k_items(d)


@pytest.fixture(scope="module")
def ml1m() -> tuple[pa.Table, pa.Table]:
    d = _data_dir("ml-1m")
    return pa.concat_tables(movielens.ml1m_events(d)), movielens.ml1m_items(d)


def _distinct(t: pa.Table, col: str) -> int:
    return int(pc.count_distinct(t.column(col)).as_py())


def _ts(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def test_ml100k_published_counts(ml100k: tuple[pa.Table, pa.Table]) -> None:
    events, items = ml100k
    assert events.schema == BRONZE_EVENTS.schema
    assert events.num_rows == 100_000
    assert _distinct(events, "user_id") == 943
    assert _distinct(events, "item_id") == 1_682
    assert _distinct(events, "event_id") == 100_000
    assert items.schema == ITEMS.schema
    assert items.num_rows == 1_682
    assert set(events.column("event_type").to_pylist()) == {"rating"}


def test_ml100k_values_and_times(ml100k: tuple[pa.Table, pa.Table]) -> None:
    events, items = ml100k
    assert events.column("value").null_count == 0
    assert set(events.column("value").to_pylist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    lo, hi = pc.min_max(events.column("ts")).values()
    assert (lo.as_py(), hi.as_py()) == (_ts(874724710), _ts(893286638))  # from the README
    # First line of u.data: "196  242  3  881250949".
    first = events.slice(0, 1).to_pylist()[0]
    assert first["event_id"] == "ml100k-196-242"
    assert (first["user_id"], first["item_id"], first["value"]) == ("u196", "m242", 3.0)
    assert first["ts"] == _ts(881250949)
    validate_events_table(events)


def test_ml100k_items(ml100k: tuple[pa.Table, pa.Table]) -> None:
    _, items = ml100k
    rows = {r["item_id"]: r for r in items.slice(0, 3).to_pylist()}
    # Toy Story: Animation|Children's|Comedy -> first genre in u.genre order is Animation.
    assert rows["m1"]["title"] == "Toy Story (1995)"
    assert rows["m1"]["category"] == "Animation"
    assert rows["m2"]["category"] == "Action"  # GoldenEye: Action|Adventure|Thriller
    assert rows["m3"]["category"] == "Thriller"  # Four Rooms
    assert pc.all(items.column("available")).as_py()


@pytest.mark.slow
def test_ml1m_published_counts(ml1m: tuple[pa.Table, pa.Table]) -> None:
    events, items = ml1m
    assert events.schema == BRONZE_EVENTS.schema
    assert events.num_rows == 1_000_209
    assert _distinct(events, "user_id") == 6_040
    assert _distinct(events, "item_id") == 3_706
    assert _distinct(events, "event_id") == 1_000_209
    assert items.num_rows == 3_883  # movies.dat lists every movie, rated or not
    assert set(events.column("item_id").to_pylist()) <= set(items.column("item_id").to_pylist())


@pytest.mark.slow
def test_ml1m_known_ratings(ml1m: tuple[pa.Table, pa.Table]) -> None:
    events, _ = ml1m
    known = events.filter(pc.is_valid(events.column("value")))
    assert known.num_rows == 487_515
    counts = dict(zip(*(c.to_pylist() for c in pc.value_counts(known.column("value")).flatten()),
                      strict=True))
    assert counts == {1.0: 27_452, 2.0: 53_822, 3.0: 127_155, 4.0: 170_551, 5.0: 108_535}
    users = pc.cast(pc.utf8_slice_codeunits(known.column("user_id"), 1), pa.int64())
    assert pc.max(users).as_py() == 2_998
    assert _distinct(known, "user_id") == 2_998 and _distinct(known, "item_id") == 3_615
    first = events.slice(0, 1).to_pylist()[0]  # "1::1193::5::978300760"
    assert (first["event_id"], first["value"], first["ts"]) == (
        "ml1m-1-1193", 5.0, _ts(978300760))
    lo, hi = pc.min_max(known.column("ts")).values()
    assert (lo.as_py(), hi.as_py()) == (_ts(970663470), _ts(1046388675))


@pytest.mark.slow
def test_ml1m_unknown_pairs_get_deterministic_in_range_times(
    ml1m: tuple[pa.Table, pa.Table],
) -> None:
    events, _ = ml1m
    unknown = events.filter(pc.is_null(events.column("value")))
    assert unknown.num_rows == 1_000_209 - 487_515
    lo, hi = pc.min_max(unknown.column("ts")).values()
    assert lo.as_py() >= _ts(970663470) and hi.as_py() <= _ts(1046388675)
    assert _distinct(unknown, "ts") > 100_000  # spread over the real range, not one instant
    again = pa.concat_tables(movielens.ml1m_events(_data_dir("ml-1m"), batch_rows=300_000))
    assert again.column("ts").equals(events.column("ts"))
    validate_events_table(events.slice(0, 200_000))


def test_ml1m_items() -> None:
    items = movielens.ml1m_items(_data_dir("ml-1m"))
    first = items.slice(0, 2).to_pylist()
    assert (first[0]["item_id"], first[0]["title"], first[0]["category"]) == (
        "m1", "Toy Story (1995)", "Animation")
    assert first[1]["category"] == "Adventure"  # Jumanji: Adventure|Children's|Fantasy
    assert items.column("category").null_count == 0


def test_batches_are_bounded() -> None:
    d = _data_dir("ml-100k")
    sizes = [t.num_rows for t in movielens.ml100k_events(d, batch_rows=30_000)]
    assert sizes == [30_000, 30_000, 30_000, 10_000]


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(movielens.MovieLensDataMissing, match=str(tmp_path / "ml-1m")):
        movielens.events("ml-1m", tmp_path)
    (tmp_path / "ml-100k").mkdir()
    missing_file = r"required file .*ml-100k/u\.(genre|item) is missing"
    with pytest.raises(movielens.MovieLensDataMissing, match=missing_file):
        movielens.ml100k_items(tmp_path)
    with pytest.raises(ValueError, match="unknown MovieLens source"):
        movielens.items("ml-20m", tmp_path)
