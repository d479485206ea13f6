"""MovieLens-100K and -1M as bronze events and catalogue rows.

The files are read in place from the data directory (``settings.data.dir``, overridable with
``LAMBDAREC__DATA__DIR`` or ``python -m lake.load --data-dir``), which holds ``ml-100k/`` and
``ml-1m/``; a dataset folder itself is accepted too. The GroupLens license forbids
redistribution: nothing here copies the files anywhere but into the local lake.

Mapping to the bronze schema (`lake.schemas.BRONZE_EVENTS`):

* one ``rating`` event per (user, movie) pair; ``value`` = the 1-5 star rating where known;
* ids are strings with a letter prefix: users ``u<UserID>`` and items ``m<MovieID>``
  (``u196``, ``m242``), so MovieLens ids never look like bare numbers;
* ``event_id`` = ``ml100k-<user>-<movie>`` / ``ml1m-<user>-<movie>``: deterministic, so a
  reload produces the same ids and `lake.load` can replace instead of duplicate;
* ``received_at`` = ``ts``; ``session_id`` and ``properties`` are null.

ML-1M as stored here is incomplete (see its README): ``interactions.all.csv.gz`` lists all
1,000,209 rated pairs without rating or time, and ``ratings.users0001-2998.dat.gz`` has rating
and timestamp for the 487,515 pairs of users 1..2998 only. The other 512,694 pairs get a null
``value`` and a synthetic timestamp, chosen by ``unknown_ts``:

* ``"spread"`` (default): the timestamp at quantile ``q`` of the known timestamps, where ``q``
  is a hash of (user, movie). Deterministic, and the unknown pairs follow the real time
  distribution, so a time-based holdout takes the same share of them as of the known ones
  (with ``"last"`` every one of them would land in the last days and a time split would test
  on half the dataset while training on the other half's users only).
* ``"last"``: the dataset's last known timestamp (1046388675, 2003-02-28), so time decay
  treats them as equally recent.

If a complete ``ratings.dat`` (or ``ratings.dat.gz``) is present in ``ml-1m/`` it is used
instead and every pair has its real rating and timestamp.

Items: every movie of ``u.item`` / ``movies.dat`` (also the ones nobody rated), with
``category`` = the first genre listed (ML-100K: first flag in ``u.genre`` order), ``price``
null, ``available`` true and ``updated_at`` = the dataset's last rating timestamp.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from lake.schemas import BRONZE_EVENTS, ITEMS

SOURCES: tuple[str, ...] = ("ml-100k", "ml-1m")
EVENT_ID_PREFIXES: dict[str, str] = {"ml-100k": "ml100k-", "ml-1m": "ml1m-"}
"""Every event id of a source starts with this; `lake.load` uses it to replace a source."""
DEFAULT_BATCH_ROWS = 1_000_000

_TS = BRONZE_EVENTS.schema.field("ts").type
_KEY_SHIFT = 20  # movie ids < 2**20


class MovieLensDataMissing(FileNotFoundError):
    """A MovieLens folder or file is not where the configuration says it is."""


def _hint() -> str:
    return ("set data.dir in the config, LAMBDAREC__DATA__DIR, or --data-dir to the folder "
            "that holds ml-100k/ and ml-1m/")


def dataset_dir(data_dir: str | Path, source: str) -> Path:
    """The folder of `source` (``<data_dir>/<source>``, or `data_dir` itself if it is that folder).

    Raises:
        ValueError: unknown source.
        MovieLensDataMissing: the folder does not exist.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown MovieLens source {source!r}; expected one of {list(SOURCES)}")
    base = Path(data_dir)
    probe = "u.item" if source == "ml-100k" else "movies.dat"
    if (base / probe).is_file() and not (base / source).is_dir():
        return base
    d = base / source
    if not d.is_dir():
        raise MovieLensDataMissing(f"{source}: data folder {d} does not exist; {_hint()}")
    return d


def _need(path: Path, source: str) -> Path:
    if not path.is_file():
        raise MovieLensDataMissing(f"{source}: required file {path} is missing; {_hint()}")
    return path


def _first_existing(d: Path, names: tuple[str, ...], source: str) -> Path:
    for n in names:
        if (d / n).is_file():
            return d / n
    return _need(d / names[0], source)


def _read_bytes(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def _read_ints(data: bytes, names: list[str], delimiter: str, header: bool) -> pa.Table:
    return pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=None if header else names,
                                       skip_rows=0, autogenerate_column_names=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.int64() for n in names},
                                             include_columns=names),
    )


