"""The fleet stream scopes event ids to their tenant too: real replicas, a real redis-server
and HAProxy (see tests/test_fleet.py), real access keys in the keys file they share."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import test_fleet
from lambdarec_client import Client
from test_fleet import BOUND_S, ids, start_fleet, within

from lake.fleet_file import read_fleet
from lake.tables import Lake
from online.keys import KeyStore
from tests import online_bundles

pytestmark = test_fleet.pytestmark  # slow; needs redis-server and HAProxy


def purchase(user: str) -> list[dict[str, str]]:
    # with the known bundle a purchase of C4 makes the user's top 4 C0..C3 (test_fleet)
    return [{"event_id": "order-1000", "user_id": user, "item_id": "C4",
             "event_type": "purchase"}]


def test_a_peers_event_is_a_duplicate_for_its_tenant_only(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "lake" / "access_keys.json")  # shared by the replicas
    keys = {n: store.create(n, ("ingest", "recommend"))[1] for n in ("shopA", "shopB")}
    online_bundles.build(tmp_path / "models", "v1")
    fleet = start_fleet(tmp_path)
    try:
        state = read_fleet(fleet.run_dir)
        assert state is not None
        a, b = ({n: Client(r["grpc"], key=keys[n], timeout=10.0) for n in keys}
                for r in state["replicas"])
        try:
            assert a["shopA"].ingest(purchase("t1")).accepted == 1
            # replica b applied A's event (and noted its id) once it recommends from it
            within(BOUND_S, lambda: ids(b["shopA"].recommend("t1", k=4)) ==
                   ["C0", "C1", "C2", "C3"])
            again = b["shopA"].ingest(purchase("t1"))
            assert (again.accepted, again.duplicates) == (0, 1)
            other = b["shopB"].ingest(purchase("t2"))  # the same id from another shop
            assert (other.accepted, other.duplicates) == (1, 0)
            within(BOUND_S, lambda: ids(a["shopB"].recommend("t2", k=4)) ==
                   ["C0", "C1", "C2", "C3"])
            for c, user in ((a["shopB"], "t2"), (a["shopA"], "t1")):
                again = c.ingest(purchase(user))
                assert (again.accepted, again.duplicates) == (0, 1)
        finally:
            for c in (*a.values(), *b.values()):
                c.close()
        fleet.stop()  # graceful: every replica flushes its WAL to bronze
        rows = Lake(tmp_path / "lake").read("bronze_events", columns=["tenant", "user_id"])
        assert Counter(zip(rows["tenant"].to_pylist(), rows["user_id"].to_pylist(),
                           strict=True)) == {("shopA", "t1"): 1, ("shopB", "t2"): 1}
    finally:
        fleet.stop()
