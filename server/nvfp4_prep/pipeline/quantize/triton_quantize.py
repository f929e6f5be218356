"""Triton kernels for the NVFP4 recipes on CUDA: two passes over the weights, the torch path's bytes.

Used when the weights live on a CUDA device and Triton imports; everywhere else the torch path of
``layer`` (the reference) runs. The eager recipe makes about fifteen passes over float32 temporaries;
here ``group_extrema`` reads the weights once for each group's absolute maximum (the global scale is then
formed by ``recipes.global_scales`` on the tiny ``[B]`` tensor, its rounding in the model dtype untouched),
and ``quantize_blocks`` reads them once more and writes packed codes and block scales.

Every step is the recipe's float32 arithmetic in the same order: IEEE division (``tl.div_rn``, or its exact
equivalent below; Triton's ``/`` is approximate) wherever the recipe divides, no fused multiply-add, the
recipe's clamps with NaN propagated as torch's ``clamp`` does, float32 -> float8_e4m3fn by the bit manipulation of c10's
``fp8e4m3fn_from_fp32_value`` (independent of the hardware conversion), and E2M1 by the same kind of
rounding (to nearest even, saturating at 6.0, NaN to code 7 as ``torch.bucketize`` puts it last). Each
value is read from the 32- or 64-bit word that holds it and its pair partner, which is also the packed
byte's pair: no reshape, no shuffle, 32-bit offsets from each program's first block. A program quantizes
blocks of one group.

IEEE division per value would bound the pass, so where it is safe the division is Markstein's: with
``y = RN(1/d)`` once per block, ``q = RN(v * y)``, the exact residual ``r = fma(-q, d, v)`` and
``RN(q + r * y)`` by one more fma, which is ``RN(v / d)`` wherever the E2M1 code depends on it, and non-zero
with ``v``'s sign wherever ``RN(v / d)`` is. Safe means that every divisor lies in ``[2**-64, 2**64]`` (so
neither the residual nor ``y`` under- or overflows) and no non-zero value is below ``2**-100`` of a divisor (no
quotient near float32's underflow). Both follow from each group's stored global scale and smallest non-zero
magnitude, which the amax pass finds too; a tensor with a group outside them (weights near float32's
limits) is divided with ``div_rn`` throughout. On the H200 this takes the pass from compute- to memory-bound.
"""

from __future__ import annotations

import torch

from .recipes import BLOCK, CT_ZERO_BLOCK_SCALE, E2M1_MAX, E4M3_MAX, MODELOPT, MODELOPT_MIN_BLOCK_SCALE

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton
    triton = None

AMAX_TILE = 4096
AMAX_TILES = 8  # 32 Ki elements (64 KiB of bf16) and one atomic per program
BLOCKS_PER_PROGRAM = 256  # 4096 values: 8 KiB of bf16 in, 2 KiB of codes and 256 scales out (best on H200)
QUANTIZE_WARPS = 2
MAX_GRID_GROUPS = 65535
# Where Markstein's division gives div_rn's codes (module docstring): a block scale lies in [2**-9, 448], so
# global scales in [2**-55, 2**55] keep every divisor in [2**-64, 2**64] under either recipe.
SAFE_GLOBAL = (2.0**-55, 2.0**55)
SMALLEST_QUOTIENT = 2.0**-100
# How ``_pair_values`` reads a word of two values, and how the recipe rounds ``bamax / 6`` (compressed-tensors
# computes it in the model dtype).
_WORD_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def available(tensor: torch.Tensor) -> bool:
    return triton is not None and tensor.is_cuda


