"""An opened NVFP4 checkpoint: its format, shards, MoE layers and tensors.

``open_checkpoint`` accepts a directory (or the path of its ``model.safetensors`` or
``model.safetensors.index.json``), as a path or ``file://`` URI. With
``allowed_roots`` every file it reads (configs, index, shards) must resolve
inside a root. All shard headers are parsed and checked when the checkpoint is
opened; tensor bytes are read later, through memory maps, only when asked for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from .discovery import MoeLayer, discover_moe_layers
from .errors import CheckpointInvalid, CheckpointNotFound
from .formats import QuantFormat, detect_format
from .location import PathLike, check_under_roots, resolve_in_roots, resolve_roots, shard_path
from .safetensors_file import SafetensorsFile, TensorEntry

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_FILES = ("config.json", "hf_quant_config.json")
# Files next to the weights that a prepared checkpoint does not carry over.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def _weight_map_from_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointInvalid(f"{index_path}: not valid JSON ({exc}); expected a safetensors index") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointInvalid(f"{index_path}: weight_map is missing or not an object of tensor name -> shard file")
    return weight_map


class Checkpoint:
    """Read access to one checkpoint; tensors come back as views of mapped shard files."""

    def __init__(self, directory: Path, quant: QuantFormat, shards: dict[str, SafetensorsFile],
                 weight_map: dict[str, str]) -> None:
        self.directory = directory
        self.quant = quant
        self._shards = shards
        self._weight_map = weight_map
        self._layers = {layer.prefix: layer for layer in discover_moe_layers(weight_map, quant)}
        expert_names = {name for layer in self._layers.values() for name in layer.tensor_names}
        self._other_names = sorted(name for name in weight_map if name not in expert_names)

    @property
    def format(self) -> str:
        """"modelopt" or "compressed-tensors"."""
        return self.quant.name

    def moe_layers(self) -> list[str]:
        """Experts prefixes of every NVFP4 MoE layer, sorted by layer number."""
        return list(self._layers)

    def layer(self, prefix: str) -> MoeLayer:
        try:
            return self._layers[prefix]
        except KeyError:
            known = ", ".join(self._layers) or "none"
            raise CheckpointNotFound(
                f"{self.directory}: no NVFP4 MoE layer with experts prefix {prefix!r} (layers: {known})") from None

    def tensor_names(self) -> list[str]:
        return list(self._weight_map)

    def other_tensor_names(self) -> list[str]:
        """Every tensor that is not part of an NVFP4 MoE layer: it is carried over unchanged."""
        return list(self._other_names)

    def shard_of(self, name: str) -> SafetensorsFile:
        try:
            return self._shards[self._weight_map[name]]
        except KeyError:
            raise CheckpointNotFound(f"{self.directory}: no tensor named {name!r}") from None

    def entry(self, name: str) -> TensorEntry:
        """dtype, shape and byte range of a tensor."""
        return self.shard_of(name).entry(name)

    def read_tensor(self, name: str) -> torch.Tensor:
        return self.shard_of(name).tensor(name)

    def read_raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes, flat uint8, as stored (for carrying a tensor over unchanged)."""
        return self.shard_of(name).raw(name)

    def read_expert_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Per-expert tensors of a layer, keyed relative to the prefix (``"3.w1.weight_packed"``)."""
        layer = self.layer(prefix)
        by_shard: dict[str, list[TensorEntry]] = {}
        for name in layer.tensor_names:
            by_shard.setdefault(self._weight_map[name], []).append(self.entry(name))
        for shard, entries in by_shard.items():
            self._shards[shard].will_need(min(e.start for e in entries), max(e.end for e in entries))
        start = len(prefix) + 1
        return {name[start:]: self.read_tensor(name) for name in layer.tensor_names}

    def read_layer(self, prefix: str, activation: str = "swiglu", pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """The stacked form of a layer (SPEC section 2), ready for ``prepare``.

        The per-expert tensors are views of the mapped shards; ``assemble_layer``
        copies them once into the stacked tensors. With ``pin_memory`` and CUDA
        available the stacked tensors are then page-locked for fast upload (one
        more copy, of this layer only).
        """
        from nvfp4_prep.pipeline import PrepError, assemble_layer

        try:
            stacked = assemble_layer(self.read_expert_tensors(prefix), activation=activation)
        except PrepError as exc:
            raise CheckpointInvalid(f"{prefix}: {exc}") from None
        if pin_memory and torch.cuda.is_available():
            stacked = {name: tensor.pin_memory() for name, tensor in stacked.items()}
        return stacked

    def shard_files(self, prefix: str | None = None) -> list[SafetensorsFile]:
        """The shards holding a layer's tensors, or every shard."""
        if prefix is None:
            return [self._shards[name] for name in sorted(self._shards)]
        names = {self._weight_map[name] for name in self.layer(prefix).tensor_names}
        return [self._shards[name] for name in sorted(names)]

    def source_identity(self, prefix: str | None = None) -> str:
        """Path, size and mtime of each shard holding the layer (or the whole checkpoint), for cache keys."""
        return ";".join(f"{shard.path}:{shard.size}:{shard.mtime_ns}" for shard in self.shard_files(prefix))

    def auxiliary_files(self) -> list[Path]:
        """Config, tokenizer and other non-weight files at the top of the checkpoint directory."""
        return sorted(
            path for path in self.directory.iterdir()
            if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and not path.name.endswith(".index.json"))

    def close(self) -> None:
        """Lets go of the shard mappings (each is unmapped once no tensor view uses it)."""
        for shard in self._shards.values():
            shard.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _weights_file(real: Path) -> tuple[Path, Path]:
    """(checkpoint directory, index or single safetensors file) for a resolved location."""
    if real.is_file():
        if real.name.endswith(".safetensors.index.json") or real.name.endswith(".safetensors"):
            return real.parent, real
        raise CheckpointInvalid(
            f"{real}: expected a checkpoint directory, a .safetensors file or a .safetensors.index.json")
    for name in (INDEX_NAME, SINGLE_NAME):
        if (real / name).exists():
            return real, real / name
    indexes = sorted(real.glob("*.safetensors.index.json"))
    singles = sorted(real.glob("*.safetensors"))
    if len(indexes) == 1:
        return real, indexes[0]
    if not indexes and len(singles) == 1:
        return real, singles[0]
    raise CheckpointNotFound(f"{real}: no {SINGLE_NAME} or {INDEX_NAME} in the checkpoint directory")


