"""BF16 in, kernel-ready NVFP4 out, through a real loopback server: streamed (stacked and per-expert) and by
reference, equal to preparing the tools' own checkpoints of the same BF16 model; bad input named."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from nvfp4_prep.client.errors import PrepClientError, PrepInvalidArgument
from nvfp4_prep.client.sdk import PrepClient
from nvfp4_prep.contract.layout import BACKENDS, QUANTIZE_RECIPES
from nvfp4_prep.pipeline import assemble_layer, prepare
from tests.helpers.checkpoint_factory import load_all

PREFIX = "model.layers.1.mlp.experts"
TOOLS = {"modelopt": "qwen3moe_modelopt_nvfp4", "llm-compressor": "qwen3moe_ct_nvfp4"}
INPUT_LEAVES = ("input_scale", "input_global_scale")


def _layer(tensors: dict[str, torch.Tensor], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    return {name[len(prefix) + 1:]: value for name, value in tensors.items() if name.startswith(prefix + ".")}


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(_bytes(got[name]), _bytes(tensor)), name


@pytest.fixture(scope="module")
def model(testdata: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The BF16 layer's per-expert weights and each tool's checkpoint layer, keyed relative to PREFIX."""
    return {name: _layer(load_all(testdata / directory / "model.safetensors"))
            for name, directory in {"bf16": "qwen3moe_bf16", **TOOLS}.items()}


def _scales(tool_layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in tool_layer.items() if name.rsplit(".", 1)[1] in INPUT_LEAVES}


