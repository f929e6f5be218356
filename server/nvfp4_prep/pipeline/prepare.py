"""prepare(): a stacked NVFP4 MoE layer to the layout of one kernel backend."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nvfp4_prep.contract.tensor_bytes import dense

from . import gather
from .layout import layout_record
from .plan import GatherPlan, layer_plan
from .scales import derived_scalars, input_scales, weight_scale_2
from .validate import validate


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
) -> PreparedLayer:
    """Prepare one layer for ``backend``; every check runs before any output is written."""
    dims = validate(tensors, backend, activation, input_scale_policy)
    a13, a2 = input_scales(tensors["w13_input_scale"], tensors["w2_input_scale"], backend, input_scale_policy)
    ws13 = weight_scale_2(tensors["w13_weight_scale_2"])
    ws2 = dense(tensors["w2_weight_scale_2"])
    plan = layer_plan(backend, activation, dims)

    out = {
        "w13_weight": _gathered(plan.w13, tensors["w13_weight"], plan.w13_shape),
        "w13_weight_scale": _gathered(plan.s13, tensors["w13_weight_scale"], plan.s13_shape).view(torch.float8_e4m3fn),
        "w13_weight_scale_2": ws13,
        "w13_input_scale": a13,
        "w2_weight": _gathered(plan.w2, tensors["w2_weight"], plan.w2_shape),
        "w2_weight_scale": _gathered(plan.s2, tensors["w2_weight_scale"], plan.s2_shape).view(torch.float8_e4m3fn),
        "w2_weight_scale_2": ws2,
        "w2_input_scale": a2,
    }
    # After the gathers are queued, so that the check's one device sync overlaps them instead of delaying
    # them; an overflow (PrepError naming the input) discards the fresh outputs.
    out.update(derived_scalars(ws13, a13, ws2, a2, dims.gated))
    return PreparedLayer(out, layout_record(backend, activation, input_scale_policy, dims))
