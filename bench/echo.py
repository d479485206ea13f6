"""A trivial echo gRPC server: the Python gRPC ceiling on this box.

Same server shape as `online.server` (sync `grpc.server`, a thread pool of the same size),
no protobuf and no codegen: one generic unary handler on `/bench.Echo/Echo` returns the
request bytes. `bench.loadgen` drives it exactly as it drives Recommend.

With `--search INDEX --queries NPY --fetch N` each call first runs one FAISS search of
the index (the next of the queries, N results, efSearch as served) and then echoes: the
ceiling of any Python gRPC server that searches the index once per call, which is what
Recommend must do at the least.

    python -m bench.echo --port 50999 [--workers 8] [--search F --queries Q --fetch N]
"""

from __future__ import annotations

import argparse
import itertools
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

METHOD = "/bench.Echo/Echo"


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


class SearchThenEcho:
    """The handler that searches `index` for the next of `queries` (`fetch` results), then
    echoes."""

    def __init__(self, index: Any, queries: np.ndarray, fetch: int) -> None:
        self.index = index
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.fetch = fetch
        self._next = itertools.count()

    def __call__(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        i = next(self._next) % len(self.queries)
        self.index.search(self.queries[i:i + 1], self.fetch)
        return request


def create_echo_server(host: str = "127.0.0.1", port: int = 0, workers: int = 8,
                       handler: Callable[[bytes, grpc.ServicerContext], bytes] = _echo
                       ) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=workers * 64)
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(handler)})
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return server, bound


def _search_handler(index_path: Path, queries_path: Path, fetch: int) -> SearchThenEcho:
    """One BLAS/OpenMP thread and the served efSearch, as `online.server` sets them."""
    from lake.config import IndexSettings
    from lake.vector_index import FaissIndex
    from online.server import limit_threads

    limit_threads()
    index = FaissIndex.load(index_path, IndexSettings())
    return SearchThenEcho(index, np.load(queries_path), fetch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--search", type=Path, help="a FAISS index file to search once per call")
    p.add_argument("--queries", type=Path, help="with --search: an .npy of query vectors")
    p.add_argument("--fetch", type=int, default=50, help="with --search: results per search")
    args = p.parse_args()
    handler = _echo
    if args.search is not None:
        if args.queries is None:
            p.error("--search needs --queries")
        handler = _search_handler(args.search, args.queries, args.fetch)
    server, port = create_echo_server(args.host, args.port, args.workers, handler)
    server.start()
    print(f"echo listening on {args.host}:{port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    main()
