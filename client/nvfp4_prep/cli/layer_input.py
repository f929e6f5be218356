"""Which layer ``nvfp4-prep layer INPUT`` prepares: a stacked file, a per-expert file, or one layer of a checkpoint.

* a safetensors file holding one stacked layer (``w13_weight``, ... optionally under a prefix), sent as it is;
* a safetensors file holding one layer's per-expert tensors (``<prefix>.<e>.gate_proj.weight`` ... or
  ``w1/w3/w2``, ModelOpt or compressed-tensors names), stacked here by ``pipeline.assemble_layer``;
* a checkpoint (a directory, its index, or a ``.safetensors`` file with a ``config.json`` or
  ``hf_quant_config.json`` beside it), whose layer ``--layer-prefix`` names is read as ``prepare`` reads it.

A checkpoint needs ``--layer-prefix``: one layer of a model is rarely what a newcomer wants, so without it
(or with one the checkpoint lacks) the error lists the layers and points to ``nvfp4-prep prepare``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from nvfp4_prep.contract.expert_keys import parse_expert_key

_LAYER_MARKER = "w13_weight"
# Most layers an error lists.
_SHOWN_LAYERS = 8


class LayerInputError(ValueError):
    """INPUT holds no layer that can be used as asked; the message is the one line the user sees."""


def read_layer_input(path: Path, layer_prefix: str | None, activation: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(prefix, stacked tensors without the prefix) of the layer of ``path`` that ``layer_prefix`` names.

    Raises LayerInputError for a layer that is not there or not named, CheckpointError for an unusable
    checkpoint, PrepError for per-expert tensors that do not stack, OSError/SafetensorError for a file that
    does not read.
    """
    if is_checkpoint(path):
        return _checkpoint_layer(path, layer_prefix, activation)
    return _file_layer(path, layer_prefix, activation)


def is_checkpoint(path: Path) -> bool:
    """A directory, a safetensors index, or a ``.safetensors`` file beside a Hugging Face config."""
    from nvfp4_prep.checkpoint.checkpoint import CONFIG_FILES

    if path.is_dir() or path.name.endswith(".safetensors.index.json"):
        return True
    return any((path.parent / name).is_file() for name in CONFIG_FILES)


def stacked_prefixes(names: list[str]) -> list[str]:
    """Prefixes of the stacked layers among ``names`` ("" for unprefixed names)."""
    return sorted({name[: -len(_LAYER_MARKER)].rstrip(".") for name in names
                   if name == _LAYER_MARKER or name.endswith("." + _LAYER_MARKER)})


def expert_split(name: str) -> tuple[str, str] | None:
    """(experts prefix, ``<e>.<proj>.<leaf>``) of a per-expert tensor name, or None for any other name."""
    parts = name.rsplit(".", 3)
    prefix, key = (parts[0], ".".join(parts[1:])) if len(parts) == 4 else ("", name)
    return (prefix, key) if parse_expert_key(key) is not None else None


def _file_layer(path: Path, layer_prefix: str | None, activation: str) -> tuple[str, dict[str, torch.Tensor]]:
    from nvfp4_prep.pipeline import assemble_layer

    with safe_open(str(path), framework="pt") as handle:
        names = list(handle.keys())
        stacked = stacked_prefixes(names)
        experts = {name: split for name in names if (split := expert_split(name)) is not None}
        found = sorted(set(stacked) | {prefix for prefix, _ in experts.values()})
        if layer_prefix is None:
            if len(found) != 1:
                raise LayerInputError(f"{path}: holds {len(found)} layers {found} (expected one stacked or "
                                      "per-expert layer, or name it with --layer-prefix)")
            layer_prefix = found[0]
        elif layer_prefix not in found:
            raise LayerInputError(f"--layer-prefix: {layer_prefix!r} is not a layer in {path} (it holds {found})")
        if layer_prefix in stacked:
            lead = f"{layer_prefix}." if layer_prefix else ""
            return layer_prefix, {name[len(lead):]: handle.get_tensor(name) for name in names
                                  if name.startswith(lead) and "." not in name[len(lead):]}
        per_expert = {key: handle.get_tensor(name) for name, (prefix, key) in experts.items()
                      if prefix == layer_prefix}
    return layer_prefix, assemble_layer(per_expert, activation=activation)


def _checkpoint_layer(path: Path, layer_prefix: str | None,
                      activation: str) -> tuple[str, dict[str, torch.Tensor]]:
    from nvfp4_prep.checkpoint import open_checkpoint

    with open_checkpoint(path) as checkpoint:
        layers = checkpoint.moe_layers()
        if layer_prefix is None or layer_prefix not in layers:
            raise LayerInputError(_checkpoint_hint(path, layers, layer_prefix))
        return layer_prefix, checkpoint.read_layer(layer_prefix, activation=activation)


def _checkpoint_hint(path: Path, layers: list[str], layer_prefix: str | None) -> str:
    """The one line for a checkpoint given without a layer it has: its layers, --layer-prefix, and prepare."""
    if not layers:
        return f"{path}: a checkpoint without NVFP4 MoE layers (nothing to prepare)"
    listed = ", ".join(layers[:_SHOWN_LAYERS]) + (f", ... ({len(layers)} in all)" if len(layers) > _SHOWN_LAYERS
                                                  else "")
    what = f"{path} is a checkpoint" if layer_prefix is None else \
        f"--layer-prefix: {layer_prefix!r} is not an NVFP4 MoE layer of the checkpoint {path}"
    return (f"{what}; its MoE layers: {listed}. Name one with --layer-prefix, or prepare the whole checkpoint "
            f"with: nvfp4-prep prepare {path}")