def _stacked(bf16: dict[str, torch.Tensor], modelopt: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The stacked BF16 form (unpacked shapes) and stacked ModelOpt-form input scales of the same layer."""
    experts = range(8)
    w13 = torch.stack([torch.cat([bf16[f"{e}.gate_proj.weight"], bf16[f"{e}.up_proj.weight"]]) for e in experts])
    w2 = torch.stack([bf16[f"{e}.down_proj.weight"] for e in experts])
    a13 = torch.stack([torch.stack([modelopt[f"{e}.{p}.input_scale"].reshape(()) for p in ("gate_proj", "up_proj")])
                       for e in experts])
    a2 = torch.stack([modelopt[f"{e}.down_proj.input_scale"].reshape(()) for e in experts])
    return {"w13_weight": w13, "w2_weight": w2}, {"w13_input_scale": a13, "w2_input_scale": a2}


@pytest.fixture
def client(prep_address: str):
    with PrepClient(prep_address, timeout=120) as prep:
        yield prep


def test_capabilities_list_the_recipes(client: PrepClient) -> None:
    assert list(client.capabilities().quantize_recipes) == list(QUANTIZE_RECIPES)


@pytest.mark.parametrize("form", ["stacked", "per_expert"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_bf16_prepares_like_the_modelopt_checkpoint(client: PrepClient, model: dict, backend: str,
                                                             form: str) -> None:
    if form == "stacked":
        weights, scales = _stacked(model["bf16"], model["modelopt"])
        assert weights["w13_weight"].shape == (8, 512, 512) and weights["w2_weight"].shape == (8, 512, 256)
    else:
        weights, scales = model["bf16"], _scales(model["modelopt"])
    answer = client.prepare_layer(weights, backend, quantize="modelopt", activation_scales=scales)
    want = prepare(assemble_layer(model["modelopt"]), backend)
    _assert_same(answer.tensors, want.tensors)
    assert answer.layout == {**want.layout, "quantize_recipe": "modelopt", "quantized_from": "bfloat16"}


@pytest.mark.parametrize("recipe", QUANTIZE_RECIPES)
def test_each_recipe_prepares_like_its_tool_checkpoint(client: PrepClient, model: dict, recipe: str) -> None:
    tool = model[recipe]
    answer = client.prepare_layer(model["bf16"], "flashinfer_cutedsl", quantize=recipe,
                                  activation_scales=_scales(tool), profile="vllm-0.33", ep_size=2, ep_rank=1)
    want = prepare(assemble_layer(tool), "flashinfer_cutedsl", profile="vllm-0.33", ep_size=2, ep_rank=1)
    _assert_same(answer.tensors, want.tensors)
    assert answer.layout["layout_id"] == want.layout["layout_id"]
    assert answer.layout["quantize_recipe"] == recipe


def test_a_tensor_parallel_shard_equals_the_tool_checkpoint_shard(client: PrepClient, model: dict) -> None:
    """The global scale is over the whole expert, so the shard is cut after quantizing: exact for TP."""
    answer = client.prepare_layer(model["bf16"], "flashinfer_trtllm", quantize="modelopt",
                                  activation_scales=_scales(model["modelopt"]), tp_size=2, tp_rank=1)
    want = prepare(assemble_layer(model["modelopt"]), "flashinfer_trtllm", tp_size=2, tp_rank=1)
    _assert_same(answer.tensors, want.tensors)


def test_the_cache_tells_the_recipes_apart(start_server, model: dict) -> None:
    server = start_server(cache_bytes=64 << 20)
    scales = _scales(model["modelopt"])
    with PrepClient(server.address, timeout=120) as prep:
        first = prep.prepare_layer(model["bf16"], "vllm_cutlass", quantize="modelopt", activation_scales=scales)
        again = prep.prepare_layer(model["bf16"], "vllm_cutlass", quantize="modelopt", activation_scales=scales)
        other = prep.prepare_layer(model["bf16"], "vllm_cutlass", quantize="llm-compressor",
                                   activation_scales=scales)
    assert (first.cache_hit, again.cache_hit, other.cache_hit) == (False, True, False)
    _assert_same(again.tensors, first.tensors)
    assert other.layout["quantize_recipe"] == "llm-compressor"


def _refusal(call) -> PrepClientError:
    with pytest.raises(PrepClientError) as caught:
        call()
    return caught.value


def test_missing_activation_scales_are_refused_naming_the_tensor(client: PrepClient, model: dict) -> None:
    none = _refusal(lambda: client.prepare_layer(model["bf16"], "flashinfer_cutlass", quantize="modelopt"))
    assert none.code == grpc.StatusCode.INVALID_ARGUMENT and none.field == "0.gate_proj.input_scale"
    assert "activation scales" in none.details
    partial = {name: value for name, value in _scales(model["modelopt"]).items() if name != "3.up_proj.input_scale"}
    gap = _refusal(lambda: client.prepare_layer(model["bf16"], "flashinfer_cutlass", quantize="modelopt",
                                                activation_scales=partial))
    assert gap.code == grpc.StatusCode.INVALID_ARGUMENT and gap.field == "3.up_proj.input_scale"
    weights, scales = _stacked(model["bf16"], model["modelopt"])
    del scales["w2_input_scale"]
    stacked = _refusal(lambda: client.prepare_layer(weights, "flashinfer_cutlass", quantize="modelopt",
                                                    activation_scales=scales))
    assert stacked.field == "w2_input_scale" and "is missing" in stacked.details


def test_nan_weights_are_refused_naming_the_tensor_and_expert(client: PrepClient, model: dict) -> None:
    weights = dict(model["bf16"])
    weights["2.up_proj.weight"] = weights["2.up_proj.weight"].clone()
    weights["2.up_proj.weight"][5, 7] = float("nan")
    bad = _refusal(lambda: client.prepare_layer(weights, "flashinfer_cutedsl", quantize="modelopt",
                                                activation_scales=_scales(model["modelopt"])))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and bad.field == "2.up_proj.weight"
    assert "NaN" in bad.details
    stacked, scales = _stacked(model["bf16"], model["modelopt"])
    stacked["w2_weight"] = stacked["w2_weight"].clone()
    stacked["w2_weight"][6, 0, 0] = float("inf")
    bad = _refusal(lambda: client.prepare_layer(stacked, "flashinfer_cutedsl", quantize="llm-compressor",
                                                activation_scales=scales))
    assert bad.field == "w2_weight (expert 6)" and "infinite" in bad.details


def test_quantize_refuses_an_input_shard_and_nvfp4_weights(client: PrepClient, model: dict) -> None:
    weights, scales = _stacked(model["bf16"], model["modelopt"])
    shard = _refusal(lambda: client.prepare_layer(weights, "flashinfer_cutlass", quantize="modelopt",
                                                  activation_scales=scales, ep_size=2, inputs_are_shard=True))
    assert shard.field == "header.shard.inputs_are_shard"
    nvfp4 = {name: value for name, value in model["modelopt"].items() if name.endswith(".weight")}
    packed = _refusal(lambda: client.prepare_layer(nvfp4, "flashinfer_cutlass", quantize="modelopt",
                                                   activation_scales=_scales(model["modelopt"])))
    assert packed.code == grpc.StatusCode.INVALID_ARGUMENT and packed.field.endswith(".weight")
    assert "uint8" in packed.details
    with pytest.raises(PrepInvalidArgument, match="activation_scales: given without quantize"):
        client.prepare_layer(model["modelopt"], "flashinfer_cutlass", activation_scales=scales)


@pytest.fixture
def ref_server(start_server, testdata: Path, tmp_path: Path):
    return start_server(allowed_roots=(testdata, tmp_path))


@pytest.mark.parametrize("recipe", QUANTIZE_RECIPES)
def test_a_bf16_checkpoint_reference_prepares_like_the_tool_checkpoint(ref_server, testdata: Path, model: dict,
                                                                        recipe: str) -> None:
    with PrepClient(ref_server.address, timeout=120) as prep:
        answer = prep.prepare_reference(str(testdata / "qwen3moe_bf16"), PREFIX, "flashinfer_trtllm", quantize=recipe,
                                        activation_scales_location=str(testdata / TOOLS[recipe]), tp_size=2,
                                        tp_rank=0)
    want = prepare(assemble_layer(model[recipe]), "flashinfer_trtllm", tp_size=2, tp_rank=0)
    _assert_same(answer.tensors, want.tensors)
    assert answer.layout == {**want.layout, "quantize_recipe": recipe, "quantized_from": "bfloat16"}


def test_a_reference_takes_scales_from_a_calibration_file(ref_server, testdata: Path, tmp_path: Path,
                                                          model: dict) -> None:
    calibration = tmp_path / "calibration.safetensors"
    save_file({f"{PREFIX}.{name}": value.reshape(()).contiguous()
               for name, value in _scales(model["modelopt"]).items()}, calibration)
    with PrepClient(ref_server.address, timeout=120) as prep:
        answer = prep.prepare_reference(str(testdata / "qwen3moe_bf16"), PREFIX, "vllm_cutlass", quantize="modelopt",
                                        activation_scales_location=str(calibration))
    _assert_same(answer.tensors, prepare(assemble_layer(model["modelopt"]), "vllm_cutlass").tensors)


def test_bad_bf16_references_are_refused_naming_the_field(ref_server, testdata: Path, tmp_path: Path) -> None:
    bf16 = str(testdata / "qwen3moe_bf16")
    with PrepClient(ref_server.address, timeout=120) as prep:
        plain = _refusal(lambda: prep.prepare_reference(bf16, PREFIX, "flashinfer_cutlass"))
        assert plain.code == grpc.StatusCode.INVALID_ARGUMENT and plain.field == "header.quantize"
        assert plain.details == "header.quantize: the checkpoint is BF16; name a recipe (modelopt or llm-compressor)"
        no_scales = _refusal(lambda: prep.prepare_reference(bf16, PREFIX, "flashinfer_cutlass", quantize="modelopt"))
        assert no_scales.field == "header.ref.activation_scales_location" and "is empty" in no_scales.details
        outside = _refusal(lambda: prep.prepare_reference(bf16, PREFIX, "flashinfer_cutlass", quantize="modelopt",
                                                          activation_scales_location="/etc/scales.safetensors"))
        assert outside.code == grpc.StatusCode.PERMISSION_DENIED and "activation_scales_location" in outside.details
        unquantized = _refusal(lambda: prep.prepare_reference(bf16, PREFIX, "flashinfer_cutlass", quantize="modelopt",
                                                              activation_scales_location=bf16))
        assert "holds no activation scales" in unquantized.details
        nvfp4 = _refusal(lambda: prep.prepare_reference(str(testdata / TOOLS["modelopt"]), PREFIX,
                                                        "flashinfer_cutlass", quantize="modelopt",
                                                        activation_scales_location=bf16))
        assert nvfp4.field == "header.quantize" and "NVFP4 already" in nvfp4.details
