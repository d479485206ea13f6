"""The one place that imports the generated protobuf / gRPC modules.

The generated code (see `online.protogen`) imports itself as `lambdarec.v1...`, so its
root, `online/generated`, goes on `sys.path` here, once. Import messages and stubs from
this module only (`from online.pb import recommender_pb2 as pb`): importing the same
files under a second module name would register their descriptors twice.
"""

from __future__ import annotations

import sys

from online.protogen import OUT_DIR, ensure_generated

ensure_generated()
if str(OUT_DIR) not in sys.path:
    sys.path.insert(0, str(OUT_DIR))

from lambdarec.v1 import (  # noqa: E402
    admin_pb2,
    admin_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)

__all__ = ["admin_pb2", "admin_pb2_grpc", "recommender_pb2", "recommender_pb2_grpc"]
