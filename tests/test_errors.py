"""Every error knows its status: the mapping a caller sees, with no lookups by import."""

from __future__ import annotations

import grpc

from lake.bundle import BundleError
from lake.validation import EventValidationError
from online.errors import InvalidArgument, status_of
from online.ingest import IngestError, IngestOverloadedError


def test_ingest_errors_carry_unavailable() -> None:
    assert status_of(IngestError("the WAL is closed")) == (
        grpc.StatusCode.UNAVAILABLE, "ingest unavailable: the WAL is closed")
    code, message = status_of(IngestOverloadedError("9 events wait; retry later"))
    assert code == grpc.StatusCode.UNAVAILABLE and message.endswith("retry later")


def test_domain_errors_and_the_rest() -> None:
    assert status_of(InvalidArgument("k", "must be in [1, 100], got 0")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "k: must be in [1, 100], got 0")
    assert status_of(EventValidationError(3, "ts", "is required")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "events[3].ts: is required")
    assert status_of(BundleError("checksum mismatch"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    # a plain ValueError is a bug of ours, not the caller's argument: INTERNAL, type only
    assert status_of(ValueError("secret detail")) == (
        grpc.StatusCode.INTERNAL, "internal error: ValueError")
