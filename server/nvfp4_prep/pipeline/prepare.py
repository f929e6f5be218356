"""prepare(): a stacked NVFP4 MoE layer to the layout of one kernel backend, engine profile and rank shard."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nvfp4_prep.contract.layout import DEFAULT_GATED_GROUP_SIZE, DEFAULT_PROFILE, INTERLEAVED_ACTIVATIONS
from nvfp4_prep.contract.tensor_bytes import dense

from . import gather
from .layout import layout_record, padded_dims
from .plan import GatherPlan, layer_plan
from .scales import derived_scalars, input_scales, weight_scale_2
from .shard import Shard, rank_inputs, select_experts
from .validate import check_alignment, validate


@dataclass
class PreparedLayer:
    """Prepared tensors (SPEC section 7 names, no prefix) and their layout record."""

    tensors: dict[str, torch.Tensor]
    layout: dict


def _gathered(plan: GatherPlan, source: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    out = torch.empty((source.shape[0], *shape), dtype=torch.uint8, device=source.device)
    return gather.apply(plan, source, out)


def prepare(
    tensors: Mapping[str, torch.Tensor],
    backend: str,
    activation: str = "swiglu",
    input_scale_policy: str = "max",
    *,
    profile: str = DEFAULT_PROFILE,
    gated_group_size: int = DEFAULT_GATED_GROUP_SIZE,
    tp_rank: int = 0,
    tp_size: int = 1,
    ep_rank: int = 0,
    ep_size: int = 1,
    expert_placement: str = "linear",
) -> PreparedLayer:
    """Prepare one whole layer, or the rank shard of it that the shard keywords name (SPEC section 11).

    Every check runs before any output is written. Input-scale reductions of the FlashInfer backends run
    over all experts of the layer; vLLM CUTLASS keeps the rank's own per-expert scales.
    """
    shard = Shard(tp_rank, tp_size, ep_rank, ep_size, expert_placement)
    layer = validate(tensors, backend, activation, input_scale_policy, profile=profile,
                     gated_group_size=gated_group_size)
    shard.check()
    ids = shard.expert_ids(layer.num_experts)
    inter = shard.local_intermediate(layer.intermediate)
    dims = padded_dims(backend, len(ids), layer.hidden, inter, layer.gated, profile=profile)
    check_alignment(backend, dims, profile=profile, gated_group_size=gated_group_size, tp_size=tp_size)

    a13, a2 = input_scales(tensors["w13_input_scale"], tensors["w2_input_scale"], backend, input_scale_policy)
    a13, a2 = dense(select_experts(a13, ids)), dense(select_experts(a2, ids))
    ws13 = dense(select_experts(weight_scale_2(tensors["w13_weight_scale_2"]), ids))
    ws2 = dense(select_experts(tensors["w2_weight_scale_2"], ids))
    source = rank_inputs(dict(tensors), shard, ids, layer.intermediate, layer.gated,
                         activation in INTERLEAVED_ACTIVATIONS)
    plan = layer_plan(backend, activation, dims, profile, gated_group_size)

    out = {
        "w13_weight": _gathered(plan.w13, source["w13_weight"], plan.w13_shape),
        "w13_weight_scale": _gathered(plan.s13, source["w13_weight_scale"], plan.s13_shape).view(torch.float8_e4m3fn),
        "w13_weight_scale_2": ws13,
        "w13_input_scale": a13,
        "w2_weight": _gathered(plan.w2, source["w2_weight"], plan.w2_shape),
        "w2_weight_scale": _gathered(plan.s2, source["w2_weight_scale"], plan.s2_shape).view(torch.float8_e4m3fn),
        "w2_weight_scale_2": ws2,
        "w2_input_scale": a2,
    }
    # After the gathers are queued, so that the check's one device sync overlaps them instead of delaying
    # them; an overflow (PrepError naming the input) discards the fresh outputs.
    derived = derived_scalars(ws13, a13, ws2, a2, layer.gated)
    out.update(derived)
    if profile == "vllm-0.33":
        # vLLM's experts fuse the input scales into the global weight scales in place (g1/g2_alphas alias them).
        out["w13_weight_scale_2"] = derived["g1_alphas"].clone()
        out["w2_weight_scale_2"] = derived["g2_alphas"].clone()
    record = layout_record(backend, activation, input_scale_policy, dims, profile=profile,
                           gated_group_size=gated_group_size, shard=shard, expert_ids=ids,
                           global_experts=layer.num_experts)
    return PreparedLayer(out, record)
