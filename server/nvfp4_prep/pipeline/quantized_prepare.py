"""prepare_quantized(): high-precision MoE experts and their activation scales to one backend's layout, in one pass.

``quantize.quantize_layer`` gives the stacked NVFP4 layer that the recipe's tool would have stored (byte for
byte), and ``prepare`` lays it out, so the answer is preparing the tool's checkpoint: the layout id stays that
one's, and the layout record adds the recipe and the source dtype (``quantized_record``). A rank's shard is cut
after quantizing (``prepare``'s ``inputs="layer"``): an expert's global scale is over all of its gate and up
rows, so quantizing only a tensor-parallel slice of them would give other bytes; cutting the quantized layer is
exact for TP and EP (rows keep their blocks, and I / tp_size is a multiple of the 16-value block).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.expert_keys import looks_per_expert, parse_expert_key

from .layout import quantized_record
from .prepare import PreparedLayer, prepare
from .quantize import quantize_layer
from .quantize.input_scales import MISSING
from .quantize.weights import STACKED_WEIGHTS
from .validate import check_choice


def split_quantize_inputs(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                        dict[str, torch.Tensor]]:
    """(weights, activation scales) of one set of tensors, by name: ``w13_weight``/``w2_weight`` and per-expert
    ``<e>.<proj>.weight`` are weights, everything else is taken for a scale (and refused by name if it is not)."""
    weights, scales = {}, {}
    for name, tensor in tensors.items():
        parsed = parse_expert_key(name) if looks_per_expert(name) else None
        is_weight = name in STACKED_WEIGHTS or (parsed is not None and parsed.leaf == "weight")
        (weights if is_weight else scales)[name] = tensor
    return weights, scales


def _missing_scales(weights: Mapping[str, torch.Tensor]) -> PrepError:
    """The error for a request with no activation scales at all, naming the first one it lacks."""
    order = ("gate", "up", "down")
    parsed = [key for key in (parse_expert_key(name) for name in weights if looks_per_expert(name)) if key]
    if parsed:
        first = min(parsed, key=lambda key: order.index(key.role))
        return PrepError(f"0.{first.projection}.input_scale", "is missing", MISSING)
    return PrepError("w13_input_scale", "is missing", MISSING)


def prepare_quantized(
    weights: Mapping[str, torch.Tensor],
    recipe: str,
    input_scales: Mapping[str, torch.Tensor] | None,
    backend: str,
    activation: str = "swiglu",
    input_scale_policy: str = "max",
    **options: object,
) -> PreparedLayer:
    """Quantize ``weights`` (bf16, fp16 or fp32: stacked ``w13_weight [E, N1, H]`` and ``w2_weight [E, H, I]``, or
    per-expert ``<e>.<proj>.weight``) by ``recipe`` with ``input_scales`` (see ``quantize.input_scales``; every
    backend is W4A4, so they are required), then ``prepare`` for ``backend`` with ``options`` (profile, shard;
    ``inputs`` must be ``"layer"``: the whole layer is quantized, then its shard cut). PrepError naming the field."""
    inputs = options.pop("inputs", "layer")
    check_choice("inputs", inputs, ("layer",))
    if not input_scales:
        raise _missing_scales(weights)
    stacked = quantize_layer(weights, recipe, input_scales, activation=activation)
    prepared = prepare(stacked, backend, activation, input_scale_policy, **options)
    del stacked
    source_dtype = next(iter(weights.values())).dtype
    return PreparedLayer(prepared.tensors, quantized_record(prepared.layout, recipe, source_dtype))
