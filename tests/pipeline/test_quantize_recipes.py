"""BF16 -> NVFP4 recipes: byte for byte the shared ModelOpt 0.47 and llm-compressor 0.14 checkpoints, and the
format's rounding on random, zero, tiny and huge weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from nvfp4_prep.contract.layout import BACKENDS
from nvfp4_prep.pipeline import PrepError, assemble_layer, prepare, unprepare
from nvfp4_prep.pipeline.quantize import (
    LLM_COMPRESSOR,
    MODELOPT,
    RECIPES,
    dequantize,
    quantize_layer,
    quantize_weights,
    quantized_expert_tensors,
)
from nvfp4_prep.pipeline.quantize.e2m1 import MAGNITUDES

TOOL_CHECKPOINTS = {MODELOPT: "qwen3moe_modelopt_nvfp4", LLM_COMPRESSOR: "qwen3moe_ct_nvfp4"}
LAYERS = ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")
GRID = torch.tensor(MAGNITUDES + tuple(-m for m in MAGNITUDES[1:]))


def _layer(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix) + 1:]: value for name, value in tensors.items() if name.startswith(prefix + ".")}


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def checkpoints(testdata: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(testdata / name / "model.safetensors")
            for name in ("qwen3moe_bf16", *TOOL_CHECKPOINTS.values())}


def _inputs(checkpoints: dict, recipe: str, prefix: str) -> tuple[dict, dict, dict]:
    bf16 = _layer(checkpoints["qwen3moe_bf16"], prefix)
    tool = _layer(checkpoints[TOOL_CHECKPOINTS[recipe]], prefix)
    scales = {name: value for name, value in tool.items() if name.rsplit(".", 1)[1].startswith("input_")}
    return bf16, tool, scales


@pytest.mark.parametrize("prefix", LAYERS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_reproduces_every_expert_tensor_of_the_tool(checkpoints: dict, recipe: str, prefix: str) -> None:
    bf16, tool, scales = _inputs(checkpoints, recipe, prefix)
    got = quantized_expert_tensors(bf16, recipe, scales)
    assert sorted(got) == sorted(tool)
    assert len(tool) == 8 * 3 * 4
    for name, want in tool.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert torch.equal(_bytes(got[name]), _bytes(want)), name


def test_the_shared_checkpoints_tell_the_rounding_rules_apart(checkpoints: dict) -> None:
    """The reciprocal-then-product rounding of the bf16 global scale is what the data shows, not plain division."""
    differ = 0
    for prefix in LAYERS:
        bf16, tool, _ = _inputs(checkpoints, LLM_COMPRESSOR, prefix)
        for e in range(8):
            for group in (("gate_proj", "up_proj"), ("down_proj",)):
                amax = torch.stack([bf16[f"{e}.{proj}.weight"].abs().amax() for proj in group]).amax()
                stored = tool[f"{e}.{group[0]}.weight_global_scale"].item()
                assert stored == (amax.reciprocal() * 2688.0).float().item()
                differ += int((2688.0 / amax.float()).to(torch.bfloat16).float().item() != stored)
    assert differ > 0


@pytest.mark.parametrize("recipe", RECIPES)
def test_quantized_layer_prepares_like_the_tool_checkpoint_for_every_backend(checkpoints: dict, recipe: str) -> None:
    for prefix in LAYERS:
        bf16, tool, scales = _inputs(checkpoints, recipe, prefix)
        stacked = quantize_layer(bf16, recipe, scales)
        reference = assemble_layer(tool)
        assert sorted(stacked) == sorted(reference)
        for name, want in reference.items():
            assert stacked[name].dtype == want.dtype and stacked[name].shape == want.shape, name
            assert torch.equal(_bytes(stacked[name]), _bytes(want)), name
        for backend in BACKENDS:
            ours, theirs = prepare(stacked, backend), prepare(reference, backend)
            assert ours.layout == theirs.layout
            for name, want in theirs.tensors.items():
                assert torch.equal(_bytes(ours.tensors[name]), _bytes(want)), (backend, name)


def test_stacked_weights_quantize_like_per_expert_ones(checkpoints: dict) -> None:
    bf16, tool, _ = _inputs(checkpoints, MODELOPT, LAYERS[1])
    reference = assemble_layer(tool)
    stacked_weights = {
        "w13_weight": torch.stack([torch.cat([bf16[f"{e}.gate_proj.weight"], bf16[f"{e}.up_proj.weight"]])
                                   for e in range(8)]),
        "w2_weight": torch.stack([bf16[f"{e}.down_proj.weight"] for e in range(8)]),
    }
    scales = {"w13_input_scale": reference["w13_input_scale"], "w2_input_scale": reference["w2_input_scale"]}
    stacked = quantize_layer(stacked_weights, MODELOPT, scales, chunk_elements=1)  # one expert per chunk
    for name, want in reference.items():
        assert torch.equal(_bytes(stacked[name]), _bytes(want)), name


def test_activation_scales_of_the_other_tool_are_converted(checkpoints: dict) -> None:
    """ModelOpt recipe with compressed-tensors scales reads them as vLLM does (1 / input_global_scale); the other
    way forms the global scale from the amax in the model's dtype, as llm-compressor does."""
    bf16, ct_tool, ct_scales = _inputs(checkpoints, LLM_COMPRESSOR, LAYERS[0])
    got = quantized_expert_tensors(bf16, MODELOPT, ct_scales)
    want = torch.reciprocal(ct_tool["0.down_proj.input_global_scale"]).reshape(())
    assert torch.equal(got["0.down_proj.input_scale"], want)
    _, mo_tool, mo_scales = _inputs(checkpoints, MODELOPT, LAYERS[0])
    got = quantized_expert_tensors(bf16, LLM_COMPRESSOR, mo_scales)
    amax = (mo_tool["0.down_proj.input_scale"] * 2688.0).to(torch.bfloat16)
    assert got["0.down_proj.input_global_scale"].item() == (amax.reciprocal() * 2688.0).float().item()


