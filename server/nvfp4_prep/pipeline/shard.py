"""SPEC section 11: what one engine rank holds of a MoE layer, and its input shard cut out of the whole layer.

The rank's experts (vLLM's ``linear`` or ``round_robin`` placement) and its slice of the intermediate
dimension (vLLM's FusedMoE weight loader) are taken before any gather, so that a rank never pays for the
whole layer: contiguous experts are views, and each tensor is copied at most once, rank bytes only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.layout import EXPERT_PLACEMENTS, STACKED_NAMES

# Byte columns of W2 per 16 intermediate values, and block-scale columns.
_W2_BYTES_PER_16, _S2_COLS_PER_16 = 8, 1
# The expert-major tensors whose bytes are gathered into the prepared layout, in the order prepare() writes them.
WEIGHT_NAMES = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")
# What ``prepare(inputs=...)`` is given: the whole layer, or a rank's input shard (SPEC section 11).
INPUT_FORMS = ("layer", "shard")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Shard:
    """A rank's coordinates: tensor-parallel rank/size, expert-parallel rank/size, expert placement."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    expert_placement: str = "linear"

    def check(self, prefix: str = "") -> None:
        """PrepError naming the first bad coordinate (``prefix`` + its name, e.g. ``layout.tp_rank``)."""
        for size in ("tp_size", "ep_size"):
            value = getattr(self, size)
            if not _is_int(value) or value < 1:
                raise PrepError(prefix + size, f"is {value!r}", "an integer >= 1")
        for rank, size in (("tp_rank", "tp_size"), ("ep_rank", "ep_size")):
            value, count = getattr(self, rank), getattr(self, size)
            if not _is_int(value) or not 0 <= value < count:
                raise PrepError(prefix + rank, f"is {value!r}", f"an integer in [0, {size} = {count})")
        if self.expert_placement not in EXPERT_PLACEMENTS:
            raise PrepError(prefix + "expert_placement", f"unknown value {self.expert_placement!r}",
                            "one of " + ", ".join(EXPERT_PLACEMENTS))

    def expert_ids(self, num_experts: int) -> tuple[int, ...]:
        """The global experts this rank holds, ascending (vLLM's ``determine_expert_map``)."""
        if self.ep_size > num_experts:
            raise PrepError("ep_size", f"is {self.ep_size} for a layer of E = {num_experts} experts",
                            "ep_size <= E, so that every rank holds at least one expert")
        if self.expert_placement == "round_robin":
            return tuple(range(self.ep_rank, num_experts, self.ep_size))
        base, rem = divmod(num_experts, self.ep_size)
        start = self.ep_rank * base + min(self.ep_rank, rem)
        return tuple(range(start, start + base + (1 if self.ep_rank < rem else 0)))

    def local_intermediate(self, inter: int) -> int:
        """``Il = I / tp_size``, which must divide and be a multiple of 16."""
        if inter % self.tp_size:
            raise PrepError("tp_size", f"{self.tp_size} does not divide the intermediate size I = {inter}",
                            "a tp_size that divides I")
        local = inter // self.tp_size
        if local % 16:
            raise PrepError("tp_size", f"{self.tp_size} gives a per-rank intermediate size I / tp_size = {local}",
                            "I / tp_size a multiple of 16 (one block scale per 16 values)")
        return local

    def gemm1_row_ranges(self, inter: int, gated: bool, interleaved: bool) -> list[tuple[int, int]]:
        """(start, count) row ranges of W13/S13 this rank reads, in the order the shard stacks them."""
        local = inter // self.tp_size
        first = self.tp_rank * local
        if interleaved:
            return [(2 * first, 2 * local)]
        if gated:
            return [(first, local), (inter + first, local)]
        return [(first, local)]


def select_experts(tensor: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """The rank's experts of ``tensor`` (weights or per-expert scalars): a view when contiguous, else one copy."""
    if ids == tuple(range(ids[0], ids[0] + len(ids))):
        return tensor.narrow(0, ids[0], len(ids))
    return tensor.index_select(0, torch.tensor(ids, dtype=torch.long, device=tensor.device))


def take_rows(tensor: torch.Tensor, ids: tuple[int, ...], ranges: list[tuple[int, int]] | None) -> torch.Tensor:
    """Experts ``ids`` and (dimension 1) rows ``ranges`` of ``tensor``, copying at most once."""
    tensor = tensor.view(torch.uint8)
    if ranges is None:
        return select_experts(tensor, ids)
    if len(ranges) == 1:
        return select_experts(tensor.narrow(1, *ranges[0]), ids)
    rows = torch.cat([torch.arange(start, start + count, device=tensor.device) for start, count in ranges])
    if ids == tuple(range(ids[0], ids[0] + len(ids))):
        return tensor.narrow(0, ids[0], len(ids)).index_select(1, rows)
    experts = torch.tensor(ids, dtype=torch.long, device=tensor.device)
    return tensor[experts.unsqueeze(1), rows.unsqueeze(0)]


def rank_weight(tensors: Mapping[str, torch.Tensor], name: str, shard: Shard, ids: tuple[int, ...], inter: int,
                gated: bool, interleaved: bool) -> torch.Tensor:
    """Experts ``ids`` of weight (or block-scale) tensor ``name`` cut to the rank's intermediate slice (SPEC section
    11), dtype kept: a view where the cut is contiguous, else one copy of the rank's bytes."""
    tensor = tensors[name]
    if shard.tp_size == 1:
        return take_rows(tensor, ids, None).view(tensor.dtype)
    if name in ("w13_weight", "w13_weight_scale"):
        return take_rows(tensor, ids, shard.gemm1_row_ranges(inter, gated, interleaved)).view(tensor.dtype)
    width = inter // shard.tp_size // 16 * (_W2_BYTES_PER_16 if name == "w2_weight" else _S2_COLS_PER_16)
    return select_experts(tensor.view(torch.uint8).narrow(2, shard.tp_rank * width, width), ids).view(tensor.dtype)


def rank_inputs(tensors: Mapping[str, torch.Tensor], shard: Shard, ids: tuple[int, ...], inter: int, gated: bool,
                interleaved: bool) -> dict[str, torch.Tensor]:
    """The rank's input shard cut by SPEC section 11 from the whole layer's tensors (dtypes kept): W13, S13, W2,
    S2 and the global weight scales of its experts, and the input scales of every expert (the reductions of the
    FlashInfer backends run over all of them)."""
    out = {name: rank_weight(tensors, name, shard, ids, inter, gated, interleaved) for name in WEIGHT_NAMES}
    out.update({name: select_experts(tensors[name], ids) for name in ("w13_weight_scale_2", "w2_weight_scale_2")})
    out.update({name: tensors[name] for name in ("w13_input_scale", "w2_input_scale")})
    return {name: out[name] for name in STACKED_NAMES}
