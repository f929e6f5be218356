"""SPEC section 8: every bad input raises PrepError naming the field; nothing is returned."""

from __future__ import annotations

import math

import pytest
import torch

from nvfp4_prep.pipeline import PrepError, assemble_layer, prepare, unprepare
from tests.helpers.layer_factory import random_layer


def layer(**changes):
    base = random_layer(2, 256, 128, seed=1)
    base.update(changes)
    return base


def expect(field: str, tensors: dict, backend: str = "flashinfer_cutedsl", activation: str = "swiglu",
           policy: str = "max", fragment: str = "") -> PrepError:
    with pytest.raises(PrepError) as caught:
        prepare(tensors, backend, activation, policy)
    assert caught.value.field == field
    assert field in str(caught.value) and caught.value.expected
    assert fragment in str(caught.value)
    return caught.value


def test_unknown_parameters():
    expect("backend", layer(), backend="cutlass_v9", fragment="flashinfer_cutedsl")
    expect("activation", layer(), activation="gelu")
    expect("input_scale_policy", layer(), policy="min")


@pytest.mark.parametrize("name", ["w13_weight", "w13_weight_scale", "w2_input_scale", "w13_weight_scale_2"])
def test_missing_tensor(name):
    tensors = layer()
    del tensors[name]
    expect(name, tensors, fragment="missing")


def test_odd_n1():
    base = random_layer(2, 256, 128, seed=1)
    tensors = layer(w13_weight=base["w13_weight"][:, :255].contiguous())
    expect("w13_weight", tensors, fragment="odd")


def test_zero_experts():
    empty = {name: t[:0] for name, t in random_layer(2, 256, 128).items()}
    expect("w13_weight", empty, fragment="E = 0")


@pytest.mark.parametrize("name, dtype", [
    ("w13_weight", torch.int8), ("w2_weight", torch.float16), ("w13_weight_scale", torch.float16),
    ("w2_weight_scale", torch.int8), ("w13_weight_scale_2", torch.float64), ("w2_input_scale", torch.bfloat16),
])
def test_wrong_dtypes(name, dtype):
    tensors = layer()
    tensors[name] = tensors[name].view(torch.uint8).to(dtype) if tensors[name].element_size() == 1 \
        else tensors[name].to(dtype)
    expect(name, tensors, fragment="dtype")


def test_block_scales_as_raw_bytes_are_accepted():
    tensors = layer()
    raw = dict(tensors, w13_weight_scale=tensors["w13_weight_scale"].view(torch.uint8),
               w2_weight_scale=tensors["w2_weight_scale"].view(torch.uint8))
    want, got = prepare(tensors, "flashinfer_cutlass"), prepare(raw, "flashinfer_cutlass")
    assert all(torch.equal(want.tensors[n].view(torch.uint8) if want.tensors[n].element_size() == 1
                           else want.tensors[n], got.tensors[n].view(torch.uint8)
                           if got.tensors[n].element_size() == 1 else got.tensors[n]) for n in want.tensors)


@pytest.mark.parametrize("name, shape", [
    ("w13_weight_scale", (2, 256, 15)),  # scale columns do not match H/16
    ("w13_weight_scale", (2, 128, 16)),  # scale rows do not match N1
    ("w2_weight", (2, 256, 32)),         # W2 columns do not match I from W13
    ("w2_weight", (3, 256, 64)),         # expert count differs
    ("w2_weight_scale", (2, 255, 8)),
    ("w13_weight_scale_2", (3,)),
    ("w2_weight_scale_2", (2, 2)),
    ("w13_input_scale", (2, 3)),
])
def test_shape_mismatches(name, shape):
    tensors = layer()
    dtype = tensors[name].dtype
    if dtype == torch.float32:
        tensors[name] = torch.ones(shape)
    else:
        tensors[name] = torch.zeros(shape, dtype=torch.uint8).view(dtype)
    expect(name, tensors, fragment="shape")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, -1.0])
@pytest.mark.parametrize("name", ["w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale"])
def test_bad_scale_values(name, value):
    tensors = layer()
    bad = tensors[name].clone()
    bad.view(-1)[1] = value
    tensors[name] = bad
    expect(name, tensors, fragment="finite values > 0")


@pytest.mark.parametrize("backend, inter, field", [
    ("flashinfer_cutedsl", 96, "w2_weight"),       # I % 64
    ("flashinfer_cutlass", 96, "w13_weight"),      # N1 % 128
    ("vllm_cutlass", 32, "w13_weight"),
])
def test_backend_alignment(backend, inter, field):
    expect(field, random_layer(2, 256, inter), backend=backend)


def test_h_and_i_must_hold_whole_blocks():
    tensors = random_layer(1, 256, 128)
    tensors["w13_weight"] = torch.zeros(1, 256, 132, dtype=torch.uint8)  # H = 264
    expect("w13_weight", tensors, backend="flashinfer_trtllm", fragment="H % 16")


