"""Activation (input) scales for quantizing a BF16 checkpoint, from where calibration left them.

A source is an NVFP4 checkpoint of the same model (ModelOpt ``<module>.input_scale`` or compressed-tensors
``<module>.input_global_scale``), or a calibration file: one safetensors file of float32 scalars under the
same module names and leaves. The result maps full tensor names to scalars; ``layer_scales`` cuts out one
layer's, keyed relative to its experts prefix as ``quantize_layer`` takes them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from nvfp4_prep.checkpoint import CheckpointInvalid, CheckpointNotFound, open_checkpoint
from nvfp4_prep.checkpoint.activation_scales import INPUT_LEAVES, NO_SCALES_IN_BF16
from nvfp4_prep.checkpoint.formats import BF16
from nvfp4_prep.checkpoint.safetensors_file import SafetensorsFile


def _is_checkpoint(path: Path) -> bool:
    directory = path if path.is_dir() else path.parent
    return (directory / "config.json").is_file() or (directory / "hf_quant_config.json").is_file()


def load_activation_scales(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every input scale ``source`` holds, by full tensor name (see the module docstring)."""
    path = Path(source)
    if not path.exists():
        raise CheckpointNotFound(f"{path}: no such activation-scale source; expected an NVFP4 checkpoint of the "
                                 "same model or a calibration .safetensors file")
    if _is_checkpoint(path):
        with open_checkpoint(path) as checkpoint:
            if checkpoint.format == BF16:
                raise CheckpointInvalid(f"{path}: {NO_SCALES_IN_BF16}")
            names = [name for name in checkpoint.tensor_names() if name.endswith(INPUT_LEAVES)]
            return {name: checkpoint.read_tensor(name) for name in names}
    if path.suffix != ".safetensors" or not path.is_file():
        raise CheckpointInvalid(f"{path}: expected an NVFP4 checkpoint directory or a calibration .safetensors file")
    calibration = SafetensorsFile(path)
    try:
        names = [name for name in calibration.entries if name.endswith(INPUT_LEAVES)]
        if not names:
            raise CheckpointInvalid(f"{path}: no tensor named <module>{INPUT_LEAVES[0]} or "
                                    f"<module>{INPUT_LEAVES[1]}; expected per-module input scales")
        return {name: calibration.tensor(name) for name in names}
    finally:
        calibration.close()


def layer_scales(scales: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The scales under the experts prefix ``prefix``, keyed ``<e>.<proj>.<leaf>``."""
    start = len(prefix) + 1
    return {name[start:]: value for name, value in scales.items() if name.startswith(prefix + ".")}
