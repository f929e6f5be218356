"""Tensor dtypes on the wire: the names of ``nvfp4_prep.contract.DTYPES`` that may travel."""

from __future__ import annotations

import torch

from nvfp4_prep.contract.dtypes import DTYPES, dtype_by_torch, dtype_by_wire

from .errors import FramingError

# Every dtype a tensor may travel as. The pipeline accepts fewer (SPEC section 8); the wire carries the
# others so the server can name the wrong dtype instead of failing to decode it.
WIRE_DTYPES: tuple[str, ...] = tuple(row.wire for row in DTYPES if row.wire is not None)


def dtype_name(dtype: torch.dtype, field: str = "dtype") -> str:
    """The wire name of ``dtype``; ``field`` names the tensor in the error."""
    row = dtype_by_torch(dtype)
    if row is None or row.wire is None:
        raise FramingError(field, f"has dtype {dtype}, which cannot travel", "one of " + ", ".join(WIRE_DTYPES))
    return row.wire


def torch_dtype(name: str, field: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name`` on the wire."""
    row = dtype_by_wire(name)
    if row is None:
        raise FramingError(field, f"unknown dtype {name!r}", "one of " + ", ".join(WIRE_DTYPES))
    return row.torch
