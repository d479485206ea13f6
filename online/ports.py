"""Clear errors for ports another process holds, before a server binds them.

gRPC reports a busy port as a generic RuntimeError after logging C-core lines; checking
first lets the entry points print one line naming the setting and its environment variable.
"""

from __future__ import annotations

import socket


class PortInUse(OSError):
    """A configured port is taken; the message names the setting that chose it."""


def ensure_free(host: str, port: int, setting: str) -> None:
    """Raise `PortInUse` when `host:port` cannot be bound (port 0 always can)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # The same option servers set, so a port in TIME_WAIT is not reported as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            env = "LAMBDAREC__" + setting.upper().replace(".", "__")
            raise PortInUse(
                f"{host}:{port} ({setting}) is already in use ({exc.strerror}): stop the "
                f"process holding it or choose another port with {env}") from exc


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free now (for a process that binds it a moment later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