def _random_layer(experts: int, hidden: int, inter: int, seed: int, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w13_weight": (torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.02).to(dtype),
            "w2_weight": (torch.randn(experts, hidden, inter, generator=gen) * 0.02).to(dtype)}


def _scales(experts: int) -> dict[str, torch.Tensor]:
    return {"w13_input_scale": torch.full((experts, 2), 0.002), "w2_input_scale": torch.full((experts,), 0.001)}


def _check_nearest(weights: torch.Tensor, recipe: str) -> None:
    """Every dequantized value is the nearest grid point (E2M1 value times the block's divisor) to the input."""
    quantized = quantize_weights(weights, recipe)
    scale_2 = quantized.global_scale if recipe == MODELOPT else torch.reciprocal(quantized.global_scale)
    got = dequantize(quantized.packed, quantized.block_scale, scale_2)
    divisor = quantized.block_scale.to(torch.float32)
    divisor = divisor * scale_2.reshape(-1, 1, 1) if recipe == MODELOPT else \
        divisor / quantized.global_scale.reshape(-1, 1, 1)
    divisor = divisor.repeat_interleave(16, dim=-1)
    x = weights.to(torch.float32)
    best = ((x / divisor).unsqueeze(-1) - GRID).abs().amin(dim=-1) * divisor
    # float32 rounding of the divisor and of the dequantization (the cancellation in ``best`` included)
    slack = 4 * torch.finfo(torch.float32).eps * (x.abs() + 6 * divisor)
    assert bool(((x - got).abs() <= best + slack).all())
    assert bool(torch.isfinite(got).all())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups=st.integers(1, 3), rows=st.integers(1, 12), blocks=st.integers(1, 6), seed=st.integers(0, 2**31),
       log_scale=st.floats(-30, 30), dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       recipe=st.sampled_from(RECIPES))
def test_random_weights_dequantize_to_the_nearest_grid_point(groups: int, rows: int, blocks: int, seed: int,
                                                             log_scale: float, dtype: torch.dtype,
                                                             recipe: str) -> None:
    if dtype == torch.float16:
        log_scale = max(min(log_scale, 8.0), -8.0)
    gen = torch.Generator().manual_seed(seed)
    weights = (torch.randn(groups, rows, 16 * blocks, generator=gen, dtype=torch.float64) * 2.0**log_scale)
    weights = weights.to(dtype)
    if not bool((weights.abs().amax(dim=(1, 2)) > 0).all()):
        return
    _check_nearest(weights, recipe)


@pytest.mark.parametrize("recipe", RECIPES)
def test_zero_tiny_and_huge_blocks(recipe: str) -> None:
    weights = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    weights[:, 0, :16] = 0                       # a zero block
    weights[0, 1, :16] = 1e-6                    # a block far below its group's amax (about 3)
    weights[1, 1, :16] = 1e-10                   # a block whose scale underflows float32 under group 1's amax
    weights[1, 2, 16:32] = 3e38                  # group 1: a block near bf16's largest value sets the amax
    quantized = quantize_weights(weights, recipe)
    scales = quantized.block_scale.to(torch.float32)
    # ModelOpt stores 1.0 for a zero block (and for one whose scale underflows float32 to zero, as the tiny
    # block under group 1's huge amax does) and floors tiny ones at 2**-9; compressed-tensors stores 0.125 for
    # every block scale that rounds to zero in float8.
    if recipe == MODELOPT:
        assert scales[0, 0, 0].item() == 1.0 and scales[0, 1, 0].item() == 2.0**-9 and scales[1, 1, 0].item() == 1.0
    else:
        assert scales[0, 0, 0].item() == 0.125 and scales[0, 1, 0].item() == 0.125 and scales[1, 1, 0].item() == 0.125
    assert scales[1, 2, 1].item() == 448.0
    assert bool((quantized.packed[:, 0, :8] == 0).all())
    _check_nearest(weights, recipe)


