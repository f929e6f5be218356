"""An opened NVFP4 checkpoint: its format, shards, MoE layers and tensors.

``open_checkpoint`` accepts a directory (or the path of its ``model.safetensors`` or
``model.safetensors.index.json``), as a path or ``file://`` URI. With
``allowed_roots`` every file it reads (configs, index, shards) must lie inside a
root, reached without a window for a rename to redirect it (``location``). All
shard headers are parsed and checked when the checkpoint is opened, and each
shard stays open by descriptor until ``close``; tensor bytes are read later, from
those descriptors, only when asked for.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .discovery import MoeLayer, discover_moe_layers
from .errors import CheckpointError, CheckpointInvalid, CheckpointNotFound, shown
from .files import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, Identity, identity, parse_json, read_bounded
from .formats import BF16, COMPRESSED_TENSORS, CONFIG, HF_QUANT_CONFIG, QuantFormat, detect_format
from .location import Found, Opened, PathLike, Tree
from .rank_read import RankReads, plan_rank_reads
from .safetensors_file import MAX_HEADER_BYTES, Interrupt, SafetensorsFile, TensorEntry
from .stacked_read import Ready, Scales, read_stacked

if TYPE_CHECKING:
    from nvfp4_prep.pipeline.shard import Shard

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_FILES = (CONFIG, HF_QUANT_CONFIG)
# Files next to the weights that a prepared checkpoint does not carry over.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
# Most layers listed in a "no such layer" message.
SHOWN_LAYERS = 8


class Checkpoint:
    """Read access to one checkpoint; every tensor read comes back in memory of its own."""

    def __init__(self, directory: Path, quant: QuantFormat, shards: dict[str, SafetensorsFile],
                 weight_map: dict[str, str], *, sources: Sequence[tuple[str, Identity]] = ()) -> None:
        """``sources``: (name, identity) of the config and index files that decided how the shards read."""
        self.directory = directory
        self.quant = quant
        self._shards = shards
        self._weight_map = weight_map
        self._sources = tuple(sources)
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
            names = list(self._layers)
            known = ", ".join(names[:SHOWN_LAYERS]) + (f", ... ({len(names)} in all)" if len(names) > SHOWN_LAYERS
                                                       else "")
            raise CheckpointNotFound(f"{shown(self.directory)}: no NVFP4 MoE layer with experts prefix "
                                     f"{shown(prefix)!r} (layers: {shown(known or 'none')})") from None

    def tensor_names(self) -> list[str]:
        return list(self._weight_map)

    def other_tensor_names(self) -> list[str]:
        """Every tensor that is not part of an NVFP4 MoE layer: it is carried over unchanged."""
        return list(self._other_names)

    def shard_of(self, name: str) -> SafetensorsFile:
        try:
            return self._shards[self._weight_map[name]]
        except KeyError:
            raise CheckpointNotFound(f"{shown(self.directory)}: no tensor named {shown(name)!r}") from None

    def entry(self, name: str) -> TensorEntry:
        """dtype, shape and byte range of a tensor."""
        return self.shard_of(name).entry(name)

    def read_tensor(self, name: str, *, interrupt: Interrupt | None = None) -> torch.Tensor:
        return self.shard_of(name).tensor(name, interrupt=interrupt)

    def read_raw(self, name: str, *, interrupt: Interrupt | None = None) -> torch.Tensor:
        """The tensor's bytes, flat uint8, as stored (for carrying a tensor over unchanged)."""
        return self.shard_of(name).raw(name, interrupt=interrupt)

    def read_expert_tensors(self, prefix: str, *, interrupt: Interrupt | None = None) -> dict[str, torch.Tensor]:
        """Per-expert tensors of a layer, keyed relative to the prefix (``"3.w1.weight_packed"``).

        ``interrupt`` is called before every chunk read and may raise to abandon the read (a deadline).
        """
        layer = self.layer(prefix)
        by_shard: dict[str, list[TensorEntry]] = {}
        for name in layer.tensor_names:
            by_shard.setdefault(self._weight_map[name], []).append(self.entry(name))
        for shard, entries in by_shard.items():
            self._shards[shard].will_need(min(e.start for e in entries), max(e.end for e in entries))
        start = len(prefix) + 1
        return {name[start:]: self.read_tensor(name, interrupt=interrupt) for name in layer.tensor_names}

    def rank_reads(self, prefix: str, shard: Shard) -> RankReads:
        """What ``read_layer(prefix, shard=shard)`` reads, from the headers alone (for admission); PrepError
        naming the shard coordinate (``tp_size``, ``ep_size``) that the layer cannot be cut by."""
        return plan_rank_reads(self.layer(prefix), self.entry, shard)

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read from the shard files so far."""
        return sum(shard.bytes_read for shard in self._shards.values())

    def read_layer(self, prefix: str, activation: str = "swiglu", pin_memory: bool = False, *,
                   interrupt: Interrupt | None = None, shard: Shard | None = None,
                   ready: Ready | None = None, scales: Scales | None = None) -> dict[str, torch.Tensor]:
        """The stacked form of a layer (SPEC section 2), ready for ``prepare``; with ``shard``, that rank's
        input shard (SPEC section 11, see ``rank_read``), ready for ``prepare(..., inputs="shard")``, of which
        only the rank's bytes are read.

        The weights and block scales are read straight into the stacked tensors (``stacked_read``): page-locked
        with ``pin_memory`` and CUDA available, for a fast upload; ``ready(stacked, start, end)`` is called as
        experts ``[start, end)`` of them are in place, ``scales(layer)`` before, once the scales are (the scales are
        read first). ``interrupt``: see ``read_expert_tensors``.
        """
        from nvfp4_prep.pipeline.shard import Shard

        if self.format == BF16:
            raise CheckpointInvalid(f"{shown(self.directory)}: layer {shown(prefix)} holds unquantized expert weights "
                                    "(a bf16 checkpoint); quantize them first with a recipe (modelopt or "
                                    "llm-compressor) and their activation scales (read_bf16_layer)")
        reads = self.rank_reads(prefix, shard if shard is not None else Shard())
        return read_stacked(self.layer(prefix), reads, self.shard_of, self.format == COMPRESSED_TENSORS, activation,
                            pin_memory and torch.cuda.is_available(), interrupt, ready, scales)

    def read_bf16_layer(self, prefix: str, *, interrupt: Interrupt | None = None) -> dict[str, torch.Tensor]:
        """The unquantized (bf16, fp16 or fp32) per-expert weights of a layer of a ``bf16`` checkpoint, keyed
        ``"3.up_proj.weight"``: what ``pipeline.quantize.quantize_layer`` takes. CheckpointInvalid for an NVFP4
        checkpoint (``read_layer`` reads those). ``interrupt``: see ``read_expert_tensors``."""
        if self.format != BF16:
            raise CheckpointInvalid(f"{shown(self.directory)}: is a {self.format} checkpoint, NVFP4 already; "
                                    "expected an unquantized (BF16, FP16 or FP32) checkpoint to quantize")
        return self.read_expert_tensors(prefix, interrupt=interrupt)

    def shard_files(self, prefix: str | None = None) -> list[SafetensorsFile]:
        """The shards holding a layer's tensors, or every shard."""
        if prefix is None:
            return [self._shards[name] for name in sorted(self._shards)]
        names = {self._weight_map[name] for name in self.layer(prefix).tensor_names}
        return [self._shards[name] for name in sorted(names)]

    def source_identity(self, prefix: str | None = None) -> str:
        """File name, device, inode, size, mtime and ctime of each file the layer (or the whole checkpoint)
        reads from: its shards and the config and index files, for cache keys. Taken from the open
        descriptors, so a shard replaced with its old size and mtime (``cp -p``, ``rsync -t``) gives another
        identity; device and inode, not the caller's path, say which file it is."""
        files = [*self._sources, *((shard.path.name, shard.identity) for shard in self.shard_files(prefix))]
        return ";".join(f"{name}:{':'.join(map(str, ident))}" for name, ident in files)

    def file_identities(self) -> dict[str, Identity]:
        """The identity, as opened, of every file the checkpoint reads (configs, index, shards), by name in its
        directory."""
        return {**dict(self._sources), **{name: shard.identity for name, shard in self._shards.items()}}

    def auxiliary_files(self) -> list[Path]:
        """Config, tokenizer and other non-weight files at the top of the checkpoint directory (by path:
        for the local prepare job, not for the server)."""
        return sorted(
            path for path in self.directory.iterdir()
            if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and not path.name.endswith(".index.json"))

    def close(self) -> None:
        """Closes the shard files; tensors already read stay valid."""
        for shard in self._shards.values():
            shard.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _weights_file(tree: Tree, found: Found) -> Opened:
    """The index or single safetensors file the location names, or that its directory holds."""
    if found.file is not None:
        name = Path(found.file.display).name
        if name.endswith(".safetensors.index.json") or name.endswith(".safetensors"):
            return found.file
        found.file.close()
        raise CheckpointInvalid(f"{shown(found.file.display)}: expected a checkpoint directory, a .safetensors file "
                                "or a .safetensors.index.json")
    names = tree.listdir(found.directory)
    for name in (INDEX_NAME, SINGLE_NAME):
        if name in names:
            return tree.open_in(found, name, "checkpoint file")
    indexes = [name for name in names if name.endswith(".safetensors.index.json")]
    singles = [name for name in names if name.endswith(".safetensors")]
    if len(indexes) == 1:
        return tree.open_in(found, indexes[0], "checkpoint file")
    if not indexes and len(singles) == 1:
        return tree.open_in(found, singles[0], "checkpoint file")
    raise CheckpointNotFound(f"{shown(found.display)}: no {SINGLE_NAME} or {INDEX_NAME} in the checkpoint directory")


