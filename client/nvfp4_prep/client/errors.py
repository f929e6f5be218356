"""Typed SDK exceptions, one per gRPC status the server uses, plus the client's own checks."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from nvfp4_prep.wire import FIELD_METADATA_KEY, RETRYABLE_FIELDS


class PrepClientError(Exception):
    """Base of every SDK error. ``code`` is the gRPC status (None for checks made in the SDK),
    ``details`` the server's message and ``field`` the request field it names, when known;
    ``request_id`` is the id a failed Prepare call was sent with ("" for other calls), which the
    server's log lines carry too, so ``str()`` ends with it."""

    def __init__(self, details: str, code: grpc.StatusCode | None = None, field: str = "",
                 request_id: str = "") -> None:
        super().__init__(f"{code.name}: {details}" if code is not None else details)
        self.details = details
        self.code = code
        self.field = field
        self.request_id = request_id

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (request {self.request_id})" if self.request_id else text


class PrepInvalidArgument(PrepClientError):
    """A tensor or parameter the server rejected; ``field`` names it."""


class PrepOutputMismatch(PrepInvalidArgument):
    """An ``out=`` tensor that does not fit the answer (a missing or extra name, another shape or dtype);
    raised at the answer's header, before any byte is written."""


class PrepChecksumError(PrepClientError):
    """A chunk whose bytes did not match its CRC32C, on either side."""


class PrepLayoutMismatch(PrepClientError):
    """The server cannot produce the layout version asked for, or answered with another layout."""


class PrepProtocolError(PrepClientError):
    """The server's answer broke the framing rules of the contract."""


class PrepResourceExhausted(PrepClientError):
    """The layer exceeds the server's memory budget, or the server is at its stream limit."""


class PrepDeadlineExceeded(PrepClientError):
    """The call's deadline passed."""


class PrepUnavailable(PrepClientError):
    """No server answered, or it is draining (retried with backoff before this is raised)."""


class PrepHandshakeFailed(PrepUnavailable):
    """No connection could be set up because TLS failed: a CA that did not sign the server's certificate,
    TLS against a plaintext server or the reverse, or a client certificate that a mutual-TLS server wants
    and did not get (or refused). Retried once at most (twice in a row ends the call): waiting does not
    mend it."""


class PrepNotFound(PrepClientError):
    """A checkpoint reference names something that does not exist."""


class PrepPermissionDenied(PrepClientError):
    """A checkpoint reference lies outside the server's allowed roots."""


class PrepUnauthenticated(PrepClientError):
    """The server wants a bearer token (``PrepClient(token=...)``) and the call had none, or a wrong one."""


class PrepCancelled(PrepClientError):
    """The call was cancelled."""


class PrepServerError(PrepClientError):
    """Any other status: an internal server error."""


_BY_CODE: dict[grpc.StatusCode, type[PrepClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: PrepInvalidArgument,
    grpc.StatusCode.DATA_LOSS: PrepChecksumError,
    grpc.StatusCode.FAILED_PRECONDITION: PrepLayoutMismatch,
    grpc.StatusCode.RESOURCE_EXHAUSTED: PrepResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: PrepDeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: PrepUnavailable,
    grpc.StatusCode.NOT_FOUND: PrepNotFound,
    grpc.StatusCode.PERMISSION_DENIED: PrepPermissionDenied,
    grpc.StatusCode.CANCELLED: PrepCancelled,
    grpc.StatusCode.UNAUTHENTICATED: PrepUnauthenticated,
}


def from_rpc_error(error: grpc.RpcError, tls: bool = False) -> PrepClientError:
    """The typed exception for a failed call (``error`` is a grpc.Call as well); ``field`` comes from the
    status details (``google.rpc`` field violations), else from the ``nvfp4-prep-field`` trailer. ``tls``
    says whether the channel is TLS, for the hint that a failed connection setup gets."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else "") or str(error)
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    field = _detailed_field(error) or dict(trailers or ()).get(FIELD_METADATA_KEY, "")
    hint = _setup_hint(details, tls) if code == grpc.StatusCode.UNAVAILABLE else None
    if hint is not None:
        return PrepHandshakeFailed(f"{details}; {hint}", code, field)
    return _BY_CODE.get(code, PrepServerError)(details, code, field)


# What gRPC's status text says when no connection could be set up (as opposed to a stream that broke after),
# and when TLS failed inside that: this client refused the server's certificate, or got no TLS answer at all.
_NO_CONNECTION = "connections to all backends failing"
_TLS_FAILED = "tls handshake failed"
# A connection closed during setup: a mutual-TLS server refusing (or missing) this client's certificate,
# or a TLS server that a plaintext client spoke to. A server that is down refuses the connection instead.
_CLOSED = "socket closed"
_TLS_HINT = ("the TLS handshake failed or the server requires a client certificate: check tls_ca, tls_cert and "
             "tls_key (--tls-ca, --tls-cert, --tls-key)")
_PLAINTEXT_HINT = "the server closed the connection during setup (a TLS server? then give tls_ca, --tls-ca)"


def _setup_hint(details: str, tls: bool) -> str | None:
    """What probably happened when an UNAVAILABLE status says the connection could not be set up, or None."""
    text = details.lower()
    if _NO_CONNECTION not in text:
        return None
    if _TLS_FAILED in text:
        return _TLS_HINT
    if _CLOSED in text:
        return _TLS_HINT if tls else _PLAINTEXT_HINT
    return None


def _detailed_field(error: grpc.RpcError) -> str:
    """The field the ``google.rpc`` status details name, or "" (none, or details that do not parse)."""
    try:
        status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    except (ValueError, DecodeError):
        return ""
    for packed in status.details if status is not None else ():
        for kind, subjects in _SUBJECTS:
            if packed.Is(kind.DESCRIPTOR):
                detail = kind()
                packed.Unpack(detail)
                for subject in subjects(detail):
                    return subject
    return ""


_SUBJECTS = (
    (error_details_pb2.BadRequest, lambda d: [v.field for v in d.field_violations]),
    (error_details_pb2.QuotaFailure, lambda d: [v.subject for v in d.violations]),
    (error_details_pb2.PreconditionFailure, lambda d: [v.subject for v in d.violations]),
)


def retryable(error: PrepClientError) -> bool:
    """Whether a call that failed with ``error`` may succeed if sent again unchanged: when no server could
    be reached or its stream broke (UNAVAILABLE), or too many calls were running. Every call of the SDK is
    idempotent (see PrepClient), so this depends only on why it failed."""
    if isinstance(error, PrepUnavailable):
        return True
    return isinstance(error, PrepResourceExhausted) and error.field in RETRYABLE_FIELDS
