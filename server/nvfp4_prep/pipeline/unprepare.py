"""unprepare(): prepared tensors back to the stacked checkpoint form, padding removed.

The inverse of every backend; ``verify`` and the round-trip tests rest on it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.layout import ACTIVATIONS, BACKENDS, GATED_ACTIVATIONS, INPUT_SCALE_POLICIES, PIPELINE_VERSION
from nvfp4_prep.contract.tensor_bytes import dense

from . import gather
from .layout import padded_dims
from .plan import GatherPlan, layer_plan
from .validate import check_choice

_LAYOUT_KEYS = ("backend", "activation", "num_experts", "hidden_dim", "hidden_dim_unpadded",
                "intermediate_dim", "intermediate_dim_unpadded", "pipeline_version")


def _layout_int(layout: Mapping, key: str) -> int:
    value = layout[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PrepError(f"layout.{key}", f"is {value!r}", "a positive integer")
    return value


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


def unprepare(tensors: Mapping[str, torch.Tensor], layout: Mapping) -> dict[str, torch.Tensor]:
    """The stacked form (STACKED_NAMES) of a prepared layer described by ``layout``."""
    for key in _LAYOUT_KEYS:
        if key not in layout:
            raise PrepError(f"layout.{key}", "is missing", "a layout record made by prepare()")
    backend, activation = layout["backend"], layout["activation"]
    check_choice("layout.backend", backend, BACKENDS)
    check_choice("layout.activation", activation, ACTIVATIONS)
    check_choice("layout.input_scale_policy", layout.get("input_scale_policy", "max"), INPUT_SCALE_POLICIES)
    if str(layout["pipeline_version"]) != PIPELINE_VERSION:
        raise PrepError("layout.pipeline_version", f"is {layout['pipeline_version']!r}", f"{PIPELINE_VERSION!r}")
    experts = _layout_int(layout, "num_experts")
    hidden = _layout_int(layout, "hidden_dim_unpadded")
    inter = _layout_int(layout, "intermediate_dim_unpadded")
    dims = padded_dims(backend, experts, hidden, inter, activation in GATED_ACTIVATIONS)
    if (layout["hidden_dim"], layout["intermediate_dim"]) != (dims.hidden_padded, dims.intermediate_padded):
        raise PrepError("layout.hidden_dim", f"padded sizes {layout['hidden_dim']}, {layout['intermediate_dim']}",
                        f"{dims.hidden_padded}, {dims.intermediate_padded} for {backend}")
    plan = layer_plan(backend, activation, dims)

    out = {
        "w13_weight": _restored("w13_weight", plan.w13, tensors, plan.w13_shape, (dims.n1, hidden // 2), experts),
        "w13_weight_scale": _restored("w13_weight_scale", plan.s13, tensors, plan.s13_shape,
                                      (dims.n1, hidden // 16), experts).view(torch.float8_e4m3fn),
        "w2_weight": _restored("w2_weight", plan.w2, tensors, plan.w2_shape, (hidden, inter // 2), experts),
        "w2_weight_scale": _restored("w2_weight_scale", plan.s2, tensors, plan.s2_shape,
                                     (hidden, inter // 16), experts).view(torch.float8_e4m3fn),
    }
    for name in ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale"):
        if name not in tensors:
            raise PrepError(name, "is missing", "every prepared tensor")
        if tuple(tensors[name].shape) != (experts,):
            raise PrepError(name, f"has shape {list(tensors[name].shape)}", str([experts]))
        out[name] = dense(tensors[name])
    return out
