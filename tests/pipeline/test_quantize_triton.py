"""The fused Triton quantization kernels write the torch recipes' bytes; without CUDA or Triton the torch path runs.

The GPU tests are skipped where no CUDA device exists (CI); on the device machine run
``python -m pytest --noconftest tests/pipeline/test_quantize_triton.py``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvfp4_prep.pipeline import PrepError
from nvfp4_prep.pipeline.quantize import RECIPES, layer, quantize_layer, quantize_weights, triton_quantize
from nvfp4_prep.pipeline.quantize.recipes import MODELOPT, global_scales

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ROOT = Path(__file__).resolve().parents[2]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or triton_quantize.triton is None,
                               reason="needs a CUDA device and Triton")


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.cpu().contiguous()
    return tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor


def _spread(groups: int, rows: int, blocks: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random weights whose blocks span many orders of magnitude, with a tenth of the values zero."""
    gen = torch.Generator().manual_seed(seed)
    low, high = (-7.0, 4.0) if dtype == torch.float16 else (-30.0, 30.0)
    magnitude = 10.0 ** torch.empty(groups, rows, blocks, 1).uniform_(low, high, generator=gen)
    values = torch.randn(groups, rows, blocks, 16, generator=gen) * magnitude
    values *= torch.rand(groups, rows, blocks, 16, generator=gen) > 0.1
    return values.reshape(groups, rows, 16 * blocks).to(dtype)


def _edges(dtype: torch.dtype) -> torch.Tensor:
    """Zero and negative-zero blocks, subnormal values beside normal ones, a near-overflow block, and every E2M1
    midpoint (the ties) at several scales."""
    weights = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    tiny = torch.finfo(dtype).tiny
    weights[0, 0, :16] = 0
    weights[0, 1, :16] = -0.0
    weights[0, 2, :16] = torch.tensor([1.0] + [-tiny / 64, tiny / 64] * 7 + [-tiny / 2])
    weights[0, 3, :] = tiny / 8
    weights[1, 0, 16:32] = torch.finfo(dtype).max / 2
    weights[1, 1, :16] = 1e-4
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -2.5, -5.0, 0.1, -0.1, 0.0, -0.0])
    for row, scale in enumerate((1.0, 2.0**-3, 2.0**5, 3.0)):
        weights[2, row] = (ties * scale).repeat(4)
    return weights