def test_strict_policy_rejects_differing_scales():
    tensors = random_layer(3, 256, 128, shared_gate_up_scales=False, seed=4)
    expect("w13_input_scale", tensors, policy="strict", fragment="gate and up")
    same = random_layer(3, 256, 128, seed=4)
    expect("w13_input_scale", same, policy="strict", fragment="expert 1")
    uniform = dict(same, w13_input_scale=torch.full((3, 2), 0.5), w2_input_scale=torch.tensor([0.5, 0.5, 0.7]))
    expect("w2_input_scale", uniform, policy="strict", fragment="expert 2")
    ok = dict(uniform, w2_input_scale=torch.full((3,), 0.7))
    prepared = prepare(ok, "flashinfer_cutedsl", input_scale_policy="strict")
    assert prepared.tensors["w2_input_scale"].tolist() == pytest.approx([0.7] * 3)


def test_mixed_devices_rejected():
    tensors = layer()
    tensors["w2_input_scale"] = tensors["w2_input_scale"].to("meta")
    expect("tensors", tensors, fragment="devices")


def test_unprepare_rejects_bad_layout_and_dirty_padding():
    prepared = prepare(random_layer(2, 400, 80), "flashinfer_trtllm")
    with pytest.raises(PrepError) as caught:
        unprepare(prepared.tensors, dict(prepared.layout, pipeline_version="0"))
    assert caught.value.field == "layout.pipeline_version"
    with pytest.raises(PrepError) as caught:
        unprepare(prepared.tensors, {k: v for k, v in prepared.layout.items() if k != "backend"})
    assert caught.value.field == "layout.backend"
    dirty = dict(prepared.tensors, w2_weight=prepared.tensors["w2_weight"].clone())
    dirty["w2_weight"][0, -1, 0] = 7  # a padding row of H
    with pytest.raises(PrepError) as caught:
        unprepare(dirty, prepared.layout)
    assert caught.value.field == "w2_weight" and "padding" in str(caught.value)


def expert_tensors(experts: int = 2) -> dict[str, torch.Tensor]:
    out = {}
    for e in range(experts):
        for proj, rows, cols in (("gate_proj", 128, 256), ("up_proj", 128, 256), ("down_proj", 256, 128)):
            out[f"{e}.{proj}.weight"] = torch.zeros(rows, cols // 2, dtype=torch.uint8)
            out[f"{e}.{proj}.weight_scale"] = torch.zeros(rows, cols // 16, dtype=torch.float8_e4m3fn)
            out[f"{e}.{proj}.weight_scale_2"] = torch.tensor(0.5)
            out[f"{e}.{proj}.input_scale"] = torch.tensor(0.25)
    return out


def test_assemble_missing_expert_and_projection_tensor():
    tensors = expert_tensors(3)
    for key in [k for k in tensors if k.startswith("1.")]:
        del tensors[key]
    with pytest.raises(PrepError) as caught:
        assemble_layer(tensors)
    assert caught.value.field == "experts" and "expert 1" in str(caught.value)
    tensors = expert_tensors(2)
    del tensors["1.up_proj.weight_scale_2"]
    with pytest.raises(PrepError) as caught:
        assemble_layer(tensors)
    assert caught.value.field == "1.up_proj.weight_scale_2"
    tensors = expert_tensors(2)
    for key in [k for k in tensors if k.startswith("0.down_proj")]:
        del tensors[key]
    with pytest.raises(PrepError) as caught:
        assemble_layer(tensors)
    assert caught.value.field == "0.down"


def test_assemble_rejects_strange_names_and_shapes():
    with pytest.raises(PrepError) as caught:
        assemble_layer({"0.gate.weight": torch.zeros(1)})
    assert caught.value.field == "0.gate.weight"
    tensors = expert_tensors(2)
    tensors["1.gate_proj.weight"] = torch.zeros(64, 128, dtype=torch.uint8)
    with pytest.raises(PrepError) as caught:
        assemble_layer(tensors)
    assert "w13.weight" in caught.value.field


def test_assemble_huge_expert_index_is_rejected_at_once():
    tensors = expert_tensors(1)
    tensors.update({k.replace("0.", "4000000000.", 1): v for k, v in expert_tensors(1).items()})
    with pytest.raises(PrepError) as caught:
        assemble_layer(tensors)
    assert caught.value.field == "experts" and "expert 1 is missing" in str(caught.value)


@pytest.mark.parametrize("activation", ["swiglu", "swigluoai"])
def test_assemble_rejects_an_expert_of_another_dtype(activation):
    tensors = expert_tensors(2)
    tensors["1.up_proj.weight"] = tensors["1.up_proj.weight"].to(torch.float32)
    with pytest.raises(PrepError) as caught:
        assemble_layer(tensors, activation)
    assert caught.value.field == "1.w13.weight" and "float32" in str(caught.value)
