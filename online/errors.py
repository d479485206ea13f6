"""One error hierarchy for the online layer; each error knows its gRPC status code.

Handlers raise these; the lake's own domain errors that reach a handler (an invalid event,
a refused bundle) get their status here too. The single mapping to a status is
`status_of()`, called by `online.service.ServiceInterceptor`. Anything else (a plain
`ValueError` included) is a bug of ours and answers INTERNAL, logged with its traceback:
bad arguments are `InvalidArgument`, raised where the field is known.
"""

from __future__ import annotations

import grpc

from lake.bundle import BundleError
from lake.validation import EventValidationError


class ServiceError(Exception):
    """Base class: a failure the caller should see with a specific status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """A request field is invalid. The message always starts with the field's path."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """A valid credential that does not allow this call (an access key without the scope)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ModelLoadError(FailedPrecondition):
    """A bundle could not be loaded or failed validation; the serving model is unchanged."""


class NoModel(FailedPrecondition):
    """The request needs a model and none is loaded yet."""


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(ServiceError):
    """The caller is over a limit (its key's rate, the ingest queue): retry later.

    `retry_after_s` is the server's hint; the interceptor also sends it as the trailing
    metadata `retry-after-ms` so clients need not parse the message.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(f"{message}: retry in {retry_after_s:.2g} s")
        self.retry_after_s = retry_after_s


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for `exc` (the only such mapping)."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, EventValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"events[{exc.row}].{exc.field}: {exc.reason}"
    if isinstance(exc, BundleError):
        return grpc.StatusCode.FAILED_PRECONDITION, f"model bundle refused: {exc}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"

