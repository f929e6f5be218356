"""A plain quantized checkpoint from a BF16 one: MoE experts quantized by a recipe, everything else copied.

The output is a ModelOpt (``recipe="modelopt"``: ``hf_quant_config.json`` plus ``config.json``
``quantization_config``) or compressed-tensors (``recipe="llm-compressor"``, ``nvfp4-pack-quantized``)
checkpoint that engines load as such. Only the experts are quantized, so the configs list every other
linear module (attention, routers, shared experts, dense MLPs, ``lm_head``) as excluded, the way each tool
lists what it leaves alone; the expert tensors are byte for byte what the tool would store (see
``nvfp4_prep.pipeline.quantize``). Shards keep the source's names and contents, each written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvfp4_prep.checkpoint import Checkpoint, CheckpointInvalid, open_checkpoint
from nvfp4_prep.checkpoint.formats import BF16, CONFIG, HF_QUANT_CONFIG
from nvfp4_prep.contract.dtypes import dtype_by_torch
from nvfp4_prep.pipeline import PrepError
from nvfp4_prep.pipeline.quantize import LLM_COMPRESSOR, MODELOPT, RECIPES, quantized_expert_tensors

from .activation_scales import layer_scales, load_activation_scales
from .atomic_file import write_bytes_atomic
from .safetensors_writer import OutputTensor, write_safetensors

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
# What each tool's configs say about the scheme (ModelOpt 0.47 NVFP4_DEFAULT_CFG; compressed-tensors 0.19's NVFP4).
_MODELOPT_ARGS = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
_CT_ARGS = {"actorder": None, "block_structure": None, "group_size": 16, "num_bits": 4, "observer_kwargs": {},
            "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True, "type": "float",
            "zp_dtype": None}
_CT_WEIGHTS = {**_CT_ARGS, "dynamic": False, "observer": "memoryless_minmax"}
_CT_INPUTS = {**_CT_ARGS, "dynamic": "local", "observer": "static_minmax"}
# ModelOpt's configs name their producer; this one says who wrote it and whose bytes it reproduces. (A
# compressed-tensors config has no such field, and its parser may come to forbid unknown ones.)
MODELOPT_PRODUCER = {"name": "nvfp4-prep", "recipe": "modelopt 0.47.0 NVFP4_DEFAULT_CFG"}


@dataclass
class QuantizedSummary:
    """What was written: the output directory, the quantized layers and the modules left unquantized."""

    out_dir: Path
    layers: list[str]
    excluded: list[str] = field(default_factory=list)


def excluded_modules(checkpoint: Checkpoint, recipe: str) -> list[str]:
    """Every linear module the output leaves unquantized: the owners of the 2-D ``.weight`` tensors outside the
    MoE experts. ModelOpt lists embeddings too; compressed-tensors targets ``Linear`` only, so it does not."""
    modules = set()
    for name in checkpoint.other_tensor_names():
        if name.endswith(".weight") and len(checkpoint.entry(name).shape) == 2:
            module = name.removesuffix(".weight")
            if recipe == LLM_COMPRESSOR and module.rsplit(".", 1)[-1] in ("embed_tokens", "wte", "embeddings"):
                continue
            modules.add(module)
    return sorted(modules)


def quantization_configs(recipe: str, excluded: list[str]) -> dict[str, dict]:
    """``config.json``'s ``quantization_config`` and, for ModelOpt, ``hf_quant_config.json``."""
    if recipe == MODELOPT:
        producer = dict(MODELOPT_PRODUCER)
        return {
            CONFIG: {"config_groups": {"group_0": {"input_activations": dict(_MODELOPT_ARGS),
                                                   "weights": dict(_MODELOPT_ARGS), "targets": ["Linear"]}},
                     "ignore": excluded, "quant_algo": "NVFP4", "producer": producer, "quant_method": "modelopt"},
            HF_QUANT_CONFIG: {"producer": producer,
                              "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                                               "exclude_modules": excluded}},
        }
    return {CONFIG: {
        "config_groups": {"group_0": {"format": "nvfp4-pack-quantized", "input_activations": dict(_CT_INPUTS),
                                      "output_activations": None, "targets": ["Linear"], "weights": dict(_CT_WEIGHTS)}},
        "format": "nvfp4-pack-quantized", "global_compression_ratio": None, "ignore": excluded,
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": "0.19.0"}}


def _as_output(name: str, tensor: torch.Tensor) -> OutputTensor:
    row = dtype_by_torch(tensor.dtype)
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return OutputTensor(name, row.safetensors, tuple(tensor.shape), data)


def _quantized_layer(checkpoint: Checkpoint, prefix: str, recipe: str, scales: Mapping[str, torch.Tensor],
                     device: torch.device) -> dict[str, torch.Tensor]:
    weights = {key: value.to(device) for key, value in checkpoint.read_expert_tensors(prefix).items()}
    try:
        quantized = quantized_expert_tensors(weights, recipe, layer_scales(scales, prefix))
    except PrepError as exc:
        raise PrepError(f"{prefix}.{exc.field}", exc.problem, exc.expected) from None
    return {f"{prefix}.{key}": value for key, value in quantized.items()}


def write_quantized_checkpoint(
    source: str | os.PathLike | Checkpoint,
    out_dir: str | os.PathLike,
    recipe: str,
    activation_scales: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
) -> QuantizedSummary:
    """Quantize the BF16 checkpoint ``source`` into ``out_dir`` (created; must not be the source).

    ``activation_scales``: an NVFP4 checkpoint of the same model, a calibration ``.safetensors`` file, or
    the scales themselves by full tensor name (``<module>.input_scale`` or ``<module>.input_global_scale``).
    PrepError (field named with its layer prefix) for missing scales or unquantizable weights;
    CheckpointInvalid for a source that is not BF16.
    """
    if recipe not in RECIPES:
        raise PrepError("recipe", f"is {recipe!r}", "one of " + ", ".join(repr(r) for r in RECIPES))
    checkpoint = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    try:
        return _write(checkpoint, Path(out_dir), recipe, activation_scales, torch.device(device))
    finally:
        if checkpoint is not source:
            checkpoint.close()


def _write(checkpoint: Checkpoint, out: Path, recipe: str,
           activation_scales: str | os.PathLike | Mapping[str, torch.Tensor], device: torch.device
           ) -> QuantizedSummary:
    if checkpoint.format != BF16:
        raise CheckpointInvalid(f"{checkpoint.directory}: is a {checkpoint.format} checkpoint; expected an "
                                "unquantized (BF16, FP16 or FP32) checkpoint to quantize")
    if out.resolve() == checkpoint.directory.resolve():
        raise CheckpointInvalid(f"{out}: is the source checkpoint; expected another output directory")
    scales = activation_scales if isinstance(activation_scales, Mapping) else load_activation_scales(activation_scales)
    layers = checkpoint.moe_layers()
    # Quantize every layer before writing anything, so that bad input leaves no partial output.
    quantized: dict[str, dict[str, torch.Tensor]] = {
        prefix: _quantized_layer(checkpoint, prefix, recipe, scales, device) for prefix in layers}
    excluded = excluded_modules(checkpoint, recipe)
    out.mkdir(parents=True, exist_ok=True)

    weight_map: dict[str, str] = {}
    layer_of = {name: prefix for prefix in layers for name in checkpoint.layer(prefix).tensor_names}
    for shard in checkpoint.shard_files():
        tensors: list[OutputTensor] = []
        for name in sorted(shard.entries):
            prefix = layer_of.get(name)
            if prefix is None:
                entry = checkpoint.entry(name)
                tensors.append(OutputTensor(name, entry.dtype, entry.shape, checkpoint.read_raw(name)))
                weight_map[name] = shard.path.name
                continue
            module = name.removesuffix(".weight")
            for out_name, tensor in quantized[prefix].items():
                if out_name.rsplit(".", 1)[0] == module:
                    tensors.append(_as_output(out_name, tensor))
                    weight_map[out_name] = shard.path.name
        write_safetensors(out / shard.path.name, tensors, {"format": "pt"})
    if (checkpoint.directory / INDEX_NAME).is_file():
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        write_bytes_atomic(out / INDEX_NAME, json.dumps(index, indent=2).encode())
    _write_configs(checkpoint, out, recipe, excluded)
    log.info("wrote %s checkpoint %s: %d MoE layers quantized, %d modules excluded", recipe, out, len(layers),
             len(excluded))
    return QuantizedSummary(out, layers, excluded)


def _write_configs(checkpoint: Checkpoint, out: Path, recipe: str, excluded: list[str]) -> None:
    configs = quantization_configs(recipe, excluded)
    for path in checkpoint.auxiliary_files():
        if path.name == CONFIG:
            config = json.loads(path.read_text(encoding="utf-8"))
            config["quantization_config"] = configs[CONFIG]
            write_bytes_atomic(out / CONFIG, (json.dumps(config, indent=2) + "\n").encode())
        elif path.name != HF_QUANT_CONFIG:
            write_bytes_atomic(out / path.name, path.read_bytes())
    if HF_QUANT_CONFIG in configs:
        write_bytes_atomic(out / HF_QUANT_CONFIG, (json.dumps(configs[HF_QUANT_CONFIG], indent=4) + "\n").encode())