def _every_block_scale(dtype: torch.dtype, amax: float) -> torch.Tensor:
    """One group ``[1, rows, 16]`` of absolute maximum ``amax`` whose blocks reach every float8_e4m3fn block scale,
    each block its maximum ``M`` and then, for 16-bit dtypes, every value of the dtype in ``[M/64, M]`` with both
    signs (all that rounds to a non-zero E2M1 code); for float32, random values there and each E2M1 midpoint times
    the block's divisor under either recipe, with its neighbours one ulp away (the ties the division must get
    exactly)."""
    if dtype == torch.float32:
        pool = None
    else:
        pool = torch.arange(0, 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).to(torch.float32)
        pool = pool[torch.isfinite(pool)]
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    gen = torch.Generator().manual_seed(21)
    rows = [torch.tensor([[1.0] + [0.0] * 15])]
    for code in range(1, 127):
        scale = torch.tensor(code, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
        top = (scale / 448).to(dtype).to(torch.float32)
        if pool is None:
            divisors = torch.stack([scale * (torch.tensor(1.0) / 2688), scale / torch.tensor(2688.0)])
            ties = (midpoints[:, None] * divisors[None, :]).flatten()
            ulp = torch.finfo(torch.float32).eps * ties
            values = torch.cat([torch.rand(1500, generator=gen) * top, ties, ties + ulp, ties - ulp])
        else:
            values = pool[(pool >= top / 64) & (pool <= top)]
        values = torch.cat([values, -values]).clamp(-top, top)
        values = torch.cat([values, values.new_zeros(-len(values) % 15)]).reshape(-1, 15)
        rows.append(torch.cat([top.expand(len(values), 1), values], dim=1))
    return (torch.cat(rows) * amax).to(dtype).unsqueeze(0)


# Group maxima of 1.0 and near the ends of what Markstein's division takes (global scales of about 2**-52 and 2**50).
_AMAX = {torch.bfloat16: (1.0, 2.0**-41, 2.0**61), torch.float16: (1.0, 2.0**-10, 2.0**15),
         torch.float32: (1.0, 2.0**-41, 2.0**61)}


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", range(3))
@pytest.mark.gpu
@needs_gpu
def test_triton_division_equals_ieee_division_at_every_block_scale(recipe: str, dtype: torch.dtype,
                                                                   scale: int) -> None:
    """The kernel's division (Markstein's, module docstring) against the torch path's IEEE division."""
    weights = _every_block_scale(dtype, _AMAX[dtype][scale]).cuda()
    amax, smallest = triton_quantize.group_extrema(weights)
    assert triton_quantize.markstein_safe(recipe, global_scales(recipe, amax), smallest)  # the path under test
    _assert_same(quantize_weights(weights, recipe), quantize_weights(weights.cpu(), recipe))


@pytest.mark.parametrize("recipe", RECIPES)
def test_markstein_division_is_taken_only_inside_its_range(recipe: str) -> None:
    """Global scales beyond [2**-55, 2**55], or a value below 2**-100 of a divisor, take IEEE division."""
    low, high = triton_quantize.SAFE_GLOBAL
    ones = torch.ones(2)
    for glob, safe in ((1.0, True), (low, True), (high, True), (low / 2, False), (high * 2, False)):
        assert triton_quantize.markstein_safe(recipe, torch.tensor([1.0, glob]), ones) is safe, glob
    glob = torch.tensor([2.0**-20, 1.0])
    largest_divisor = 448 * glob if recipe == MODELOPT else 448 / glob
    at = largest_divisor * 2.0**-100
    assert triton_quantize.markstein_safe(recipe, glob, at)
    assert not triton_quantize.markstein_safe(recipe, glob, at * torch.tensor([1.0, 0.5]))


def _assert_same(got, want) -> None:
    for field in ("packed", "block_scale", "global_scale"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.is_cuda and a.dtype == b.dtype and a.shape == b.shape, field
        assert torch.equal(_raw(a), _raw(b)), field


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["spread", "edges", "one-group", "odd-blocks"])
@pytest.mark.gpu
@needs_gpu
def test_triton_bytes_equal_cpu_bytes(recipe: str, dtype: torch.dtype, case: str) -> None:
    weights = {"spread": lambda: _spread(4, 24, 20, dtype, seed=DTYPES.index(dtype)),
               "edges": lambda: _edges(dtype),
               "one-group": lambda: _spread(1, 7, 3, dtype, seed=11),
               "odd-blocks": lambda: _spread(3, 37, 13, dtype, seed=12)}[case]()
    try:
        want = quantize_weights(weights, recipe)
    except PrepError as exc:  # a ModelOpt group too small for float32's range: the GPU refuses it the same way
        with pytest.raises(PrepError) as caught:
            quantize_weights(weights.cuda(), recipe)
        assert str(caught.value) == str(exc)
        return
    _assert_same(quantize_weights(weights.cuda(), recipe), want)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("experts, hidden, inter", [(1, 7168, 2048), (3, 256, 128)])
@pytest.mark.gpu
@needs_gpu
def test_triton_layer_equals_cpu_and_cuda_torch_layers(monkeypatch, recipe: str, experts: int, hidden: int,
                                                       inter: int) -> None:
    gen = torch.Generator().manual_seed(experts)
    weights = {"w13_weight": (torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.02).to(torch.bfloat16),
               "w2_weight": (torch.randn(experts, hidden, inter, generator=gen) * 0.02).to(torch.bfloat16)}
    scales = {"w13_input_scale": torch.full((experts, 2), 0.002), "w2_input_scale": torch.full((experts,), 0.001)}
    want = quantize_layer(weights, recipe, scales)
    cuda = {name: value.cuda() for name, value in weights.items()}
    got = quantize_layer(cuda, recipe, scales)
    monkeypatch.setattr(layer, "_KERNEL", "torch")
    eager = quantize_layer(cuda, recipe, scales)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].is_cuda, name
        assert torch.equal(_raw(got[name]), _raw(tensor)), name
        assert torch.equal(_raw(eager[name]), _raw(tensor)), name


@pytest.mark.gpu
@needs_gpu
def test_triton_refuses_non_finite_and_zero_weights_like_the_torch_path() -> None:
    weights = _spread(3, 5, 4, torch.bfloat16, seed=4)
    weights[2, 3, 7] = float("nan")
    weights[0] = 0
    for recipe, bad in ((MODELOPT, weights[:2]), (RECIPES[1], weights)):
        with pytest.raises(PrepError) as want:
            quantize_weights(bad, recipe, name="w")
        with pytest.raises(PrepError) as got:
            quantize_weights(bad.cuda(), recipe, name="w")
        assert (got.value.field, got.value.problem) == (want.value.field, want.value.problem)
    assert want.value.field == "w[2]" and "row 3" in want.value.problem


_DIGEST = """
import hashlib, sys, torch
{block}
from nvfp4_prep.pipeline.quantize import quantize_weights, triton_quantize
weights = (torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(9)) * 0.02).to(torch.bfloat16)
out = quantize_weights(weights, sys.argv[1])
print(triton_quantize.triton is None, triton_quantize.available(weights))
parts = (out.packed, out.block_scale.view(torch.uint8), out.global_scale)
print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in parts)).hexdigest())
"""


@pytest.mark.parametrize("recipe", RECIPES)
def test_without_triton_the_torch_path_gives_the_same_bytes(recipe: str) -> None:
    """A CPU-only install (no Triton module at all) imports the package and quantizes on the torch path."""
    script = _DIGEST.format(block='sys.modules["triton"] = None  # import triton now raises ImportError')
    result = subprocess.run([sys.executable, "-c", script, recipe], capture_output=True, text=True, cwd=ROOT,
                            timeout=120, check=True)
    lines = result.stdout.split()
    assert lines[:2] == ["True", "False"], result.stdout
    weights = (torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(9)) * 0.02).to(torch.bfloat16)
    out = quantize_weights(weights, recipe)
    here = hashlib.sha256(b"".join(_raw(t).numpy().tobytes() for t in (out.packed, out.block_scale,
                                                                         out.global_scale))).hexdigest()
    assert lines[2] == here
    assert not triton_quantize.available(weights)  # CPU tensors take the torch path even where Triton imports
