"""Tensor dtypes on the wire: their names (torch's, without "torch.") and sizes."""

from __future__ import annotations

import torch

from .errors import FramingError

# Every dtype a tensor may travel as. The pipeline accepts fewer (SPEC section 8);
# the wire carries the others so the server can name the wrong dtype instead of
# failing to decode it.
_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

WIRE_DTYPES: tuple[str, ...] = tuple(_DTYPES)


def dtype_name(dtype: torch.dtype, field: str = "dtype") -> str:
    """The wire name of ``dtype``; ``field`` names the tensor in the error."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise FramingError(field, f"has dtype {dtype}, which cannot travel", "one of " + ", ".join(WIRE_DTYPES)) from None


def torch_dtype(name: str, field: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name`` on the wire."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise FramingError(field, f"unknown dtype {name!r}", "one of " + ", ".join(WIRE_DTYPES)) from None
