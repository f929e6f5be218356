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
    GATED_ACTIVATIONS,
    INTERLEAVED_ACTIVATIONS,
    PREPARED_NAMES,
    STACKED_SCALE_NAMES,
)
from nvfp4_prep.contract.tensor_bytes import dense

from . import gather
from .layout import layout_record, padded_dims
from .plan import LayerPlan, layer_plan
from .scales import derived_scalars, input_scales, weight_scale_2
from .shard import INPUT_FORMS, WEIGHT_NAMES, Shard, rank_inputs, rank_weight, select_experts
from .validate import check_alignment, check_choice, check_layer, host_scales, validate


@dataclass
class PreparedLayer:
    """Prepared tensors (SPEC section 7 names, no prefix) and their layout record."""

    tensors: dict[str, torch.Tensor]
    layout: dict


def _stage_scales(tensors: Mapping[str, torch.Tensor]) -> Callable[[], dict[str, torch.Tensor]]:
    """Starts copying the per-expert scales to the host; returns the wait for them, checked (``host_scales``).

    Queued before the last gathers, the copies finish before them, so that working on the scales on the host
    (a few floats per expert) overlaps those gathers instead of holding them back with a device sync per step.
    """
    if not tensors["w13_input_scale"].is_cuda:
        return lambda: host_scales(tensors)
    staged = {}
    for name in STACKED_SCALE_NAMES:
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


