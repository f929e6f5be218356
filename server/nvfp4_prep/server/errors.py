"""Service errors: one status code and a message that names the field at fault."""

from __future__ import annotations

import grpc

from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.wire import ChecksumError


class ServiceError(Exception):
    """An error the client is told about: ``code``, ``message`` and the ``field`` at fault."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def from_input_error(error: PrepError) -> ServiceError:
    """A pipeline or framing error (FramingError is a PrepError) as INVALID_ARGUMENT, DATA_LOSS for a checksum."""
    code = grpc.StatusCode.DATA_LOSS if isinstance(error, ChecksumError) else grpc.StatusCode.INVALID_ARGUMENT
    return ServiceError(code, str(error), error.field)


def invalid(field: str, problem: str, expected: str = "") -> ServiceError:
    """INVALID_ARGUMENT naming ``field``, in the same wording as the pipeline's errors."""
    message = f"{field}: {problem}" + (f" (expected {expected})" if expected else "")
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, field)