def test_all_zero_weight_is_refused_by_modelopt_and_gets_global_scale_one_from_llm_compressor() -> None:
    layer = _random_layer(2, 64, 32, seed=1)
    layer["w2_weight"][1] = 0
    with pytest.raises(PrepError, match=r"w2_weight \(expert 1\).*all zero") as caught:
        quantize_layer(layer, MODELOPT, _scales(2))
    assert "llm-compressor" in caught.value.expected
    stacked = quantize_layer(layer, LLM_COMPRESSOR, _scales(2))
    assert stacked["w2_weight_scale_2"][1].item() == 1.0
    assert bool((stacked["w2_weight"][1] == 0).all())
    assert bool((stacked["w2_weight_scale"][1].to(torch.float32) == 0.125).all())


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_tensor_and_expert(recipe: str, bad: float) -> None:
    bf16 = {f"{e}.{proj}.weight": torch.randn(*shape).to(torch.bfloat16)
            for e in range(3) for proj, shape in (("w1", (32, 64)), ("w3", (32, 64)), ("w2", (64, 32)))}
    bf16["2.w3.weight"][5, 7] = bad
    scales = {f"{e}.{proj}.input_scale": torch.tensor(0.01) for e in range(3) for proj in ("w1", "w3", "w2")}
    with pytest.raises(PrepError, match="NaN or infinite") as caught:
        quantize_layer(bf16, recipe, scales)
    assert caught.value.field == "2.w3.weight"


def test_missing_activation_scales_are_named() -> None:
    layer = _random_layer(2, 64, 32, seed=2)
    with pytest.raises(PrepError, match="input_scales: are missing") as caught:
        quantize_layer(layer, MODELOPT, None)
    assert "W4A4" in caught.value.expected
    with pytest.raises(PrepError) as caught:
        quantize_layer(layer, MODELOPT, {"w13_input_scale": torch.ones(2, 2)})
    assert caught.value.field == "w2_input_scale"
    per_expert = {f"{e}.{proj}.weight": torch.randn(32, 64 if proj != "down_proj" else 32).to(torch.bfloat16)
                  for e in range(2) for proj in ("gate_proj", "up_proj")}
    per_expert.update({f"{e}.down_proj.weight": torch.randn(64, 32).to(torch.bfloat16) for e in range(2)})
    scales = {f"{e}.{proj}.input_scale": torch.tensor(0.01) for e in range(2) for proj in ("gate_proj", "up_proj")}
    scales["0.down_proj.input_scale"] = torch.tensor(0.01)
    with pytest.raises(PrepError) as caught:
        quantized_expert_tensors(per_expert, LLM_COMPRESSOR, scales)
    assert caught.value.field == "1.down_proj.input_scale"


@pytest.mark.parametrize(("change", "field"), [
    (lambda layer: layer.update(w13_weight=layer["w13_weight"].to(torch.int8)), "w13_weight"),
    (lambda layer: layer.update(w2_weight=layer["w2_weight"][:, :, :16]), "w2_weight"),
    (lambda layer: layer.update(w13_weight=layer["w13_weight"][:, :, :40]), "w2_weight"),
])
def test_bad_weight_shapes_and_dtypes_are_named(change, field: str) -> None:
    layer = _random_layer(2, 64, 32, seed=3)
    change(layer)
    with pytest.raises(PrepError) as caught:
        quantize_layer(layer, MODELOPT, _scales(2))
    assert caught.value.field == field


def test_bad_recipe_and_input_scales_are_named() -> None:
    layer = _random_layer(2, 64, 32, seed=4)
    with pytest.raises(PrepError) as caught:
        quantize_layer(layer, "gptq", _scales(2))
    assert caught.value.field == "recipe"
    scales = _scales(2)
    scales["w2_input_scale"][1] = 0.0
    with pytest.raises(PrepError, match=r"w2_input_scale: is 0\.0 at \[1\]"):
        quantize_layer(layer, MODELOPT, scales)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("activation", ["swiglu", "swigluoai", "relu2"])
def test_random_layers_round_trip_through_prepare_and_unprepare(recipe: str, activation: str) -> None:
    layer = _random_layer(3, 256, 128, seed=6)
    if activation == "relu2":
        layer["w13_weight"] = layer["w13_weight"][:, :128].contiguous()
        scales = {"w13_input_scale": torch.full((3,), 0.002), "w2_input_scale": torch.full((3,), 0.001)}
    else:
        scales = _scales(3)
    stacked = quantize_layer(layer, recipe, scales, activation=activation)
    for backend in BACKENDS:
        prepared = prepare(stacked, backend, activation)
        back = unprepare(prepared.tensors, prepared.layout)
        for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale", "w2_weight_scale_2"):
            assert torch.equal(_bytes(back[name]), _bytes(stacked[name])), (backend, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recipe", RECIPES)
def test_cuda_gives_the_cpu_bytes(recipe: str) -> None:
    layer = _random_layer(4, 512, 256, seed=7)
    cpu = quantize_layer(layer, recipe, _scales(4))
    cuda = quantize_layer({k: v.cuda() for k, v in layer.items()}, recipe, {k: v.cuda() for k, v in _scales(4).items()})
    for name, want in cpu.items():
        assert torch.equal(_bytes(cuda[name].cpu()), _bytes(want)), name
