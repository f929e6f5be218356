"""assemble_layer on the real shared checkpoints (ModelOpt and compressed-tensors).

The dequantised experts of both formats are compared with the bf16 model they
were made from: a wrong reciprocal or row order would be far off.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from nvfp4_prep.contract.layout import BACKENDS
from nvfp4_prep.pipeline import assemble_layer, prepare, unprepare

PREFIX = "model.layers.1.mlp.experts."
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def experts_of(testdata, folder: str) -> dict[str, torch.Tensor]:
    with safe_open(str(testdata / folder / "model.safetensors"), "pt") as f:
        return {k[len(PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIX)}


def dequantize(weight: torch.Tensor, block: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """SPEC section 1: e2m1 * e4m3(block) * global, for one [rows, K/2] matrix."""
    codes = torch.stack([weight & 0xF, weight >> 4], dim=-1).flatten(-2).long()
    values = E2M1[codes]
    scales = block.to(torch.float32).repeat_interleave(16, dim=-1)
    return values * scales * global_scale


def bf16_experts(testdata) -> dict[str, torch.Tensor]:
    with safe_open(str(testdata / "qwen3moe_bf16" / "model.safetensors"), "pt") as f:
        return {k[len(PREFIX):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(PREFIX)}


@pytest.mark.parametrize("folder", ["qwen3moe_modelopt_nvfp4", "qwen3moe_ct_nvfp4"])
def test_assembled_layer_dequantises_to_the_bf16_model(testdata, folder):
    stacked = assemble_layer(experts_of(testdata, folder))
    source = bf16_experts(testdata)
    assert tuple(stacked["w13_weight"].shape) == (8, 512, 256)
    assert tuple(stacked["w2_weight"].shape) == (8, 512, 128)
    assert tuple(stacked["w13_weight_scale_2"].shape) == (8, 2)
    for e in range(8):
        ws = stacked["w13_weight_scale_2"][e]
        w13 = dequantize(stacked["w13_weight"][e], stacked["w13_weight_scale"][e], ws[0])
        want = torch.cat([source[f"{e}.gate_proj.weight"], source[f"{e}.up_proj.weight"]])
        assert (w13 - want).norm() / want.norm() < 0.2, e
        w2 = dequantize(stacked["w2_weight"][e], stacked["w2_weight_scale"][e], stacked["w2_weight_scale_2"][e])
        want2 = source[f"{e}.down_proj.weight"]
        assert (w2 - want2).norm() / want2.norm() < 0.2, e


def test_compressed_tensors_scales_are_reciprocals(testdata):
    raw = experts_of(testdata, "qwen3moe_ct_nvfp4")
    stacked = assemble_layer(raw)
    for e in range(8):
        assert float(stacked["w13_weight_scale_2"][e, 0]) == float(1 / raw[f"{e}.gate_proj.weight_global_scale"])
        assert float(stacked["w13_input_scale"][e, 1]) == float(1 / raw[f"{e}.up_proj.input_global_scale"])
        assert float(stacked["w2_input_scale"][e]) == float(1 / raw[f"{e}.down_proj.input_global_scale"])


def test_policy_outcomes_differ_on_compressed_tensors_down_scales(testdata):
    # testdata/README: down_proj.input_global_scale differs across experts.
    stacked = assemble_layer(experts_of(testdata, "qwen3moe_ct_nvfp4"))
    prepared = prepare(stacked, "flashinfer_cutedsl", input_scale_policy="max")
    assert torch.all(prepared.tensors["w2_input_scale"] == stacked["w2_input_scale"].max())
    with pytest.raises(ValueError, match="w2_input_scale"):
        prepare(stacked, "flashinfer_cutedsl", input_scale_policy="strict")


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_layers_round_trip(testdata, backend):
    for folder in ("qwen3moe_modelopt_nvfp4", "qwen3moe_ct_nvfp4"):
        stacked = assemble_layer(experts_of(testdata, folder))
        prepared = prepare(stacked, backend)
        restored = unprepare(prepared.tensors, prepared.layout)
        for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
            assert torch.equal(restored[name].view(torch.uint8), stacked[name].view(torch.uint8)), name


def test_mixtral_names_and_interleaved_rows(testdata):
    raw = experts_of(testdata, "qwen3moe_modelopt_nvfp4")
    renamed = {k.replace("gate_proj", "w1").replace("up_proj", "w3").replace("down_proj", "w2"): v
               for k, v in raw.items()}
    plain, mixtral = assemble_layer(raw), assemble_layer(renamed)
    assert all(torch.equal(plain[n].view(torch.uint8) if plain[n].element_size() == 1 else plain[n],
                           mixtral[n].view(torch.uint8) if mixtral[n].element_size() == 1 else mixtral[n])
               for n in plain)
    interleaved = assemble_layer(raw, activation="swigluoai")
    assert torch.equal(interleaved["w13_weight"][:, 0::2], plain["w13_weight"][:, :256])
    assert torch.equal(interleaved["w13_weight"][:, 1::2], plain["w13_weight"][:, 256:])
    # Both orders prepare to the same kernel layout.
    a = prepare(plain, "flashinfer_cutedsl", "swiglu").tensors["w13_weight"]
    b = prepare(interleaved, "flashinfer_cutedsl", "swigluoai").tensors["w13_weight"]
    assert torch.equal(a, b)
