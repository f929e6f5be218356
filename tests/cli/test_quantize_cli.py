"""`nvfp4-prep prepare --quantize` and `nvfp4-prep quantize` through the real console script, on the shared BF16
model: the prepared folder holds what preparing the tool's checkpoint gives, the quantized checkpoint the tool's
own expert bytes; errors are one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvfp4_prep.prepared.manifest import Manifest
from tests.helpers.checkpoint_factory import load_all

SCRIPT = Path(sys.executable).with_name("nvfp4-prep")
LAYERS = ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")

pytestmark = pytest.mark.skipif(not SCRIPT.exists() and shutil.which("nvfp4-prep") is None,
                                reason="the nvfp4-prep console script is not installed in this environment")


def _run(*argv: object) -> subprocess.CompletedProcess:
    script = str(SCRIPT) if SCRIPT.exists() else str(shutil.which("nvfp4-prep"))
    return subprocess.run([script, *map(str, argv)], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def _folder(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_all(path))
    return tensors


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _is_expert(name: str) -> bool:
    return name.startswith(LAYERS)


@pytest.fixture(scope="module")
def modelopt_prepared(testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`prepare` of the ModelOpt checkpoint: what preparing the tool's checkpoint gives."""
    out = tmp_path_factory.mktemp("modelopt") / "prepared"
    result = _run("prepare", testdata / "qwen3moe_modelopt_nvfp4", "--backend", "flashinfer_trtllm", "--out", out,
                  "--quiet")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("where", ["in_process", "server"])
def test_prepare_quantize_gives_the_tool_checkpoints_prepared_experts(testdata: Path, tmp_path: Path,
                                                                      modelopt_prepared: Path, where: str,
                                                                      request: pytest.FixtureRequest) -> None:
    source = testdata / "qwen3moe_bf16"
    out = tmp_path / "prepared"
    server = ["--server", request.getfixturevalue("prep_address")] if where == "server" else []
    result = _run("prepare", source, "--quantize", "modelopt", "--activation-scales",
                  testdata / "qwen3moe_modelopt_nvfp4", "--backend", "flashinfer_trtllm", "--out", out, "--quiet",
                  *server)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"next: nvfp4-prep verify {out}"
    got, want = _folder(out), _folder(modelopt_prepared)
    experts = sorted(name for name in want if _is_expert(name))
    assert experts and sorted(name for name in got if _is_expert(name)) == experts
    for name in experts:
        assert got[name].dtype == want[name].dtype and torch.equal(_bytes(got[name]), _bytes(want[name])), name
    bf16 = load_all(source / "model.safetensors")
    carried = sorted(name for name in got if not _is_expert(name))
    assert carried == sorted(name for name in bf16 if not _is_expert(name))
    for name in carried:  # the non-MoE tensors stay as the BF16 source has them
        assert got[name].dtype == bf16[name].dtype and torch.equal(_bytes(got[name]), _bytes(bf16[name])), name
    manifest = Manifest.load(out)
    assert manifest.source["format"] == "bf16"
    for prefix in LAYERS:
        layer = manifest.layer_layout(prefix)
        assert (layer["quantize_recipe"], layer["quantized_from"]) == ("modelopt", "bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "nvfp4_prep"
    assert "original_quantization_config" not in config["quantization_config"]
    assert config["quantization_config"]["layout_id"] == Manifest.load(modelopt_prepared).layout["layout_id"]


def test_quantize_writes_the_tool_checkpoints_expert_tensors(testdata: Path, tmp_path: Path) -> None:
    out = tmp_path / "quantized"
    result = _run("quantize", testdata / "qwen3moe_bf16", "--recipe", "llm-compressor", "--activation-scales",
                  testdata / "qwen3moe_ct_nvfp4", "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{out}: llm-compressor checkpoint, 2 MoE layers quantized, 11 modules left " \
                                    "unquantized"
    got, tool = _folder(out), load_all(testdata / "qwen3moe_ct_nvfp4" / "model.safetensors")
    experts = sorted(name for name in tool if _is_expert(name))
    assert len(experts) == 2 * 8 * 3 * 4
    for name in experts:
        assert got[name].dtype == tool[name].dtype and got[name].shape == tool[name].shape, name
        assert torch.equal(_bytes(got[name]), _bytes(tool[name])), name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_errors_are_single_lines(testdata: Path, tmp_path: Path) -> None:
    bf16, modelopt = testdata / "qwen3moe_bf16", testdata / "qwen3moe_modelopt_nvfp4"
    cases = [
        (("prepare", bf16, "--out", tmp_path / "a"), "nvfp4-prep prepare: ", "--quantize"),
        (("prepare", bf16, "--quantize", "modelopt", "--out", tmp_path / "b"), "nvfp4-prep prepare: ",
         "--activation-scales: missing"),
        (("prepare", bf16, "--quantize", "modelopt", "--activation-scales", bf16, "--out", tmp_path / "c"),
         "nvfp4-prep prepare: ", "holds no activation scales"),
        (("prepare", modelopt, "--quantize", "modelopt", "--activation-scales", modelopt, "--out", tmp_path / "d"),
         "nvfp4-prep prepare: ", "NVFP4 already"),
        (("quantize", modelopt, "--recipe", "modelopt", "--activation-scales", modelopt, "--out", tmp_path / "e"),
         "nvfp4-prep quantize: ", "expected an unquantized"),
        (("quantize", bf16, "--recipe", "modelopt", "--activation-scales", tmp_path / "none", "--out",
          tmp_path / "f"), "nvfp4-prep quantize: ", "no such activation-scale source"),
    ]
    for argv, start, says in cases:
        result = _run(*argv)
        assert result.returncode == 2, (argv, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start) and says in lines[0], (argv, result.stderr)
    for name in "abcdef":  # refused before anything was written
        assert not (tmp_path / name).exists(), name


def test_a_rerun_with_another_recipe_is_not_taken_for_a_resume(testdata: Path, tmp_path: Path) -> None:
    """Layers of another recipe hold other bytes: the manifest records the recipe, and a run with another one
    into the same folder is refused unless --overwrite, then rewrites every layer with the new recipe."""
    out = tmp_path / "prepared"
    common = ("prepare", testdata / "qwen3moe_bf16", "--backend", "flashinfer_cutlass", "--out", out, "--quiet")
    first = _run(*common, "--quantize", "modelopt", "--activation-scales", testdata / "qwen3moe_modelopt_nvfp4")
    assert first.returncode == 0, first.stderr
    assert Manifest.load(out).layout["quantize_recipe"] == "modelopt"
    again = _run(*common, "--quantize", "llm-compressor", "--activation-scales", testdata / "qwen3moe_ct_nvfp4")
    assert again.returncode == 2 and "--overwrite" in again.stderr, again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    replaced = _run(*common, "--quantize", "llm-compressor", "--activation-scales", testdata / "qwen3moe_ct_nvfp4",
                    "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    manifest = Manifest.load(out)
    assert manifest.layout["quantize_recipe"] == "llm-compressor" and manifest.complete
