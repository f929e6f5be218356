"""merge_shards(): the unprepared shards of every rank put back together into the whole layer (SPEC section 11).

``verify`` of a set of rank folders uses it: unprepare each rank's shard, merge, compare with the source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.layout import GATED_ACTIVATIONS, INTERLEAVED_ACTIVATIONS, STACKED_NAMES

from .unprepare import layout_options

_SCALARS = ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale")
# Record fields every rank of one layer shares.
_COMMON = ("backend", "activation", "profile", "input_scale_policy", "gated_group_size", "tp_size", "ep_size",
           "expert_placement", "global_num_experts", "hidden_dim_unpadded", "intermediate_dim_unpadded")


def _full_record(layout: Mapping) -> dict:
    """The record with the profile and shard keys a default (whole-layer, seed) record leaves out."""
    experts = layout.get("num_experts")
    return {"global_num_experts": experts, "expert_ids": list(range(experts)) if isinstance(experts, int) else [],
            **layout, **layout_options(layout)}


def _grid(parts: Sequence[tuple[Mapping[str, torch.Tensor], Mapping]]) -> dict[tuple[int, int], tuple]:
    if not parts:
        raise PrepError("shards", "none were given", "the unprepared shard and layout record of every rank")
    first = parts[0][1]
    grid: dict[tuple[int, int], tuple] = {}
    for tensors, layout in parts:
        for key in _COMMON:
            if layout.get(key) != first.get(key):
                raise PrepError(f"shards.{key}",
                                f"is {layout.get(key)!r} on one rank and {first.get(key)!r} on another",
                                "one value for every rank of the layer")
        rank = (layout.get("tp_rank"), layout.get("ep_rank"))
        if rank in grid:
            raise PrepError("shards", f"tp_rank {rank[0]}, ep_rank {rank[1]} is given twice", "each rank once")
        grid[rank] = (tensors, layout)
    for tp in range(first["tp_size"]):
        for ep in range(first["ep_size"]):
            if (tp, ep) not in grid:
                raise PrepError("shards", f"tp_rank {tp}, ep_rank {ep} is missing",
                                f"all {first['tp_size']} x {first['ep_size']} ranks")
    return grid


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8)


def _tp_merged(pieces: list[Mapping[str, torch.Tensor]], gated: bool, interleaved: bool) -> dict[str, torch.Tensor]:
    """One expert group's tensor-parallel pieces joined along the intermediate dimension."""
    out = {}
    for name in ("w13_weight", "w13_weight_scale"):
        rows = [_bytes(p[name]) for p in pieces]
        if gated and not interleaved:
            half = rows[0].shape[1] // 2
            rows = [r[:, :half] for r in rows] + [r[:, half:] for r in rows]
        out[name] = torch.cat(rows, dim=1)
    for name in ("w2_weight", "w2_weight_scale"):
        out[name] = torch.cat([_bytes(p[name]) for p in pieces], dim=2)
    for name in _SCALARS:
        if any(not torch.equal(p[name], pieces[0][name]) for p in pieces[1:]):
            raise PrepError(f"shards.{name}", "differs between tensor-parallel ranks of the same experts",
                            "one value per expert on every tensor-parallel rank")
        out[name] = pieces[0][name]
    return out


def merge_shards(parts: Sequence[tuple[Mapping[str, torch.Tensor], Mapping]]) -> dict[str, torch.Tensor]:
    """The whole layer's stacked tensors from ``(unprepare(shard), its layout record)`` of every rank.

    The result equals ``unprepare`` of the whole layer prepared the same way: weights and block scales in
    the source's bytes, scalars per expert as that profile gives them back.
    """
    parts = [(tensors, _full_record(layout)) for tensors, layout in parts]
    grid = _grid(parts)
    first = parts[0][1]
    activation = first["activation"]
    gated, interleaved = activation in GATED_ACTIVATIONS, activation in INTERLEAVED_ACTIVATIONS
    experts = first["global_num_experts"]
    out: dict[str, torch.Tensor] = {}
    owner: dict[int, int] = {}
    for ep in range(first["ep_size"]):
        ranks = [grid[(tp, ep)] for tp in range(first["tp_size"])]
        ids = ranks[0][1]["expert_ids"]
        if any(layout["expert_ids"] != ids for _, layout in ranks):
            raise PrepError("shards.expert_ids", f"differ between tensor-parallel ranks of ep_rank {ep}",
                            "the same experts on every tensor-parallel rank")
        merged = _tp_merged([tensors for tensors, _ in ranks], gated, interleaved)
        index = torch.tensor(ids, dtype=torch.long, device=merged["w13_weight"].device)
        for expert in ids:
            if expert in owner or not 0 <= expert < experts:
                raise PrepError("shards.expert_ids", f"expert {expert} is held by ep_ranks {owner.get(expert)} and {ep}"
                                if expert in owner else f"expert {expert} is outside [0, {experts})",
                                "every expert of the layer on exactly one expert-parallel rank")
            owner[expert] = ep
        for name, value in merged.items():
            if name not in out:
                out[name] = torch.empty((experts, *value.shape[1:]), dtype=value.dtype, device=value.device)
            out[name].index_copy_(0, index, value)
    if len(owner) != experts:
        missing = min(set(range(experts)) - set(owner))
        raise PrepError("shards.expert_ids", f"expert {missing} is on no rank", f"all {experts} experts")
    for name in ("w13_weight_scale", "w2_weight_scale"):
        out[name] = out[name].view(torch.float8_e4m3fn)
    return {name: out[name] for name in STACKED_NAMES}
