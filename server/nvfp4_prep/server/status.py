"""Every error of the request path as a gRPC status: code, message and the field at fault.

The one place where domain errors meet gRPC. A status that names a field carries it twice: as
``google.rpc`` details in ``grpc-status-details-bin`` (``BadRequest`` field violations for bad input,
``QuotaFailure`` for limits, ``PreconditionFailure`` for layouts; ``grpcio-status`` reads them), and in
the ``nvfp4-prep-field`` trailer that existing clients read. Messages and fields are made ASCII-safe and
bounded in length, since they can echo what a client sent and travel as HTTP/2 headers.
"""

from __future__ import annotations

import collections
import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from nvfp4_prep.checkpoint.errors import (
    CheckpointError,
    CheckpointInvalid,
    CheckpointNotFound,
    CheckpointPermissionDenied,
)
from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.wire import FIELD_METADATA_KEY, ChecksumError

from .errors import (
    CallCancelled,
    DeadlinePassed,
    LayoutUnavailable,
    LimitExceeded,
    ReferencesRefused,
    RequestTooComplex,
    ServerDraining,
    ServerFault,
)

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 1024
MAX_FIELD_CHARS = 256
DETAILS_KEY = "grpc-status-details-bin"
_CUT = "...({} characters cut)..."

_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ChecksumError, grpc.StatusCode.DATA_LOSS),  # before PrepError, whose subclass it is
    (PrepError, grpc.StatusCode.INVALID_ARGUMENT),
    (RequestTooComplex, grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LayoutUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (ReferencesRefused, grpc.StatusCode.PERMISSION_DENIED),
    (ServerDraining, grpc.StatusCode.UNAVAILABLE),
    (CallCancelled, grpc.StatusCode.CANCELLED),
    (DeadlinePassed, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ServerFault, grpc.StatusCode.INTERNAL),
    (CheckpointNotFound, grpc.StatusCode.NOT_FOUND),
    (CheckpointPermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (CheckpointInvalid, grpc.StatusCode.INVALID_ARGUMENT),
    (CheckpointError, grpc.StatusCode.INTERNAL),
)


class Status(collections.namedtuple("Status", ("code", "details", "trailing_metadata")), grpc.Status):
    """A status to end a call with (``context.abort_with_status``); ``details`` is the message."""

    @property
    def field(self) -> str:
        return dict(self.trailing_metadata).get(FIELD_METADATA_KEY, "")


def bounded(text: str, limit: int) -> str:
    """``text`` with every character outside printable ASCII escaped, cut to ``limit`` characters in its middle
    (a long echoed name goes, the start and the end, which says what is wrong, stay)."""
    safe = "".join(ch if " " <= ch <= "~" else ch.encode("unicode_escape").decode("ascii") for ch in text)
    if len(safe) <= limit:
        return safe
    keep = limit - len(_CUT.format(len(safe)))
    head = (keep + 1) // 2
    return safe[:head] + _CUT.format(len(safe) - keep) + safe[len(safe) - (keep - head):]


def status(code: grpc.StatusCode, message: str, field: str = "") -> Status:
    """The status of ``code`` with ``message``, naming ``field`` in its details and trailer when given."""
    message = bounded(message, MAX_MESSAGE_CHARS)
    trailers: list[tuple[str, str | bytes]] = []
    details = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if field:
        field = bounded(field, MAX_FIELD_CHARS)
        trailers.append((FIELD_METADATA_KEY, field))
        detail = _detail(code, field, message)
        if detail is not None:
            packed = any_pb2.Any()
            packed.Pack(detail)
            details.details.append(packed)
    trailers.append((DETAILS_KEY, details.SerializeToString()))
    return Status(code, message, tuple(trailers))


def _detail(code: grpc.StatusCode, field: str, message: str):
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS):
        return error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=message)])
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=field, description=message)])
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(type="LAYOUT", subject=field, description=message)])
    return None


def status_of(error: BaseException) -> Status:
    """The status a call that raised ``error`` ends with; unexpected errors are logged and become INTERNAL."""
    if isinstance(error, grpc.RpcError):  # raised by the request iterator when the client goes away
        return status(grpc.StatusCode.CANCELLED, "client went away")
    for kind, code in _CODES:
        if isinstance(error, kind):
            if isinstance(error, CheckpointError):
                return status(code, f"header.ref: {error}", "header.ref")
            if isinstance(error, PrepError):
                return status(code, str(error), error.field)
            return status(code, error.message, error.field)
    log.error("Prepare failed", exc_info=error)
    return status(grpc.StatusCode.INTERNAL, "internal error while preparing; see the server log")


def abort(context: grpc.ServicerContext, failure: Status) -> None:
    """Ends the call with ``failure`` (raises, as ``context.abort`` does)."""
    context.abort_with_status(failure)


def end_from_another_thread(context: grpc.ServicerContext, failure: Status) -> None:
    """Ends a call whose handler thread is blocked (inside gRPC, or in a stage that cannot be interrupted) with
    ``failure``'s code and message; its trailers stay unsent (gRPC answers trailers-only).

    The sync server offers only ``cancel()`` for this, which the client sees as a bare CANCELLED; the core call
    under it also cancels with a status (``grpc_call_cancel_with_status``), which the server sends as the call's
    status. Where grpc's internals differ, the call is cancelled plainly.
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(failure.code.value[0], failure.details)
    except (AttributeError, TypeError, ValueError):
        log.warning("cannot end the call with %s (grpc internals differ); cancelling it", failure.code.name)
        context.cancel()
