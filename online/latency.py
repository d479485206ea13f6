"""Process settings that keep request latency bounded while ingest works in the same process.

Both are CPython-wide; `bench/flood.py` (an IngestEvents flood beside a probe calling
Recommend) measures them:

* the GIL switch interval (`server.switch_interval_ms`): a handler thread needs the GIL
  back several times per call (from the completion queue, around FAISS, for the send);
  while another thread runs Python, each wait lasts up to the interval. With one thread
  spinning in Python beside the server, Recommend's p99 was 63 ms at CPython's 5 ms, 16 ms
  at 1 ms, 8 ms at 0.2 ms (2 shared cores);
* the full-collection threshold (`server.gc_full_threshold`): ingest grows the heap
  (events pending for bronze, online state), so at CPython's threshold a full collection,
  which stops every thread for a scan of the whole heap, ran every second or two during a
  flood of 400k events and took 0.1-0.6 s (3.2 s of 22 s in all); at 1000 none ran. Young
  collections run as often as before and collect most cyclic garbage; full ones still
  run, less often.
"""

from __future__ import annotations

import gc
import sys

from lake.config import ServerSettings


def favour_requests(srv: ServerSettings) -> None:
    """Apply `server.switch_interval_ms` and `server.gc_full_threshold` (0: leave as is)."""
    if srv.switch_interval_ms > 0:
        sys.setswitchinterval(srv.switch_interval_ms / 1000.0)
    if srv.gc_full_threshold > 0:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, srv.gc_full_threshold)
