"""A trivial echo gRPC server: the Python gRPC ceiling on this box.

Same server shape as `online.server` (sync `grpc.server`, a thread pool of the same size),
no protobuf and no codegen: one generic unary handler on `/bench.Echo/Echo` returns the
request bytes. `bench.loadgen` drives it exactly as it drives Recommend.

    python -m bench.echo --port 50999 [--workers 8]
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc

METHOD = "/bench.Echo/Echo"


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def create_echo_server(host: str = "127.0.0.1", port: int = 0,
                       workers: int = 8) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=workers * 64)
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return server, bound


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args()
    server, port = create_echo_server(args.host, args.port, args.workers)
    server.start()
    print(f"echo listening on {args.host}:{port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    main()
