"""The generated protobuf / gRPC modules the server uses, from the client package.

`lambdarec.v1` is generated into `clients/python/` (`make protos`) and installed with the
light client package the server depends on; the server imports it from here so one
module names what it uses.
"""

from __future__ import annotations

from lambdarec.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)

__all__ = ["admin_pb2", "admin_pb2_grpc", "recommender_pb2", "recommender_pb2_grpc"]