def _ratings_dat(path: Path) -> pa.Table:
    """``UserID::MovieID::Rating::Timestamp`` lines as an int64 table."""
    return _read_ints(_read_bytes(path).replace(b"::", b":"),
                      ["user", "movie", "rating", "ts"], ":", header=False)


def _events(
    prefix: str, user: np.ndarray, movie: np.ndarray, rating: np.ndarray | None,
    rating_known: np.ndarray | None, ts_s: np.ndarray,
) -> pa.Table:
    users = pc.cast(pa.array(user), pa.string())
    movies = pc.cast(pa.array(movie), pa.string())
    ts = pa.array(ts_s.astype(np.int64) * 1_000_000, pa.int64()).cast(_TS)
    if rating is None:
        value = pa.nulls(user.size, pa.float64())
    else:
        mask = None if rating_known is None else ~rating_known
        value = pa.array(rating.astype(np.float64), pa.float64(), mask=mask)
    return pa.table(
        {
            "event_id": pc.binary_join_element_wise(prefix, users, "-", movies, ""),
            "user_id": pc.binary_join_element_wise("u", users, ""),
            "item_id": pc.binary_join_element_wise("m", movies, ""),
            "event_type": pa.repeat(pa.scalar("rating", pa.string()), user.size),
            "value": value,
            "ts": ts,
            "received_at": ts,
            "session_id": pa.nulls(user.size, pa.string()),
            "properties": pa.nulls(user.size, pa.string()),
            "event_date": pc.cast(ts, pa.date32()),
            "tenant": pa.repeat(pa.scalar("", pa.string()), user.size),  # a bulk load
            "recommendation_id": pa.repeat(pa.scalar("", pa.string()), user.size),
        },
        schema=BRONZE_EVENTS.schema,
    )


def _batched(n: int, batch_rows: int) -> Iterator[slice]:
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows must be an integer >= 1, got {batch_rows!r}")
    for lo in range(0, n, batch_rows):
        yield slice(lo, min(lo + batch_rows, n))


def _items(
    movie_ids: list[int], titles: list[str], categories: list[str | None], updated_s: int
) -> pa.Table:
    n = len(movie_ids)
    return pa.table(
        {
            "item_id": pa.array([f"m{m}" for m in movie_ids], pa.string()),
            "category": pa.array(categories, pa.string()),
            "price": pa.nulls(n, pa.float64()),
            "available": pa.array(np.ones(n, dtype=bool), pa.bool_()),
            "title": pa.array(titles, pa.string()),
            "updated_at": pa.array(np.full(n, updated_s * 1_000_000, dtype=np.int64),
                                   pa.int64()).cast(ITEMS.schema.field("updated_at").type),
        },
        schema=ITEMS.schema,
    )


# -- ML-100K ---------------------------------------------------------------------------
def _ml100k_ratings(data_dir: str | Path) -> pa.Table:
    d = dataset_dir(data_dir, "ml-100k")
    path = _first_existing(d, ("u.data.gz", "u.data"), "ml-100k")
    return _read_ints(_read_bytes(path), ["user", "movie", "rating", "ts"], "\t", header=False)


def ml100k_events(
    data_dir: str | Path, *, batch_rows: int = DEFAULT_BATCH_ROWS
) -> Iterator[pa.Table]:
    """The 100,000 ratings of ML-100K as bronze ``rating`` events, in file order."""
    t = _ml100k_ratings(data_dir)
    cols = {c: t.column(c).to_numpy() for c in t.column_names}
    for s in _batched(t.num_rows, batch_rows):
        yield _events(EVENT_ID_PREFIXES["ml-100k"], cols["user"][s], cols["movie"][s],
                      cols["rating"][s], None, cols["ts"][s])


def ml100k_items(data_dir: str | Path) -> pa.Table:
    """The 1,682 movies of ``u.item``; category = first genre flagged, in ``u.genre`` order."""
    d = dataset_dir(data_dir, "ml-100k")
    genres = [line.split("|")[0] for line in
              _need(d / "u.genre", "ml-100k").read_text("latin-1").splitlines() if line.strip()]
    ids, titles, cats = [], [], []
    for line in _need(d / "u.item", "ml-100k").read_text("latin-1").splitlines():
        if not line.strip():
            continue
        f = line.split("|")
        flags = f[5:5 + len(genres)]
        ids.append(int(f[0]))
        titles.append(f[1])
        cats.append(next((g for g, x in zip(genres, flags, strict=False) if x == "1"), None))
    last = int(pc.max(_ml100k_ratings(data_dir).column("ts")).as_py())
    return _items(ids, titles, cats, last)


