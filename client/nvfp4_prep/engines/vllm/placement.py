"""Puts checked prepared tensors on a vLLM layer and runs vLLM's post-load step in its pre-processed mode.

Each placed tensor goes through vLLM's own ``replace_parameter``: copied into the parameter where shape and
dtype already match (its storage stays), rebound where the prepared shape is the post-load one (padded sizes,
per-expert scalars), as vLLM's normal post-load step does. vLLM's model-wide post-load loop then calls the
layer's ``process_weights_after_loading``; ``defer_post_load`` makes that one call run under vLLM's
``weights_already_processed`` (so the method only restores the padded sizes and builds its kernel, preparing
nothing again) while every other layer is processed as usual, and then checks what vLLM derived.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from vllm.model_executor.utils import replace_parameter, weights_already_processed

from .checks import Expectation, PreparedLoadRefused
from .params import DERIVED, PLACED

_DERIVED_ON_LAYER = ("g1_scale_c",)  # the rest vLLM keeps on the method's quant config


def place(layer: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Each placed SPEC section 7 tensor onto the layer's parameter of the same name (checked beforehand)."""
    for name in PLACED:
        device = getattr(layer, name).device
        replace_parameter(layer, name, tensors[name].to(device))


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def check_derived(method: object, layer: torch.nn.Module, tensors: Mapping[str, torch.Tensor],
                  layout: Mapping, expected: Expectation) -> None:
    """What vLLM's post-load step derived (kernel scalars, padded sizes) against the prepared layer's."""
    for name in DERIVED:
        theirs = getattr(layer if name in _DERIVED_ON_LAYER else method.moe_quant_config, name)
        if not torch.equal(_bytes(theirs), _bytes(tensors[name])):
            raise PreparedLoadRefused(f"{expected.prefix}.{name}",
                                      "vLLM's post-load step derived other values than the prepared layer holds")
    for field, want in (layout.get("engine_config") or {}).items():
        have = getattr(layer.moe_config, field)
        if have != want:
            raise PreparedLoadRefused(f"{expected.prefix}: moe_config.{field}",
                                      f"vLLM restored {have!r}, the layout record says {want!r}")


def defer_post_load(method: object, tensors: Mapping[str, torch.Tensor], layout: Mapping,
                    expected: Expectation) -> None:
    """Make the method's next ``process_weights_after_loading`` the pre-processed one, then check it."""
    derived = {name: tensors[name] for name in DERIVED}

    def process_weights_after_loading(layer: torch.nn.Module) -> None:
        del method.process_weights_after_loading  # later calls (a reload) are vLLM's own again
        with weights_already_processed():
            type(method).process_weights_after_loading(method, layer)
        check_derived(method, layer, derived, layout, expected)

    method.process_weights_after_loading = process_weights_after_loading
