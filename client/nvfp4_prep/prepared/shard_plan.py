"""Which tensors go into which shard of a prepared checkpoint.

Each MoE layer gets a shard of its own, holding its prepared experts and the other
tensors of the same decoder block (attention, norms, router), so a layer is the
unit of work and of resumption. Tensors outside those blocks (embeddings, head,
dense layers) fill further shards of at most ``max_shard_bytes``. The plan
depends only on the source checkpoint, so a rerun finds the same shard names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nvfp4_prep.checkpoint.checkpoint import Checkpoint

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

_EXPERTS_SUFFIX = re.compile(r"\.(?:mlp|block_sparse_moe)\.experts$")


@dataclass(frozen=True)
class PlannedShard:
    """A shard file and what it holds: at most one MoE layer, plus carried-over tensors."""

    filename: str
    layer: str | None
    other_tensors: tuple[str, ...]


def shard_filename(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def decoder_block(experts_prefix: str) -> str:
    """``model.layers.3.mlp.experts`` -> ``model.layers.3``."""
    return _EXPERTS_SUFFIX.sub("", experts_prefix)


def plan_shards(checkpoint: Checkpoint, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[PlannedShard]:
    layers = checkpoint.moe_layers()
    owner: dict[str, str] = {}  # decoder block "model.layers.3." -> the first MoE layer in it
    for prefix in layers:
        owner.setdefault(decoder_block(prefix) + ".", prefix)
    carried: dict[str, list[str]] = {prefix: [] for prefix in layers}
    rest: list[str] = []
    for name in checkpoint.other_tensor_names():
        block = next((b for b in owner if name.startswith(b)), None)
        (carried[owner[block]] if block is not None else rest).append(name)

    rest_groups: list[list[str]] = []
    size = 0
    for name in rest:
        nbytes = checkpoint.entry(name).nbytes
        if not rest_groups or (size + nbytes > max_shard_bytes and rest_groups[-1]):
            rest_groups.append([])
            size = 0
        rest_groups[-1].append(name)
        size += nbytes

    total = len(layers) + len(rest_groups)
    shards = [PlannedShard(shard_filename(i + 1, total), prefix, tuple(carried[prefix]))
              for i, prefix in enumerate(layers)]
    shards += [PlannedShard(shard_filename(len(layers) + i + 1, total), None, tuple(group))
               for i, group in enumerate(rest_groups)]
    return shards
