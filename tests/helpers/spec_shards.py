"""SPEC section 11 by its words, written apart from the pipeline: which experts a rank holds, the input shard cut
from a whole stacked layer, and the I multiple each rank needs for a backend to accept it."""

from __future__ import annotations

import torch

from tests.helpers.pipeline_reference import GATED


def spec_expert_ids(experts: int, ep_rank: int, ep_size: int, placement: str) -> list[int]:
    if placement == "round_robin":
        return [e for e in range(experts) if e % ep_size == ep_rank]
    base, rem = divmod(experts, ep_size)
    start = ep_rank * base + min(ep_rank, rem)
    return list(range(start, start + base + (1 if ep_rank < rem else 0)))


def spec_input_shard(layer: dict, activation: str, tp_rank: int, tp_size: int, ids: list[int]) -> dict:
    """The rank's input shard: experts first, then the intermediate slice; every expert's input scales."""
    inter = layer["w2_weight"].shape[2] * 2
    il, r = inter // tp_size, tp_rank
    if activation == "swigluoai":
        rows = list(range(2 * r * il, 2 * (r + 1) * il))
    elif GATED[activation]:
        rows = list(range(r * il, (r + 1) * il)) + list(range(inter + r * il, inter + (r + 1) * il))
    else:
        rows = list(range(r * il, (r + 1) * il))
    pick = torch.tensor(ids)

    def u8(name: str) -> torch.Tensor:
        return layer[name].view(torch.uint8)[pick]

    return {
        "w13_weight": u8("w13_weight")[:, rows].clone(),
        "w13_weight_scale": u8("w13_weight_scale")[:, rows].clone().view(torch.float8_e4m3fn),
        "w13_weight_scale_2": layer["w13_weight_scale_2"][pick].clone(),
        "w13_input_scale": layer["w13_input_scale"].clone(),
        "w2_weight": u8("w2_weight")[:, :, r * il // 2:(r + 1) * il // 2].clone(),
        "w2_weight_scale": u8("w2_weight_scale")[:, :, r * il // 16:(r + 1) * il // 16].clone()
        .view(torch.float8_e4m3fn),
        "w2_weight_scale_2": layer["w2_weight_scale_2"][pick].clone(),
        "w2_input_scale": layer["w2_input_scale"].clone(),
    }


def local_multiple(backend: str, activation: str, profile: str) -> int:
    """What each rank's I must be a multiple of for the backend to accept it."""
    if backend == "flashinfer_cutedsl" and GATED[activation] and profile == "seed":
        return 64
    if backend in ("flashinfer_cutlass", "vllm_cutlass") and GATED[activation]:
        return 64
    return 16
