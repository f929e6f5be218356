"""Unquantized (BF16) checkpoints: opened as format ``bf16``, and written as plain ModelOpt or compressed-tensors
checkpoints whose experts are the tools' own bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nvfp4_prep.checkpoint import CheckpointInvalid, open_checkpoint
from nvfp4_prep.pipeline import PrepError, prepare
from nvfp4_prep.prepared.activation_scales import load_activation_scales
from nvfp4_prep.prepared.quantized_writer import write_quantized_checkpoint
from tests.helpers.checkpoint_factory import load_all, sharded_copy, write_weights

TOOLS = {"modelopt": ("qwen3moe_modelopt_nvfp4", "modelopt"),
         "llm-compressor": ("qwen3moe_ct_nvfp4", "compressed-tensors")}
LAYERS = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_bf16_checkpoint_opens_with_its_expert_weights(testdata: Path) -> None:
    source = testdata / "qwen3moe_bf16"
    raw = load_all(source / "model.safetensors")
    with open_checkpoint(source) as checkpoint:
        assert checkpoint.format == "bf16"
        assert checkpoint.moe_layers() == LAYERS
        experts = checkpoint.read_expert_tensors(LAYERS[1])
        assert len(experts) == 8 * 3
        for key, tensor in experts.items():
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, raw[f"{LAYERS[1]}.{key}"])
        assert "model.layers.0.self_attn.q_proj.weight" in checkpoint.other_tensor_names()
        assert "model.layers.0.mlp.gate.weight" in checkpoint.other_tensor_names()


def _mixtral(directory: Path, experts: int, shards: int = 1, skip: str | None = None) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(32, 64, generator=gen).to(torch.bfloat16),
               "model.layers.0.block_sparse_moe.gate.weight": torch.randn(experts, 64, generator=gen)}
    for e in range(experts):
        for proj, shape in (("w1", (32, 64)), ("w3", (32, 64)), ("w2", (64, 32))):
            tensors[f"model.layers.0.block_sparse_moe.experts.{e}.{proj}.weight"] = torch.randn(*shape, generator=gen)
    tensors.pop(skip, None)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    write_weights(directory, tensors, shards)
    return directory


def test_mixtral_names_are_discovered_across_shards(tmp_path: Path) -> None:
    with open_checkpoint(_mixtral(tmp_path / "mixtral", 4, shards=3)) as checkpoint:
        assert checkpoint.format == "bf16"
        assert checkpoint.moe_layers() == ["model.layers.0.block_sparse_moe.experts"]
        experts = checkpoint.read_expert_tensors("model.layers.0.block_sparse_moe.experts")
        assert sorted(experts) == sorted(f"{e}.{p}.weight" for e in range(4) for p in ("w1", "w3", "w2"))


def test_a_missing_expert_projection_is_named(tmp_path: Path) -> None:
    path = _mixtral(tmp_path / "gap", 3, skip="model.layers.0.block_sparse_moe.experts.1.w3.weight")
    with pytest.raises(CheckpointInvalid, match=r"experts\.1\.w3: projection missing"):
        open_checkpoint(path)


@pytest.mark.parametrize("recipe", list(TOOLS))
@pytest.mark.parametrize("shards", [1, 3])
def test_quantized_checkpoint_reopens_as_the_tool_format_with_the_tool_expert_bytes(
        testdata: Path, tmp_path: Path, recipe: str, shards: int) -> None:
    tool_dir, fmt = TOOLS[recipe]
    source = testdata / "qwen3moe_bf16" if shards == 1 else sharded_copy(testdata / "qwen3moe_bf16",
                                                                           tmp_path / "sharded", shards)
    out = tmp_path / "out"
    summary = write_quantized_checkpoint(source, out, recipe, testdata / tool_dir)
    assert summary.layers == LAYERS
    tool = load_all(testdata / tool_dir / "model.safetensors")
    bf16 = load_all(testdata / "qwen3moe_bf16" / "model.safetensors")
    with open_checkpoint(out) as written, open_checkpoint(testdata / tool_dir) as reference:
        assert written.format == fmt and written.moe_layers() == LAYERS
        for prefix in LAYERS:
            names = written.layer(prefix).tensor_names
            assert sorted(names) == sorted(reference.layer(prefix).tensor_names)
            for name in names:
                got, want = written.read_tensor(name), tool[name]
                assert got.dtype == want.dtype and got.shape == want.shape, name
                assert torch.equal(_bytes(got), _bytes(want)), name
            ours = prepare(written.read_layer(prefix), "flashinfer_trtllm")
            theirs = prepare(reference.read_layer(prefix), "flashinfer_trtllm")
            assert all(torch.equal(_bytes(ours.tensors[n]), _bytes(theirs.tensors[n])) for n in theirs.tensors)
        for name in written.other_tensor_names():
            assert torch.equal(_bytes(written.read_tensor(name)), _bytes(bf16[name])), name
        assert len(written.other_tensor_names()) + 2 * 8 * 3 == len(bf16)
        assert written.quant.excludes("model.layers.1.self_attn.o_proj") and written.quant.excludes("lm_head")
        assert written.quant.excludes("model.layers.0.mlp.gate")
        assert not written.quant.excludes("model.layers.0.mlp.experts.3.down_proj")
    assert (out / "tokenizer.json").read_bytes() == (testdata / "qwen3moe_bf16" / "tokenizer.json").read_bytes()
    assert (out / "model.safetensors.index.json").is_file() == (shards > 1)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == ("modelopt" if recipe == "modelopt" else fmt)
    assert "model.layers.0.self_attn.q_proj" in config["quantization_config"]["ignore"]


def test_calibration_file_gives_the_activation_scales(testdata: Path, tmp_path: Path) -> None:
    tool = load_all(testdata / "qwen3moe_ct_nvfp4" / "model.safetensors")
    calibration = {name: value for name, value in tool.items() if name.endswith(".input_global_scale")}
    save_file(calibration, tmp_path / "calibration.safetensors")
    assert load_activation_scales(tmp_path / "calibration.safetensors").keys() == calibration.keys()
    out = tmp_path / "out"
    write_quantized_checkpoint(testdata / "qwen3moe_bf16", out, "llm-compressor", tmp_path / "calibration.safetensors")
    written = load_all(out / "model.safetensors")
    for name, want in tool.items():
        if ".mlp.experts." in name:
            assert torch.equal(_bytes(written[name]), _bytes(want)), name


def test_quantizing_refuses_bad_sources_and_missing_scales(testdata: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointInvalid, match="expected an unquantized"):
        write_quantized_checkpoint(testdata / "qwen3moe_ct_nvfp4", tmp_path / "a", "modelopt",
                                   testdata / "qwen3moe_modelopt_nvfp4")
    with pytest.raises(CheckpointInvalid, match="holds no activation scales"):
        write_quantized_checkpoint(testdata / "qwen3moe_bf16", tmp_path / "b", "modelopt", testdata / "qwen3moe_bf16")
    scales = load_activation_scales(testdata / "qwen3moe_modelopt_nvfp4")
    del scales["model.layers.1.mlp.experts.5.down_proj.input_scale"]
    with pytest.raises(PrepError) as caught:
        write_quantized_checkpoint(testdata / "qwen3moe_bf16", tmp_path / "c", "modelopt", scales)
    assert caught.value.field == "model.layers.1.mlp.experts.5.down_proj.input_scale"
    assert not (tmp_path / "c").exists()
    with pytest.raises(PrepError) as caught:
        write_quantized_checkpoint(testdata / "qwen3moe_bf16", tmp_path / "d", "awq", scales)
    assert caught.value.field == "recipe"