def open_checkpoint(location: PathLike, allowed_roots: Sequence[PathLike] | None = None) -> Checkpoint:
    """Opens, resolves and validates a checkpoint; see the module docstring."""
    roots = resolve_roots(allowed_roots)
    real = resolve_in_roots(location, roots)
    directory, weights = _weights_file(real)
    weights = check_under_roots(weights, roots, "checkpoint file")
    for name in CONFIG_FILES:
        if (directory / name).exists():
            check_under_roots(directory / name, roots, "config file")
    quant = detect_format(directory)

    if weights.name.endswith(".index.json"):
        weight_map = _weight_map_from_index(weights)
        shards = {name: SafetensorsFile(shard_path(directory, name, roots))
                  for name in sorted(set(weight_map.values()))}
        for tensor, shard in weight_map.items():
            if tensor not in shards[shard].entries:
                raise CheckpointInvalid(
                    f"{weights}: weight_map puts tensor {tensor!r} in {shard}, whose header does not list it")
    else:
        shard = SafetensorsFile(weights)
        shards = {weights.name: shard}
        weight_map = {tensor: weights.name for tensor in shard.entries}
    checkpoint = Checkpoint(directory, quant, shards, weight_map)
    log.debug("opened %s checkpoint %s: %d shards, %d MoE layers",
             checkpoint.format, directory, len(shards), len(checkpoint.moe_layers()))
    return checkpoint
