"""The as-of date of a training run when none is given: one rule for `make pipeline` and the
DAG's manual runs.

The as-of date is the last day a model learns from (gold counts events before the end of
it). By default it is the **last complete UTC day before the run**, so a day still
receiving events is never half-trained on (the online layer folds those in), **or the last
day with events if the data ends earlier** (a MovieLens dump, a sample lake loaded days
ago), so a run on old data still finds it. A lake whose events all arrived on the run's
own day (just filled through the API) is trained up to that day: there is nothing else.
A scheduled DAG run processes its own data interval instead
(`dags.lambdarec_common.as_of_for`).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lake.tables import Lake


def default_as_of(run_at: datetime, bounds: tuple[date, date] | None) -> date:
    """The day before `run_at` (UTC); the last event date when that is earlier; the last
    event date when no event is older than `run_at`'s day.

    Args:
        run_at: when the run starts (timezone-aware).
        bounds: first and last event date in the data (`event_date_bounds`), if known.
    """
    if run_at.tzinfo is None:
        raise ValueError("run_at must be timezone-aware")
    complete = run_at.astimezone(UTC).date() - timedelta(days=1)
    if bounds is None:
        return complete
    first, last = bounds
    return last if first > complete else min(complete, last)


def event_date_bounds(lake: Lake) -> tuple[date, date] | None:
    """First and last `event_date` in bronze, from the Delta log alone (no data read);
    None when bronze is missing or empty."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not lake.exists("bronze_events"):
        return None
    actions = pa.table(lake.delta("bronze_events").get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return None
    col = actions.column("partition.event_date")
    if not pa.types.is_date(col.type):
        col = pc.cast(col, pa.date32())
    lo, hi = pc.min_max(col).values()
    return lo.as_py(), hi.as_py()