if triton is not None:
    _PAIRS = tl.constexpr(BLOCK // 2)  # a block's values as pairs: one packed byte and one load word each
    _SIX = tl.constexpr(E2M1_MAX)
    _MAX_SCALE = tl.constexpr(E4M3_MAX)
    _MIN_SCALE = tl.constexpr(MODELOPT_MIN_BLOCK_SCALE)
    # compressed-tensors' replacement for a zero block scale, as a float8_e4m3fn code.
    _CT_ZERO_CODE = tl.constexpr(int(torch.tensor(CT_ZERO_BLOCK_SCALE).to(torch.float8_e4m3fn).view(torch.uint8)))

    @triton.jit
    def _group_extrema(w_ptr, bits_ptr, smallest_ptr, group_len, TILE: tl.constexpr, TILES: tl.constexpr):
        # |x| as int32 bits orders like the floats (NaN and inf above every finite value), so one integer
        # atomic max (and min, of the non-zero ones) per program combines the partial extrema.
        group = tl.program_id(1).to(tl.int64)
        start = tl.program_id(0).to(tl.int64) * (TILE * TILES)
        best = tl.zeros((TILE,), dtype=tl.int32)
        least = tl.full((TILE,), 0x7FFFFFFF, dtype=tl.int32)
        for i in range(TILES):
            offs = start + i * TILE + tl.arange(0, TILE)
            x = tl.load(w_ptr + group * group_len + offs, mask=offs < group_len, other=0)
            bits = tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True)
            best = tl.maximum(best, bits)
            least = tl.minimum(least, tl.where(bits == 0, 0x7FFFFFFF, bits))
        tl.atomic_max(bits_ptr + group, tl.max(best, axis=0))
        tl.atomic_min(smallest_ptr + group, tl.min(least, axis=0))

    @triton.jit
    def _e4m3_code(s):
        """int32 float8_e4m3fn codes of float32 ``s`` in [0, 448] or NaN, as c10 rounds them."""
        bits = s.to(tl.int32, bitcast=True)
        # Normal: drop 20 mantissa bits to nearest even, rebias the exponent from 127 to 7.
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
        # Below 2**-6: adding 2**14 (ulp 2**-9) rounds to a multiple of the smallest subnormal.
        subnormal = (s + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
        code = tl.where(bits < (121 << 23), subnormal, normal)
        return tl.where(s != s, 0x7F, code)

    @triton.jit
    def _e4m3_value(code):
        return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)

    @triton.jit
    def _e2m1_code(v):
        """int32 E2M1 codes of float32 ``v`` as ``e2m1.e2m1_codes`` gives them, by the same bit manipulation."""
        mag = tl.abs(v)
        mag = tl.where(mag < 6.0, mag, 6.0)  # saturate; inf and NaN too (torch.bucketize puts NaN last)
        bits = mag.to(tl.int32, bitcast=True)
        # From 1.0: drop 22 mantissa bits to nearest even, rebias the exponent from 127 to 1.
        normal = ((bits + 0x1FFFFF + ((bits >> 22) & 1)) >> 22) - (126 << 1)
        # Below 1.0: adding 2**22 (ulp 0.5) rounds to a multiple of 0.5 (codes 0, 1 and 2 = 1.0).
        small = (mag + 4194304.0).to(tl.int32, bitcast=True) - (149 << 23)
        code = tl.where(bits < (127 << 23), small, normal)
        return code | tl.where(v < 0, 8, 0)  # the sign bit for every value below zero, not for -0.0

    @triton.jit
    def _markstein(v, d, y):
        """``RN(v / d)`` given ``y = RN(1 / d)``, where the module docstring says it is safe."""
        q = v * y
        return tl.fma(tl.fma(-q, d, v), y, q)

    @triton.jit
    def _pair_values(words, WORD_KIND: tl.constexpr):
        """float32 values of elements 2j and 2j + 1 from the word holding both (little-endian)."""
        if WORD_KIND == 0:  # float32 pairs in int64 words
            even = words.to(tl.int32).to(tl.float32, bitcast=True)
            odd = (words >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        elif WORD_KIND == 1:  # bfloat16 pairs: a bfloat16 is the top half of its float32
            even = (words << 16).to(tl.float32, bitcast=True)
            odd = (words & -65536).to(tl.float32, bitcast=True)
        else:  # float16 pairs
            even = words.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            odd = (words >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return even, odd

    @triton.jit
    def _quantize_blocks(w_ptr, glob_ptr, packed_ptr, scale_ptr, blocks_per_group,
                         MODELOPT_RECIPE: tl.constexpr, WORD_KIND: tl.constexpr, MARKSTEIN: tl.constexpr,
                         NB: tl.constexpr):
        # One program: NB blocks of one group (axis 1), so the global scale is one scalar and every
        # per-element offset is a 32-bit one from the program's first block.
        row = tl.arange(0, NB)
        inside = tl.program_id(0) * NB + row < blocks_per_group
        first = tl.program_id(1).to(tl.int64) * blocks_per_group + tl.program_id(0).to(tl.int64) * NB
        pair = row[:, None] * _PAIRS + tl.arange(0, _PAIRS)[None, :]
        words = tl.load(w_ptr + first * _PAIRS + pair, mask=inside[:, None], other=0)
        even, odd = _pair_values(words, WORD_KIND)
        glob = tl.load(glob_ptr + tl.program_id(1))
        bamax = tl.max(tl.maximum(tl.abs(even), tl.abs(odd)), axis=1)
        if MODELOPT_RECIPE:
            s = tl.div_rn(bamax, _SIX * glob)
            s = tl.where(s == 0, 1.0, s)
            code = _e4m3_code(tl.clamp(s, _MIN_SCALE, _MAX_SCALE, propagate_nan=tl.PropagateNan.ALL))
            divisor = _e4m3_value(code) * glob
        else:
            t = tl.div_rn(bamax, _SIX)
            if WORD_KIND == 1:
                t = t.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
            elif WORD_KIND == 2:
                t = t.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
            code = _e4m3_code(tl.clamp(glob * t, -_MAX_SCALE, _MAX_SCALE, propagate_nan=tl.PropagateNan.ALL))
            code = tl.where(code == 0, _CT_ZERO_CODE, code)
            divisor = tl.div_rn(_e4m3_value(code), glob)
        if MARKSTEIN:
            reciprocal = tl.div_rn(1.0, divisor)[:, None]
            low = _e2m1_code(_markstein(even, divisor[:, None], reciprocal))
            high = _e2m1_code(_markstein(odd, divisor[:, None], reciprocal))
        else:
            low = _e2m1_code(tl.div_rn(even, divisor[:, None]))
            high = _e2m1_code(tl.div_rn(odd, divisor[:, None]))
        tl.store(packed_ptr + first * _PAIRS + pair, (low | (high << 4)).to(tl.uint8), mask=inside[:, None])
        tl.store(scale_ptr + first + row, code.to(tl.uint8), mask=inside)


def _group_slices(groups: int):
    """Launch ranges of at most MAX_GRID_GROUPS groups (a grid's second axis holds at most 65535)."""
    return ((start, min(groups, start + MAX_GRID_GROUPS)) for start in range(0, groups, MAX_GRID_GROUPS))


def group_extrema(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B]`` absolute maximum of each ``weights[b]`` in the weights' dtype (NaN or inf where one is), and
    ``[B]`` float32 smallest non-zero magnitude (the largest finite float32 for an all-zero group)."""
    weights = weights.contiguous()
    groups = weights.shape[0]
    group_len = weights[0].numel() if groups else 0
    bits = torch.zeros((groups,), dtype=torch.int32, device=weights.device)
    smallest = torch.full((groups,), 0x7F7FFFFF, dtype=torch.int32, device=weights.device)
    if group_len:
        for start, end in _group_slices(groups):
            grid = (triton.cdiv(group_len, AMAX_TILE * AMAX_TILES), end - start)
            _group_extrema[grid](weights[start:end], bits[start:end], smallest[start:end], group_len,
                                 TILE=AMAX_TILE, TILES=AMAX_TILES, num_warps=8)
    return bits.view(torch.float32).to(weights.dtype), smallest.view(torch.float32)


def markstein_safe(recipe: str, stored_global: torch.Tensor, smallest: torch.Tensor) -> bool:
    """Whether Markstein's division gives ``div_rn``'s codes for every group (module docstring); one sync."""
    low, high = SAFE_GLOBAL
    largest_divisor = E4M3_MAX * stored_global if recipe == MODELOPT else E4M3_MAX / stored_global
    safe = (stored_global >= low) & (stored_global <= high) & (smallest >= SMALLEST_QUOTIENT * largest_divisor)
    return bool(safe.all())


def quantize_blocks(weights: torch.Tensor, recipe: str, stored_global: torch.Tensor, packed: torch.Tensor,
                    block_scale: torch.Tensor, *, markstein: bool) -> None:
    """Write ``packed`` ``[B, rows, K/2]`` and ``block_scale`` ``[B, rows, K/16]`` of ``[B, rows, K]`` weights
    given each group's stored global scale (float32 ``[B]``, ``recipes.global_scales``); ``markstein``: what
    ``markstein_safe`` says of them."""
    weights = weights.contiguous()
    blocks_per_group = weights[0].numel() // BLOCK if weights.shape[0] else 0
    if not blocks_per_group:
        return
    words = weights.view(torch.int64 if weights.dtype == torch.float32 else torch.int32)
    stored_global = stored_global.contiguous()
    scales = block_scale.view(torch.uint8)
    for start, end in _group_slices(weights.shape[0]):
        grid = (triton.cdiv(blocks_per_group, BLOCKS_PER_PROGRAM), end - start)
        _quantize_blocks[grid](words[start:end], stored_global[start:end], packed[start:end], scales[start:end],
                               blocks_per_group, MODELOPT_RECIPE=recipe == MODELOPT,
                               WORD_KIND=_WORD_KIND[weights.dtype], MARKSTEIN=markstein, NB=BLOCKS_PER_PROGRAM,
                               num_warps=QUANTIZE_WARPS, enable_fp_fusion=False)
