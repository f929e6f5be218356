"""FP4 E2M1 codes and nibble packing (SPEC section 1), as both quantization tools produce them.

Both tools round to the nearest E2M1 magnitude with ties to the even code (0.25 -> 0, 0.75 -> 1.0,
1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5.0 -> 4.0), saturate above 5 to 6.0, and set the sign
bit for every value below zero, so a small negative value that rounds to zero is stored as code 8 (-0) and
an exact -0.0 as code 0. ModelOpt 0.47 (``NVFP4QTensor._cast_fp4``: a search over the midpoints plus an
equality test at the midpoints whose upper neighbour is even) and compressed-tensors 0.19
(``cast_to_fp4`` thresholds, then ``pack_fp4_to_uint8`` with ``signbit``) agree on every finite input.
Packing: element ``2j`` in the low nibble, ``2j + 1`` in the high nibble.
"""

from __future__ import annotations

import torch

# Midpoints between neighbouring magnitudes whose tie goes down (to an even code) and up (to an even code).
_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)
MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
SIGN_BIT = 0x8


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """uint8 codes (0..15) of finite float32 ``values`` rounded to E2M1.

    The magnitude code is the number of midpoints below the value: strictly below for a midpoint whose
    tie rounds down, at or below for one whose tie rounds up (two ``bucketize`` passes, deterministic on
    every device).
    """
    magnitude = values.abs()
    down = torch.tensor(_TIES_DOWN, dtype=values.dtype, device=values.device)
    up = torch.tensor(_TIES_UP, dtype=values.dtype, device=values.device)
    codes = torch.bucketize(magnitude, down, out_int32=True, right=False)
    codes += torch.bucketize(magnitude, up, out_int32=True, right=True)
    codes = codes.to(torch.uint8)
    codes |= (values < 0).to(torch.uint8) << 3
    return codes


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` codes to ``[..., K/2]`` bytes, element ``2j`` in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_values(packed: torch.Tensor) -> torch.Tensor:
    """``[..., K/2]`` bytes to the ``[..., K]`` float32 E2M1 values they hold (for dequantization)."""
    table = torch.tensor(MAGNITUDES + tuple(-m for m in MAGNITUDES), dtype=torch.float32, device=packed.device)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    return table[codes.long()]