@dataclass(frozen=True, eq=False)
class Preparation:
    """What ``prepare`` settles before it writes a byte: the checked options and shapes, the rank's experts, the
    gather plan and the layout record.

    Every prepared expert of a weight depends on that expert's input bytes alone, so the weights can be gathered
    in expert groups (``gather``) as their inputs arrive, and sent while later experts are still on their way;
    only the scalars (``scalars``) need the small per-expert scale tensors of every expert first.
    """

    backend: str
    policy: str
    shard: Shard
    ids: tuple[int, ...]  # the rank's global experts, ascending
    inputs: str
    intermediate: int  # of the tensors given (the layer's, or the rank's for an input shard)
    gated: bool
    interleaved: bool
    plan: LayerPlan
    record: dict

    @property
    def experts(self) -> int:
        """Experts of the prepared tensors (the rank's)."""
        return len(self.ids)

    def weight_shape(self, name: str) -> tuple[int, ...]:
        """Shape of prepared weight ``name`` (one of ``WEIGHT_NAMES``); its dtype is ``WEIGHT_DTYPES[name]``."""
        return (self.experts, *getattr(self.plan, _PLAN_SHAPES[name]))

    def inputs_needed(self, end: int) -> int:
        """How many leading experts of the given tensors prepared experts ``[0, end)`` read."""
        return self.ids[end - 1] + 1 if self.inputs == "layer" else end

    def gather(self, tensors: Mapping[str, torch.Tensor], name: str, out: torch.Tensor, start: int = 0,
               end: int | None = None) -> torch.Tensor:
        """Writes prepared experts ``[start, end)`` (default: to the last) of weight ``name`` into the same experts
        of ``out`` (the whole prepared tensor); returns ``out``."""
        end = self.experts if end is None else end
        if self.inputs == "layer":
            source = rank_weight(tensors, name, self.shard, self.ids[start:end], self.intermediate, self.gated,
                                 self.interleaved)
        else:
            source = tensors[name].narrow(0, start, end - start)
        gather.apply(getattr(self.plan, _PLAN_GATHERS[name]), source, out.narrow(0, start, end - start))
        return out

    def gathered(self, tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        """Prepared weight ``name``, every expert, in a tensor of its own."""
        out = torch.empty(self.weight_shape(name), dtype=torch.uint8, device=tensors[name].device)
        return self.gather(tensors, name, out).view(WEIGHT_DTYPES[name])

    def scale_inputs(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The four per-expert scale tensors ``scalars`` reads (``STACKED_SCALE_NAMES``): the global weight scales
        of the rank's experts, and the input scales of every expert of the layer."""
        scales = {name: tensors[name] for name in STACKED_SCALE_NAMES}
        if self.inputs == "layer":
            for name in ("w13_weight_scale_2", "w2_weight_scale_2"):
                scales[name] = select_experts(scales[name], self.ids)
        return scales

    def scalars(self, host: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The prepared global scales and derived scalars (SPEC sections 4 and 6), on the host, from
        ``scale_inputs`` checked by ``host_scales``; PrepError naming the input for a bad value."""
        a13, a2 = input_scales(host["w13_input_scale"], host["w2_input_scale"], self.backend, self.policy)
        scalars = {
            "w13_weight_scale_2": weight_scale_2(host["w13_weight_scale_2"]),
            "w13_input_scale": dense(select_experts(a13, self.ids)),
            "w2_weight_scale_2": dense(host["w2_weight_scale_2"]),
            "w2_input_scale": dense(select_experts(a2, self.ids)),
        }
        derived = derived_scalars(scalars["w13_weight_scale_2"], scalars["w13_input_scale"],
                                  scalars["w2_weight_scale_2"], scalars["w2_input_scale"], self.gated)
        scalars.update(derived)
        if self.record["profile"] == "vllm-0.33":
            # vLLM's experts fuse the input scales into the global weight scales in place (g1/g2_alphas alias them).
            scalars["w13_weight_scale_2"] = derived["g1_alphas"]
            scalars["w2_weight_scale_2"] = derived["g2_alphas"]
        return {name: scalars[name] for name in PREPARED_NAMES if name not in WEIGHT_NAMES}


# Dtypes of the prepared weights: packed E2M1 bytes, float8 block scales.
WEIGHT_DTYPES = {"w13_weight": torch.uint8, "w13_weight_scale": torch.float8_e4m3fn,
                 "w2_weight": torch.uint8, "w2_weight_scale": torch.float8_e4m3fn}
_PLAN_GATHERS = {"w13_weight": "w13", "w13_weight_scale": "s13", "w2_weight": "w2", "w2_weight_scale": "s2"}
_PLAN_SHAPES = {name: f"{plan}_shape" for name, plan in _PLAN_GATHERS.items()}


def preparation(
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
) -> Preparation:
    """Every check of ``prepare`` that needs no tensor data (names, dtypes, shapes, devices, options, shard,
    alignment), and the plan that follows; the tensors may still be arriving (their values are not read)."""
    check_choice("inputs", inputs, INPUT_FORMS)
    shard = Shard(tp_rank, tp_size, ep_rank, ep_size, expert_placement)
    layer = validate(tensors, backend, activation, input_scale_policy, profile=profile,
                     gated_group_size=gated_group_size, shard=shard if inputs == "shard" else None)
    shard.check()
    global_experts = tensors["w2_input_scale"].shape[0]
    ids = shard.expert_ids(global_experts)
    inter = shard.local_intermediate(layer.intermediate) if inputs == "layer" else layer.intermediate
    dims = padded_dims(backend, len(ids), layer.hidden, inter, layer.gated, profile=profile)
    check_alignment(backend, dims, profile=profile, gated_group_size=gated_group_size, tp_size=tp_size)
    record = layout_record(backend, activation, input_scale_policy, dims, profile=profile,
                           gated_group_size=gated_group_size, shard=shard, expert_ids=ids,
                           global_experts=global_experts)
    return Preparation(backend, input_scale_policy, shard, ids, inputs, layer.intermediate, layer.gated,
                       activation in INTERLEAVED_ACTIVATIONS,
                       layer_plan(backend, activation, dims, profile, gated_group_size), record)


def prepare(
    tensors: Mapping[str, torch.Tensor],
    backend: str,
    activation: str = "swiglu",
    input_scale_policy: str = "max",
    **options: object,
) -> PreparedLayer:
    """Prepare one whole layer, or the rank shard of it that the shard keywords name (SPEC section 11).

    ``options``: ``profile``, ``gated_group_size``, the shard's ``tp_rank``, ``tp_size``, ``ep_rank``, ``ep_size``,
    ``expert_placement``, and ``inputs``. ``inputs="layer"`` (default): ``tensors`` are the whole layer, and the
    rank's input shard is cut from them. ``inputs="shard"``: they are that input shard already (what ``cut_shard``
    gives, or a checkpoint read of the rank's bytes): the rank's experts, in ascending global order, its
    intermediate slice, and the input scales of every expert of the layer. Both give the same bytes. Every check
    runs before any output is written. Input-scale reductions of the FlashInfer backends run over all experts of
    the layer; vLLM CUTLASS keeps the rank's own per-expert scales.
    """
    prep = preparation(tensors, backend, activation, input_scale_policy, **options)
    out = {"w13_weight": prep.gathered(tensors, "w13_weight")}
    scales = _stage_scales(prep.scale_inputs(tensors))  # after the first gather: nothing delays the device's start
    out |= {name: prep.gathered(tensors, name) for name in WEIGHT_NAMES[1:]}
    # The scales are checked, reduced and combined on the host while the gathers run; a bad value (PrepError
    # naming the input) discards the fresh outputs, so nothing the caller sees was written.
    out.update(_on_device(prep.scalars(scales()), out["w13_weight"].device))
    return PreparedLayer({name: out[name] for name in PREPARED_NAMES}, prep.record)
