"""SPEC section 3 row primitives as source-index maps.

Each function returns a long tensor ``src`` of the output length where output
row ``r`` takes input row ``src[r]``. Maps compose by indexing
(``a[b]`` applies ``b`` after ``a``), so a backend's whole row pipeline
collapses into one map that is applied in a single pass.
"""

from __future__ import annotations

import torch

from nvfp4_prep.contract.errors import PrepError

SHUFFLE_BLOCK = 32  # TRT-LLM shuffle block for epilogue tile 128


def _rows(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long)


def swap_halves(n: int) -> torch.Tensor:
    """P1: ``[gate; up] -> [up; gate]``."""
    return (_rows(n) + n // 2) % n


def deinterleave(n: int, up_first: bool = True) -> torch.Tensor:
    """P2: gpt-oss rows ``[g0, u0, g1, u1, ...]`` to ``[up; gate]`` (or ``[gate; up]``)."""
    half = _rows(n // 2)
    gate, up = 2 * half, 2 * half + 1
    return torch.cat([up, gate]) if up_first else torch.cat([gate, up])


def interleave_groups(n: int, group: int) -> torch.Tensor:
    """P3: CuteDSL groups of ``group`` rows (64, or 16 for FlashInfer 0.7.4's swap-AB kernels) taken
    alternately from each half."""
    r = _rows(n)
    block, half, j = r // (2 * group), (r // group) % 2, r % group
    return half * (n // 2) + group * block + j


def interleave_64(n: int) -> torch.Tensor:
    """P3 as SPEC section 3 states it."""
    return interleave_groups(n, 64)


def gated_pairing(n: int) -> torch.Tensor:
    """P5: TRT-LLM gated pairing, ``2j -> j``, ``2j+1 -> n/2 + j``."""
    r = _rows(n)
    return torch.where(r % 2 == 0, r // 2, n // 2 + r // 2)


def trtllm_shuffle(n: int) -> torch.Tensor:
    """P6: TRT-LLM row shuffle for epilogue tile 128 (block of 32 rows)."""
    if n % SHUFFLE_BLOCK:
        raise PrepError("rows", f"{n} rows cannot be shuffled", f"a multiple of {SHUFFLE_BLOCK}")
    r = _rows(n)
    b = SHUFFLE_BLOCK
    return b * (r // b) + (r % 8) * (b // 8) + (r % b) // 8


def trtllm_gemm1(n: int, gated: bool) -> torch.Tensor:
    """P7: ``pi0(pi1(r))`` when gated, ``pi1(r)`` otherwise."""
    shuffle = trtllm_shuffle(n)
    return gated_pairing(n)[shuffle] if gated else shuffle
