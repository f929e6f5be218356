"""unprepare(): prepared tensors back to the stacked checkpoint form, padding removed.

The inverse of every backend and profile; a rank shard gives back the input shard (SPEC section 11), and
``merge_shards`` puts the shards of all ranks back together. ``verify`` and the round-trip tests rest on it.
Under profile ``vllm-0.33`` the global weight scales arrive fused with the input scales (vLLM's
``w13_weight_scale_2 = g1_alphas``); they are given back divided by the input scale, which is the nearest
float32 and not always the source's bits: compare those through the fused values instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.layout import DEFAULT_GATED_GROUP_SIZE, DEFAULT_PROFILE, GATED_ACTIVATIONS, PIPELINE_VERSION
from nvfp4_prep.contract.tensor_bytes import dense

from . import gather
from .layout import padded_dims
from .plan import GatherPlan, layer_plan
from .shard import Shard
from .validate import check_options

_LAYOUT_KEYS = ("backend", "activation", "num_experts", "hidden_dim", "hidden_dim_unpadded",
                "intermediate_dim", "intermediate_dim_unpadded", "pipeline_version")
# Records written before profiles and shards lack these keys; they then mean what prepare()'s defaults mean.
_OPTION_DEFAULTS = {"profile": DEFAULT_PROFILE, "gated_group_size": DEFAULT_GATED_GROUP_SIZE, "tp_rank": 0,
                    "tp_size": 1, "ep_rank": 0, "ep_size": 1, "expert_placement": "linear"}


def _layout_int(layout: Mapping, key: str) -> int:
    value = layout[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PrepError(f"layout.{key}", f"is {value!r}", "a positive integer")
    return value


def layout_options(layout: Mapping, overrides: Mapping[str, object] | None = None) -> dict:
    """The profile, group size and shard of a record; an override (a keyword of unprepare) must agree."""
    options = {}
    for key, default in _OPTION_DEFAULTS.items():
        value = layout.get(key, default)
        given = (overrides or {}).get(key)
        if given is not None and given != value:
            raise PrepError(key, f"is {given!r} but the layout record says {value!r}", f"{value!r} or no value")
        options[key] = value
    return options


def _restored(name: str, plan: GatherPlan, prepared: Mapping[str, torch.Tensor],
              per_expert: tuple[int, int], logical: tuple[int, int], experts: int) -> torch.Tensor:
    if name not in prepared:
        raise PrepError(name, "is missing", "every prepared tensor")
    tensor = prepared[name]
    if tuple(tensor.shape) != (experts, *per_expert):
        raise PrepError(name, f"has shape {list(tensor.shape)}", str([experts, *per_expert]))
    if not gather.padding_is_zero(plan, tensor):
        raise PrepError(name, "has non-zero padding bytes", "0x00 in every padding byte")
    return gather.invert(plan, tensor).view(torch.uint8).reshape(experts, *logical)


def _scalar(tensors: Mapping[str, torch.Tensor], name: str, experts: int) -> torch.Tensor:
    if name not in tensors:
        raise PrepError(name, "is missing", "every prepared tensor")
    if tuple(tensors[name].shape) != (experts,):
        raise PrepError(name, f"has shape {list(tensors[name].shape)}", str([experts]))
    return dense(tensors[name])


def unprepare(
    tensors: Mapping[str, torch.Tensor],
    layout: Mapping,
    *,
    profile: str | None = None,
    gated_group_size: int | None = None,
    tp_rank: int | None = None,
    tp_size: int | None = None,
    ep_rank: int | None = None,
    ep_size: int | None = None,
    expert_placement: str | None = None,
) -> dict[str, torch.Tensor]:
    """The stacked form (STACKED_NAMES) of a prepared layer or rank shard described by ``layout``.

    The keywords default to the record's values (or, for an old record without them, to prepare()'s
    defaults); one that is given must agree with the record.
    """
    for key in _LAYOUT_KEYS:
        if key not in layout:
            raise PrepError(f"layout.{key}", "is missing", "a layout record made by prepare()")
    options = layout_options(layout, {
        "profile": profile, "gated_group_size": gated_group_size, "tp_rank": tp_rank, "tp_size": tp_size,
        "ep_rank": ep_rank, "ep_size": ep_size, "expert_placement": expert_placement})
    backend, activation = layout["backend"], layout["activation"]
    check_options(backend, activation, layout.get("input_scale_policy", "max"), options["profile"],
                  options["gated_group_size"], prefix="layout.")
    Shard(options["tp_rank"], options["tp_size"], options["ep_rank"], options["ep_size"],
          options["expert_placement"]).check(prefix="layout.")
    if str(layout["pipeline_version"]) != PIPELINE_VERSION:
        raise PrepError("layout.pipeline_version", f"is {layout['pipeline_version']!r}", f"{PIPELINE_VERSION!r}")
    experts = _layout_int(layout, "num_experts")
    hidden = _layout_int(layout, "hidden_dim_unpadded")
    inter = _layout_int(layout, "intermediate_dim_unpadded")
    dims = padded_dims(backend, experts, hidden, inter, activation in GATED_ACTIVATIONS, profile=options["profile"])
    if (layout["hidden_dim"], layout["intermediate_dim"]) != (dims.hidden_padded, dims.intermediate_padded):
        raise PrepError("layout.hidden_dim", f"padded sizes {layout['hidden_dim']}, {layout['intermediate_dim']}",
                        f"{dims.hidden_padded}, {dims.intermediate_padded} for {backend}")
    plan = layer_plan(backend, activation, dims, options["profile"], options["gated_group_size"])

    out = {
        "w13_weight": _restored("w13_weight", plan.w13, tensors, plan.w13_shape, (dims.n1, hidden // 2), experts),
        "w13_weight_scale": _restored("w13_weight_scale", plan.s13, tensors, plan.s13_shape,
                                      (dims.n1, hidden // 16), experts).view(torch.float8_e4m3fn),
        "w2_weight": _restored("w2_weight", plan.w2, tensors, plan.w2_shape, (hidden, inter // 2), experts),
        "w2_weight_scale": _restored("w2_weight_scale", plan.s2, tensors, plan.s2_shape,
                                     (hidden, inter // 16), experts).view(torch.float8_e4m3fn),
    }
    for name in ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale"):
        out[name] = _scalar(tensors, name, experts)
    if options["profile"] == "vllm-0.33":
        out["w13_weight_scale_2"] = dense(out["w13_weight_scale_2"] / out["w13_input_scale"])
        out["w2_weight_scale_2"] = dense(out["w2_weight_scale_2"] / out["w2_input_scale"])
    return out