# -- ML-1M -----------------------------------------------------------------------------
def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _ml1m_full_ratings(d: Path) -> Path | None:
    for n in ("ratings.dat", "ratings.dat.gz"):
        if (d / n).is_file():
            return d / n
    return None


def _ml1m_known(d: Path) -> pa.Table:
    full = _ml1m_full_ratings(d)
    if full is not None:
        return _ratings_dat(full)
    return _ratings_dat(_need(d / "ratings.users0001-2998.dat.gz", "ml-1m"))


def ml1m_events(
    data_dir: str | Path,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    unknown_ts: Literal["spread", "last"] = "spread",
) -> Iterator[pa.Table]:
    """All 1,000,209 rated pairs of ML-1M as bronze ``rating`` events, in file order.

    Pairs without a known rating get ``value`` null and a synthetic timestamp chosen by
    `unknown_ts` (see the module docstring).
    """
    if unknown_ts not in ("spread", "last"):
        raise ValueError(f"unknown_ts must be 'spread' or 'last', got {unknown_ts!r}")
    d = dataset_dir(data_dir, "ml-1m")
    prefix = EVENT_ID_PREFIXES["ml-1m"]
    known = _ml1m_known(d)
    k_user = known.column("user").to_numpy()
    k_movie = known.column("movie").to_numpy()
    k_rating = known.column("rating").to_numpy()
    k_ts = known.column("ts").to_numpy()
    if _ml1m_full_ratings(d) is not None:
        for s in _batched(known.num_rows, batch_rows):
            yield _events(prefix, k_user[s], k_movie[s], k_rating[s], None, k_ts[s])
        return
    pairs = _read_ints(
        _read_bytes(_need(d / "interactions.all.csv.gz", "ml-1m")), ["user_id", "movie_id"],
        ",", header=True,
    )
    keys = (k_user << _KEY_SHIFT) | k_movie
    order = np.argsort(keys, kind="stable")
    keys_sorted = keys[order]
    sorted_ts = np.sort(k_ts)
    last_ts = int(sorted_ts[-1])
    user = pairs.column("user_id").to_numpy()
    movie = pairs.column("movie_id").to_numpy()
    for s in _batched(pairs.num_rows, batch_rows):
        u, m = user[s], movie[s]
        key = (u << _KEY_SHIFT) | m
        pos = np.minimum(np.searchsorted(keys_sorted, key), keys_sorted.size - 1)
        hit = keys_sorted[pos] == key
        src = order[pos]
        rating = np.where(hit, k_rating[src], 0)
        if unknown_ts == "last":
            fill = np.full(key.size, last_ts, dtype=np.int64)
        else:
            q = (_splitmix64(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
            fill = sorted_ts[np.minimum((q * sorted_ts.size).astype(np.int64),
                                        sorted_ts.size - 1)]
        ts = np.where(hit, k_ts[src], fill)
        yield _events(prefix, u, m, rating, hit, ts)


def ml1m_items(data_dir: str | Path) -> pa.Table:
    """The 3,883 movies of ``movies.dat`` (ISO-8859-1); category = first listed genre."""
    d = dataset_dir(data_dir, "ml-1m")
    ids, titles, cats = [], [], []
    for line in _need(d / "movies.dat", "ml-1m").read_text("latin-1").splitlines():
        if not line.strip():
            continue
        mid, title, genres = line.split("::")
        ids.append(int(mid))
        titles.append(title)
        cats.append(genres.split("|")[0] or None)
    last = int(pc.max(_ml1m_known(d).column("ts")).as_py())
    return _items(ids, titles, cats, last)


# -- by name ---------------------------------------------------------------------------
def events(
    source: str, data_dir: str | Path, *, batch_rows: int = DEFAULT_BATCH_ROWS
) -> Iterator[pa.Table]:
    """Bronze event tables of `source` (``"ml-100k"`` or ``"ml-1m"``)."""
    dataset_dir(data_dir, source)  # fail early, before the generator is consumed
    if source == "ml-100k":
        return ml100k_events(data_dir, batch_rows=batch_rows)
    return ml1m_events(data_dir, batch_rows=batch_rows)


def items(source: str, data_dir: str | Path) -> pa.Table:
    """The item catalogue of `source` (``"ml-100k"`` or ``"ml-1m"``)."""
    dataset_dir(data_dir, source)
    return ml100k_items(data_dir) if source == "ml-100k" else ml1m_items(data_dir)
