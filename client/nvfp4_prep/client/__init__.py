"""The nvfp4-prep SDK: ``PrepClient`` prepares layers on remote servers; ``cli`` is the command line."""

from .errors import (
    PrepCancelled,
    PrepChecksumError,
    PrepClientError,
    PrepDeadlineExceeded,
    PrepInvalidArgument,
    PrepLayoutMismatch,
    PrepNotFound,
    PrepPermissionDenied,
    PrepProtocolError,
    PrepResourceExhausted,
    PrepServerError,
    PrepUnauthenticated,
    PrepUnavailable,
)
from .result import RemoteLayer, mma_view
from .sdk import PrepClient, Progress

__all__ = [
    "PrepCancelled", "PrepChecksumError", "PrepClient", "PrepClientError", "PrepDeadlineExceeded",
    "PrepInvalidArgument", "PrepLayoutMismatch", "PrepNotFound", "PrepPermissionDenied", "PrepProtocolError",
    "PrepResourceExhausted", "PrepServerError", "PrepUnauthenticated", "PrepUnavailable", "Progress", "RemoteLayer",
    "mma_view",
]
