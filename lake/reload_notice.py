"""Ask running online servers to hot-reload the model CURRENT names (`Admin.ReloadModel`).

Shared by the Airflow DAGs' `notify_reload` step and `make pipeline`: the batch layer's one
call into the online layer, made through the client library (`lambdarec_client`) and the
fleet's `fleet.json`, never the server package. Cheap to import (the gRPC client is
imported when called), so DAG files can import it at parse time.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lake.fleet_file import read_fleet
from lake.tls import ClientTLS

log = logging.getLogger(__name__)


UNREACHABLE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
"""gRPC status codes that mean "no server answered": a warning, not a failure."""


def python_command() -> str:
    """This interpreter as a user should type it: relative when under the working directory
    (`.venv/bin/python`), so printed commands work outside an activated venv."""
    exe = Path(sys.executable)
    try:
        return shlex.quote(str(exe.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(exe))


def reload_command(admin_target: str, version: str) -> str:
    """The command that makes the server on `admin_target` serve `version`."""
    return (f"{python_command()} -m lambdarec_client --admin-target {admin_target} "
            f"reload --version {version}")


def fleet_targets(targets: Sequence[str], run_dir: Path | None) -> list[str]:
    """`targets` with a fleet's front door (`<run_dir>/fleet.json`) replaced by each of its
    replicas' admin addresses: the front door would reach only one of them."""
    fleet = read_fleet(run_dir) if run_dir is not None else None
    if fleet is None:
        return list(targets)
    out: list[str] = []
    for t in targets:
        out += [r["admin"] for r in fleet["replicas"]] if t == fleet["front_door"]["admin"] \
            else [t]
    return list(dict.fromkeys(out))


def notify_reload(
    targets: Sequence[str], token: str, version: str | None, *, timeout_s: float = 60.0,
    fleet_dir: Path | None = None, tls: ClientTLS | None = None,
) -> dict[str, Any]:
    """Ask each admin endpoint (`host:port`) to reload `version` (`Admin.ReloadModel`).
    A target that is the front door of the fleet running from `fleet_dir` (`fleet.run_dir`)
    stands for every replica of it.

    `tls`: `Client` TLS arguments (`lake.tls.own_client_tls`); None = plaintext.

    A server that does not answer (UNAVAILABLE, DEADLINE_EXCEEDED) is logged as a warning:
    servers also load CURRENT when they start and when they poll. A server that answers
    with an error (bad token, bundle it refuses) raises, so the task fails visibly.

    Returns `{"targets": {target: "ok: ..." | "unreachable: ..."}}`.
    """
    outcome: dict[str, str] = {}
    import grpc
    from lambdarec_client import Client, to_dict

    failures = []
    for target in fleet_targets(targets, fleet_dir):
        try:
            with Client(target, admin_target=target, token=token, timeout=timeout_s,
                        **(tls or ClientTLS())) as c:
                reply = to_dict(c.reload(version, timeout=timeout_s))
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() is not None else "UNKNOWN"
            detail = f"{code}: {exc.details()}"
            if code in UNREACHABLE_CODES:
                log.warning("reload on %s: server unreachable (%s); it will load CURRENT "
                            "when it starts or polls", target, detail)
                outcome[target] = f"unreachable: {detail}"
            else:
                log.error("reload on %s failed: %s", target, detail)
                outcome[target] = f"error: {detail}"
                failures.append(f"{target}: {detail}")
        else:
            log.info("reload on %s: %s", target, reply)
            outcome[target] = f"ok: {json.dumps(reply, sort_keys=True, default=str)}"
    if failures:
        raise RuntimeError(f"ReloadModel refused by {len(failures)} server(s): "
                           + "; ".join(failures))
    return {"targets": outcome}
