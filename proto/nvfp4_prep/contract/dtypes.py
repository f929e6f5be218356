"""Every tensor dtype the project names: its torch dtype, its name on the wire and in safetensors, its width.

One table, so that the wire, the checkpoint reader and the checkpoint writer cannot disagree on a name.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Dtype(NamedTuple):
    torch: torch.dtype | None  # None: safetensors names it, torch cannot hold it
    wire: str | None  # None: cannot travel in a Prepare stream
    safetensors: str
    bits: int


DTYPES: tuple[Dtype, ...] = (
    Dtype(torch.bool, "bool", "BOOL", 8),
    Dtype(torch.uint8, "uint8", "U8", 8),
    Dtype(torch.int8, "int8", "I8", 8),
    Dtype(torch.int16, "int16", "I16", 16),
    Dtype(torch.int32, "int32", "I32", 32),
    Dtype(torch.int64, "int64", "I64", 64),
    Dtype(torch.float8_e4m3fn, "float8_e4m3fn", "F8_E4M3", 8),
    Dtype(torch.float8_e5m2, "float8_e5m2", "F8_E5M2", 8),
    Dtype(torch.float16, "float16", "F16", 16),
    Dtype(torch.bfloat16, "bfloat16", "BF16", 16),
    Dtype(torch.float32, "float32", "F32", 32),
    Dtype(torch.float64, "float64", "F64", 64),
    Dtype(torch.uint16, None, "U16", 16),
    Dtype(torch.uint32, None, "U32", 32),
    Dtype(torch.uint64, None, "U64", 64),
    Dtype(torch.complex64, None, "C64", 64),
    Dtype(None, None, "F8_E8M0", 8),
    Dtype(None, None, "F4", 4),
    Dtype(None, None, "F6_E2M3", 6),
    Dtype(None, None, "F6_E3M2", 6),
)

_BY_TORCH = {row.torch: row for row in DTYPES if row.torch is not None}
_BY_WIRE = {row.wire: row for row in DTYPES if row.wire is not None}
_BY_SAFETENSORS = {row.safetensors: row for row in DTYPES}


def dtype_by_torch(dtype: torch.dtype) -> Dtype | None:
    return _BY_TORCH.get(dtype)


def dtype_by_wire(name: str) -> Dtype | None:
    return _BY_WIRE.get(name)


def dtype_by_safetensors(name: str) -> Dtype | None:
    return _BY_SAFETENSORS.get(name)
