"""prepare(): a stacked NVFP4 MoE layer (or a rank's input shard of it) to the layout of one kernel backend, engine
profile and rank shard."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from nvfp4_prep.contract.layout import (
    ALL_ACTIVATIONS,
    DEFAULT_GATED_GROUP_SIZE,
    DEFAULT_PROFILE,
    DERIVED_NAMES,
    GATED_ACTIVATIONS,
    INTERLEAVED_ACTIVATIONS,
    STACKED_NAMES,
)
from nvfp4_prep.contract.tensor_bytes import dense

from . import gather
from .layout import layout_record, padded_dims
from .plan import GatherPlan, layer_plan
from .scales import derived_scalars, input_scales, weight_scale_2
from .shard import INPUT_FORMS, Shard, rank_inputs, select_experts
from .validate import SCALE_NAMES, check_alignment, check_choice, check_layer, host_scales, validate


@dataclass
class PreparedLayer:
    """Prepared tensors (SPEC section 7 names, no prefix) and their layout record."""

    tensors: dict[str, torch.Tensor]
    layout: dict


def _gathered(plan: GatherPlan, source: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    out = torch.empty((source.shape[0], *shape), dtype=torch.uint8, device=source.device)
    return gather.apply(plan, source, out)


def _stage_scales(tensors: Mapping[str, torch.Tensor]) -> Callable[[], dict[str, torch.Tensor]]:
    """Starts copying the per-expert scales to the host; returns the wait for them, checked (``host_scales``).

    Queued before the last gathers, the copies finish before them, so that working on the scales on the host
    (a few floats per expert) overlaps those gathers instead of holding them back with a device sync per step.
    """
    if not tensors["w13_weight"].is_cuda:
        return lambda: host_scales(tensors)
    staged = {}
    for name in SCALE_NAMES:
        staged[name] = torch.empty(tensors[name].shape, dtype=tensors[name].dtype, pin_memory=True)
        staged[name].copy_(tensors[name], non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> dict[str, torch.Tensor]:
        copied.synchronize()
        return host_scales(staged)
    return wait


def _on_device(scalars: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The host-computed scalars on ``device``: one asynchronous copy, then a tensor of its own for each."""
    if device.type == "cpu":  # copies: no output aliases an input or another output
        return {name: value.clone() for name, value in scalars.items()}
    flat = torch.cat([value.reshape(-1) for value in scalars.values()]).pin_memory().to(device, non_blocking=True)
    placed, offset = {}, 0
    for name, value in scalars.items():
        placed[name] = flat[offset:offset + value.numel()].view(value.shape).clone()
        offset += value.numel()
    return placed


def cut_shard(
    tensors: Mapping[str, torch.Tensor],
    activation: str = "swiglu",
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    ep_rank: int = 0,
    ep_size: int = 1,
    expert_placement: str = "linear",
) -> dict[str, torch.Tensor]:
    """The rank's input shard of a whole stacked layer (SPEC section 11), what ``prepare(..., inputs="shard")``
    takes: its experts' weights, block scales and global weight scales, its intermediate slice, and the input
    scales of every expert. Views where the cut is contiguous, else one copy of the rank's bytes."""
    check_choice("activation", activation, ALL_ACTIVATIONS)
    shard = Shard(tp_rank, tp_size, ep_rank, ep_size, expert_placement)
    layer = check_layer(tensors, activation in GATED_ACTIVATIONS)
    shard.check()
    ids = shard.expert_ids(layer.num_experts)
    shard.local_intermediate(layer.intermediate)
    return rank_inputs(tensors, shard, ids, layer.intermediate, layer.gated, activation in INTERLEAVED_ACTIVATIONS)


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
    inputs: str = "layer",
) -> PreparedLayer:
    """Prepare one whole layer, or the rank shard of it that the shard keywords name (SPEC section 11).

    ``inputs="layer"``: ``tensors`` are the whole layer, and the rank's input shard is cut from them.
    ``inputs="shard"``: they are that input shard already (what ``cut_shard`` gives, or a checkpoint read of the
    rank's bytes): the rank's experts, in ascending global order, its intermediate slice, and the input scales
    of every expert of the layer. Both give the same bytes. Every check runs before any output is written.
    Input-scale reductions of the FlashInfer backends run over all experts of the layer; vLLM CUTLASS keeps the
    rank's own per-expert scales.
    """
    check_choice("inputs", inputs, INPUT_FORMS)
    shard = Shard(tp_rank, tp_size, ep_rank, ep_size, expert_placement)
    layer = validate(tensors, backend, activation, input_scale_policy, profile=profile,
                     gated_group_size=gated_group_size, shard=shard if inputs == "shard" else None)
    shard.check()
    global_experts = tensors["w2_input_scale"].shape[0]
    ids = shard.expert_ids(global_experts)
    if inputs == "layer":
        inter = shard.local_intermediate(layer.intermediate)
        tensors = rank_inputs(tensors, shard, ids, layer.intermediate, layer.gated,
                              activation in INTERLEAVED_ACTIVATIONS)
    else:
        inter = layer.intermediate
    dims = padded_dims(backend, len(ids), layer.hidden, inter, layer.gated, profile=profile)
    check_alignment(backend, dims, profile=profile, gated_group_size=gated_group_size, tp_size=tp_size)

    plan = layer_plan(backend, activation, dims, profile, gated_group_size)
    out = {"w13_weight": _gathered(plan.w13, tensors["w13_weight"], plan.w13_shape)}
    scales = _stage_scales(tensors)  # after the first gather, so that nothing delays the device's start
    out |= {
        "w13_weight_scale": _gathered(plan.s13, tensors["w13_weight_scale"], plan.s13_shape).view(torch.float8_e4m3fn),
        "w2_weight": _gathered(plan.w2, tensors["w2_weight"], plan.w2_shape),
        "w2_weight_scale": _gathered(plan.s2, tensors["w2_weight_scale"], plan.s2_shape).view(torch.float8_e4m3fn),
    }
    # The scales are checked, reduced and combined on the host while the gathers run; a bad value (PrepError
    # naming the input) discards the fresh outputs, so nothing the caller sees was written.
    host = scales()
    a13, a2 = input_scales(host["w13_input_scale"], host["w2_input_scale"], backend, input_scale_policy)
    scalars = {
        "w13_weight_scale_2": weight_scale_2(host["w13_weight_scale_2"]),
        "w13_input_scale": dense(select_experts(a13, ids)),
        "w2_weight_scale_2": dense(host["w2_weight_scale_2"]),
        "w2_input_scale": dense(select_experts(a2, ids)),
    }
    derived = derived_scalars(scalars["w13_weight_scale_2"], scalars["w13_input_scale"],
                              scalars["w2_weight_scale_2"], scalars["w2_input_scale"], layer.gated)
    scalars.update(derived)
    if profile == "vllm-0.33":
        # vLLM's experts fuse the input scales into the global weight scales in place (g1/g2_alphas alias them).
        scalars["w13_weight_scale_2"] = derived["g1_alphas"]
        scalars["w2_weight_scale_2"] = derived["g2_alphas"]
    out.update(_on_device(scalars, out["w13_weight"].device))
    out = {name: out[name] for name in (*STACKED_NAMES, *DERIVED_NAMES)}
    record = layout_record(backend, activation, input_scale_policy, dims, profile=profile,
                           gated_group_size=gated_group_size, shard=shard, expert_ids=ids,
                           global_experts=global_experts)
    return PreparedLayer(out, record)
