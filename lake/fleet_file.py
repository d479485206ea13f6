"""The running fleet's `fleet.json` (in `fleet.run_dir`): where its front door and replicas
listen.

`make run REPLICAS=N` (`online.fleet.Fleet`) writes it whenever the fleet changes (replaced
whole, so a reader never sees half of it) and removes it on stop. Whoever must reach every
replica rather than the front door reads it: the reload sender (`lake.reload_notice`) and
the fleet benchmark. It lives in the contract so that batch code can read it without
importing the server package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FLEET_FILE = "fleet.json"


def read_fleet(run_dir: Path) -> dict[str, Any] | None:
    """The running fleet's `fleet.json`, or None."""
    path = Path(run_dir) / FLEET_FILE
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data