def _read_configs(tree: Tree, found: Found) -> tuple[dict[str, dict | None], list[tuple[str, Identity]]]:
    """Each config file parsed (None where absent), and the identity of each one present."""
    configs: dict[str, dict | None] = {}
    sources = []
    for name in CONFIG_FILES:
        opened = tree.open_in(found, name, "config file", missing_ok=True)
        if opened is None:
            configs[name] = None
            continue
        with contextlib.closing(opened):
            value = parse_json(read_bounded(opened.fd, opened.display, MAX_CONFIG_BYTES, "config file"),
                               opened.display, "a JSON object")
        if not isinstance(value, dict):
            raise CheckpointInvalid(f"{shown(opened.display)}: expected a JSON object, found {type(value).__name__}")
        configs[name] = value
        sources.append((name, identity(opened.stat)))
    return configs, sources


def _weight_map(index: Opened) -> dict[str, str]:
    with contextlib.closing(index):
        raw = read_bounded(index.fd, index.display, MAX_INDEX_BYTES, "safetensors index")
    value = parse_json(raw, index.display, "a safetensors index")
    weight_map = value.get("weight_map") if isinstance(value, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointInvalid(
            f"{shown(index.display)}: weight_map is missing or not an object of tensor name -> shard file")
    return weight_map


def unchanged_since(checkpoint: Checkpoint, location: PathLike, allowed_roots: Sequence[PathLike] | None) -> bool:
    """Whether opening ``location`` now would read the very files ``checkpoint`` was opened from, each unchanged:
    the same config files present (none added), the same index or single file, the same shards. Walked as
    ``open_checkpoint`` walks (no symlink followed, nothing outside the roots touched), parsing nothing; a
    location that no longer opens is changed too."""
    try:
        with Tree(allowed_roots) as tree:
            found = tree.open_location(location)
            weights = _weights_file(tree, found)
            seen = {Path(weights.display).name: identity(weights.stat)}
            weights.close()
            known = checkpoint.file_identities()
            for name in (*CONFIG_FILES, *(name for name in known if name not in seen and name not in CONFIG_FILES)):
                opened = tree.open_in(found, name, "checkpoint file", missing_ok=True)
                if opened is not None:
                    seen[name] = identity(opened.stat)
                    opened.close()
    except (CheckpointError, OSError):
        return False
    return seen == known


def open_checkpoint(location: PathLike, allowed_roots: Sequence[PathLike] | None = None, *,
                    max_header_bytes: int = MAX_HEADER_BYTES) -> Checkpoint:
    """Opens, resolves and validates a checkpoint; see the module docstring.

    ``max_header_bytes`` bounds each shard's safetensors header (parsing costs memory and CPU).
    """
    with Tree(allowed_roots) as tree:
        found = tree.open_location(location)
        weights = _weights_file(tree, found)
        try:
            configs, sources = _read_configs(tree, found)
            quant = detect_format(configs, shown(found.display))
        except BaseException:
            weights.close()
            raise
        shards: dict[str, SafetensorsFile] = {}
        try:
            if weights.display.endswith(".index.json"):
                sources.append((Path(weights.display).name, identity(weights.stat)))
                weight_map = _weight_map(weights)
                for name in sorted(set(weight_map.values())):
                    opened = tree.open_in(found, name, "shard")
                    shards[name] = SafetensorsFile(Path(opened.display), fd=opened.fd,
                                                   max_header_bytes=max_header_bytes)
                for tensor, shard in weight_map.items():
                    if tensor not in shards[shard].entries:
                        raise CheckpointInvalid(
                            f"{shown(weights.display)}: weight_map puts tensor {shown(tensor)!r} in {shown(shard)}, "
                            "whose header does not list it")
            else:
                name = Path(weights.display).name
                shards[name] = SafetensorsFile(Path(weights.display), fd=weights.fd,
                                               max_header_bytes=max_header_bytes)
                weight_map = {tensor: name for tensor in shards[name].entries}
            checkpoint = Checkpoint(Path(found.display), quant, shards, weight_map, sources=sources)
        except BaseException:
            for shard in shards.values():
                shard.close()
            raise
    log.debug("opened %s checkpoint %s: %d shards, %d MoE layers",
              checkpoint.format, shown(found.display), len(shards), len(checkpoint.moe_layers()))
    return checkpoint
