"""Small NVFP4 checkpoints written with the safetensors library, for the checkpoint tests.

Independent of nvfp4_prep's own reader and writer: files are written by
``safetensors.torch.save_file`` so the reader is tested against the real format.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nvfp4_prep.prepared.manifest import MANIFEST_NAME

# The real checkpoints in shared/testdata, by format (conftest's ``shared`` fixture maps them).
SHARED_NAMES = {"compressed-tensors": "qwen3moe_ct_nvfp4", "modelopt": "qwen3moe_modelopt_nvfp4"}
FORMATS = tuple(sorted(SHARED_NAMES))

NAMING = {"qwen": ("mlp", ("gate_proj", "up_proj", "down_proj")),
          "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}
SUFFIXES = {"modelopt": ("weight", "weight_scale", "weight_scale_2", "input_scale"),
            "compressed-tensors": ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")}



def nvfp4_projection(out_features: int, in_features: int, fmt: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One NVFP4 linear in ``fmt``'s names: random codes and block scales, positive global scales."""
    weight, block, global_scale, input_scale = SUFFIXES[fmt]
    scalar_shape = () if fmt == "modelopt" else (1,)
    return {
        weight: torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8, generator=gen),
        block: torch.randint(0, 0x7F, (out_features, in_features // 16), dtype=torch.uint8,
                             generator=gen).view(torch.float8_e4m3fn),
        global_scale: (torch.rand(scalar_shape, generator=gen) + 0.5).to(torch.float32),
        input_scale: (torch.rand(scalar_shape, generator=gen) + 0.5).to(torch.float32),
    }


def moe_layer_tensors(layer: int, experts: int, hidden: int, inter: int, fmt: str = "modelopt",
                      naming: str = "qwen", seed: int = 0) -> dict[str, torch.Tensor]:
    """Every expert tensor of one MoE layer, full names, plus a bf16 router."""
    gen = torch.Generator().manual_seed(seed * 1000 + layer)
    block, (gate, up, down) = NAMING[naming]
    out = {f"model.layers.{layer}.{block}.gate.weight":
           torch.randn(experts, hidden, dtype=torch.bfloat16, generator=gen)}
    for e in range(experts):
        for proj, shape in ((gate, (inter, hidden)), (up, (inter, hidden)), (down, (hidden, inter))):
            for suffix, tensor in nvfp4_projection(*shape, fmt, gen).items():
                out[f"model.layers.{layer}.{block}.experts.{e}.{proj}.{suffix}"] = tensor
    return out


def dense_tensors(hidden: int, vocab: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(vocab, hidden, dtype=torch.bfloat16, generator=gen),
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            "lm_head.weight": torch.randn(vocab, hidden, dtype=torch.bfloat16, generator=gen)}


def quant_config(fmt: str, ignore: list[str]) -> dict:
    if fmt == "modelopt":
        return {"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": ignore}
    return {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "ignore": ignore,
            "config_groups": {"group_0": {"format": "nvfp4-pack-quantized", "targets": ["Linear"]}}}


def moe_checkpoint(directory: Path, layers: int, experts: int, hidden: int, inter: int, fmt: str = "modelopt",
                   seed: int = 0, dense: bool = False) -> Path:
    """A checkpoint of ``layers`` MoE layers of the same sizes (and, with ``dense``, the dense tensors)."""
    tensors = dense_tensors(hidden) if dense else {}
    for layer in range(layers):
        tensors.update(moe_layer_tensors(layer, experts, hidden, inter, fmt=fmt, seed=seed))
    return write_checkpoint(directory, tensors, fmt=fmt)


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], fmt: str = "modelopt",
                     shards: int = 1, ignore: list[str] | None = None) -> Path:
    """A checkpoint directory: config.json, a tokenizer stub, one file or ``shards`` files and an index."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["SyntheticMoe"], "model_type": "synthetic_moe",
              "quantization_config": quant_config(fmt, ignore or [])}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    if fmt == "modelopt":
        (directory / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt"},
             "quantization": {"quant_algo": "NVFP4", "exclude_modules": ignore or []}}))
    write_weights(directory, tensors, shards)
    return directory


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """``model.safetensors``, or ``shards`` files of round-robin tensors with an index."""
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name].contiguous() for name in names[i::shards]}
        save_file(part, directory / filename, metadata={"format": "pt"})
        weight_map.update({name: filename for name in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def load_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def sharded_copy(source: Path, target: Path, shards: int) -> Path:
    """A copy of a single-file checkpoint split into ``shards`` files with an index."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, target / path.name)
    write_weights(target, load_all(source / "model.safetensors"), shards)
    return target


def kill_after_shards(child: subprocess.Popen, out: Path, shards: int, timeout: float, what: str) -> None:
    """SIGKILLs ``child`` once its manifest in ``out`` lists ``shards`` shards; fails if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        try:
            if len(json.loads((out / MANIFEST_NAME).read_text())["shards"]) >= shards:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert child.poll() is None, f"{what} finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
