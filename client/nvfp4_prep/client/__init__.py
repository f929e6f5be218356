"""The nvfp4-prep SDK: ``PrepClient`` prepares layers on remote servers; ``cli`` is the command line."""

import logging

from .errors import (
    PrepCancelled,
    PrepChecksumError,
    PrepClientError,
    PrepDeadlineExceeded,
    PrepHandshakeFailed,
    PrepInvalidArgument,
    PrepLayoutMismatch,
    PrepNotFound,
    PrepOutputMismatch,
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
    "PrepHandshakeFailed", "PrepInvalidArgument", "PrepLayoutMismatch", "PrepNotFound", "PrepOutputMismatch",
    "PrepPermissionDenied", "PrepProtocolError", "PrepResourceExhausted", "PrepServerError", "PrepUnauthenticated",
    "PrepUnavailable", "Progress", "RemoteLayer", "mma_view",
]

# A library logs; the application decides where to (logging.basicConfig, ...), not the SDK.
logging.getLogger(__name__).addHandler(logging.NullHandler())
