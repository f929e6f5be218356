"""Errors of decoding tensors from the wire, each naming the field at fault."""

from __future__ import annotations


class FramingError(ValueError):
    """A tensor header or chunk that breaks the framing rules (maps to INVALID_ARGUMENT)."""

    def __init__(self, field: str, problem: str, expected: str = "") -> None:
        self.field = field
        self.problem = problem
        self.expected = expected
        message = f"{field}: {problem}"
        if expected:
            message += f" (expected {expected})"
        super().__init__(message)


class ChecksumError(FramingError):
    """A chunk whose bytes do not match its CRC32C (maps to DATA_LOSS)."""
