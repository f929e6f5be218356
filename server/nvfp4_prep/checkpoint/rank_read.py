"""One rank's input shard of a checkpoint's MoE layer (SPEC section 11), reading only the bytes the rank holds.

The rank's experts are read whole or, under tensor parallelism, as blocks: the gate and up rows
``[r*Il, (r+1)*Il)`` of each weight and block scale (one contiguous byte range per tensor) and the down
columns ``[r*Il/2, (r+1)*Il/2)`` bytes of the weight, ``[r*Il/16, (r+1)*Il/16)`` of the block scale (one
range per row). Their global weight scales come with them, and the input scales of every expert of the
layer, which the FlashInfer backends reduce over. ``stacked_read`` reads them into the stacked form; the result
is what ``pipeline.prepare(..., inputs="shard")`` takes, equal to ``pipeline.cut_shard`` of the whole layer. The
whole layer is the plan of ``Shard()``, the one rank that holds every expert whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nvfp4_prep.contract.layout import GATED_ACTIVATIONS

from .discovery import MoeLayer
from .errors import CheckpointInvalid, shown
from .safetensors_file import TensorEntry

if TYPE_CHECKING:
    from nvfp4_prep.pipeline.shard import Shard

EntryOf = Callable[[str], TensorEntry]

# Byte columns of a down weight per 16 intermediate values (two FP4 codes a byte), and of its block scale.
_DOWN_COLS_PER_16 = {"weight": 8, "block": 1}


@dataclass(frozen=True)
class TensorRead:
    """One tensor, or a block of it, that a rank reads: ``rows``/``cols`` are ``(start, count)``, None = all."""

    name: str
    key: str  # relative to the experts prefix, the expert renumbered to its place on the rank ("0.w1.weight")
    entry: TensorEntry
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.rows is None:
            return self.entry.shape
        return self.rows[1], self.cols[1]

    @property
    def nbytes(self) -> int:
        if self.rows is None:
            return self.entry.nbytes
        return self.entry.nbytes * self.rows[1] * self.cols[1] // (self.entry.shape[0] * self.entry.shape[1])


@dataclass(frozen=True)
class RankReads:
    """What a rank reads of a layer: its experts' tensors (keyed by their place on the rank) and every
    expert's input scales (keyed by the global expert)."""

    expert_ids: tuple[int, ...]
    experts: list[TensorRead]
    input_scales: list[TensorRead]

    def all(self) -> list[TensorRead]:
        return self.experts + self.input_scales


def _rows_of(entry: TensorEntry, name: str) -> int:
    if len(entry.shape) != 2:
        raise CheckpointInvalid(f"{shown(name)}: has shape {list(entry.shape)}; expected a 2-D weight [out, in/2]")
    return entry.shape[0]


def plan_rank_reads(layer: MoeLayer, entry_of: EntryOf, shard: Shard) -> RankReads:
    """The reads of ``shard``'s input shard of ``layer``; ``entry_of(name)`` gives a tensor's header entry.

    PrepError (naming ``tp_size``, ``ep_size``, ...) for a shard the layer cannot be cut into;
    CheckpointInvalid for a tensor whose shape the cut cannot slice.
    """
    shard.check()
    ids = shard.expert_ids(layer.num_experts)
    weight, block, global_scale, input_scale = layer.suffixes
    *gemm1, down = layer.projections
    prefix = layer.prefix

    def name(expert: int, proj: str, suffix: str) -> str:
        return f"{prefix}.{expert}.{proj}.{suffix}"

    inter = local = None
    if shard.tp_size > 1:
        first = name(ids[0], gemm1[0], weight)
        inter = _rows_of(entry_of(first), first)
        local = shard.local_intermediate(inter)
    experts = []
    for position, expert in enumerate(ids):
        for proj in layer.projections:
            for suffix in (weight, block, global_scale):
                tensor = name(expert, proj, suffix)
                read = TensorRead(tensor, f"{position}.{proj}.{suffix}", entry_of(tensor))
                if local is not None and suffix != global_scale:
                    read = _tp_block(read, proj == down, "weight" if suffix == weight else "block", inter, local,
                                     shard.tp_rank)
                experts.append(read)
    input_scales = [TensorRead(name(expert, proj, input_scale), f"{expert}.{proj}.{input_scale}",
                               entry_of(name(expert, proj, input_scale)))
                    for expert in range(layer.num_experts) for proj in layer.projections]
    return RankReads(ids, experts, input_scales)


def _tp_block(read: TensorRead, is_down: bool, kind: str, inter: int, local: int, rank: int) -> TensorRead:
    """The rank's rows (gate, up) or columns (down) of one weight or block scale, checked against ``I``."""
    shape = read.entry.shape
    if is_down:
        width = local // 16 * _DOWN_COLS_PER_16[kind]
        want = inter // 16 * _DOWN_COLS_PER_16[kind]
        if len(shape) != 2 or shape[1] != want:
            raise CheckpointInvalid(f"{shown(read.name)}: has shape {list(shape)}; expected [H, {want}] "
                                    f"(I = {inter} from the gate/up weight)")
        return TensorRead(read.name, read.key, read.entry, (0, shape[0]), (rank * width, width))
    if len(shape) != 2 or shape[0] != inter:
        raise CheckpointInvalid(f"{shown(read.name)}: has shape {list(shape)}; expected [{inter}, ...] "
                                f"(I = {inter} rows like the first gate/up weight)")
    return TensorRead(read.name, read.key, read.entry, (rank * local, local), (0, shape[1]))


def _scalar(name: str, tensor: torch.Tensor, reciprocal: bool) -> torch.Tensor:
    if tensor.numel() != 1 or tensor.dtype != torch.float32:
        raise CheckpointInvalid(f"{shown(name)}: has shape {list(tensor.shape)} and dtype "
                                f"{str(tensor.dtype).removeprefix('torch.')}; expected a float32 scalar (0-d or [1])")
    value = tensor.reshape(())
    return torch.reciprocal(value) if reciprocal else value


def stacked_scalars(layer: MoeLayer, scales: dict[str, torch.Tensor], suffix: str, experts: int, activation: str,
                    compressed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One per-expert scalar (``suffix``: the global weight scale or the input scale) of experts ``0..experts-1``
    (keyed ``"3.up_proj.<suffix>"``), stacked as ``assemble_layer`` stacks it: GEMM1's ``[E, 2]`` (gate, up) when
    gated, else ``[E]``, and down's ``[E]`` (compressed-tensors stores reciprocals)."""
    *gemm1, down = layer.projections
    first = gemm1 if activation in GATED_ACTIVATIONS else gemm1[:1]

    def scale(expert: int, proj: str) -> torch.Tensor:
        key = f"{expert}.{proj}.{suffix}"
        return _scalar(f"{layer.prefix}.{key}", scales[key], compressed)

    s13 = torch.stack([torch.stack([scale(e, proj) for proj in first]) for e in range(experts)])
    s2 = torch.stack([scale(e, down) for e in range(experts)])
    return s13 if len(first) == 2 else s13.squeeze(-1), s2
