"""Errors of decoding tensors from the wire, each naming the field at fault."""

from __future__ import annotations

from nvfp4_prep.contract.errors import PrepError


class FramingError(PrepError):
    """A tensor header or chunk that breaks the framing rules (maps to INVALID_ARGUMENT).

    The same shape as every bad-input error of the contract (field, problem, expected),
    since both are bad input that the service reports field by field.
    """


class ChecksumError(FramingError):
    """A chunk whose bytes do not match its CRC32C (maps to DATA_LOSS)."""
