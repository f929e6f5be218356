"""The server's domain errors: why a call cannot go on, with the request field (or limit) at fault.

They know nothing of gRPC; ``status`` maps each one, and every other error the request path can raise
(``PrepError`` for bad input, ``CheckpointError`` for references), to a status code.
"""

from __future__ import annotations

from nvfp4_prep.contract.errors import PrepError


class CallError(Exception):
    """A call that cannot go on, for a reason the client is told; ``field`` names what it is about."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class LimitExceeded(CallError):
    """The request, or the calls running, exceed a size or concurrency limit (RESOURCE_EXHAUSTED)."""


class RequestTooComplex(CallError):
    """The request announces more tensors or dimensions than the server accepts (INVALID_ARGUMENT)."""


class LayoutUnavailable(CallError):
    """The client asks for a layout this server does not produce (FAILED_PRECONDITION)."""


class ReferencesRefused(CallError):
    """This server reads no checkpoints (started without --allowed-root) (PERMISSION_DENIED)."""


class ServerDraining(CallError):
    """The server is shutting down; another replica can take the call (UNAVAILABLE)."""


class CallCancelled(CallError):
    """The client went away (CANCELLED)."""


class DeadlinePassed(CallError):
    """The client's deadline or the server's --max-deadline passed (DEADLINE_EXCEEDED)."""


class ServerFault(CallError):
    """Something went wrong on the server's side; the log has the details (INTERNAL)."""


def invalid(field: str, problem: str, expected: str = "") -> PrepError:
    """Bad input naming ``field``, in the same wording as the pipeline's errors (INVALID_ARGUMENT)."""
    return PrepError(field, problem, expected)
