"""How many bytes a request will hold on its device, known before any tensor arrives.

Admission control reserves this up front: the received tensors, the stacked
copy that per-expert tensors are assembled into, and the prepared outputs,
whose padded sizes follow from the shapes in the header. A layer quantized first
(``quantize``) also holds its NVFP4 form and the quantizer's float32 temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from nvfp4_prep.contract.expert_keys import parse_expert_key
from nvfp4_prep.contract.layout import (
    ALL_ACTIVATIONS,
    BACKENDS,
    DEFAULT_PROFILE,
    DERIVED_NAMES,
    GATED_ACTIVATIONS,
    STACKED_NAMES,
)
from nvfp4_prep.pipeline.layout import padded_dims
from nvfp4_prep.pipeline.quantize.layer import CHUNK_ELEMENTS
from nvfp4_prep.pipeline.swizzle import tiled_shape
from nvfp4_prep.wire import TensorSpec

# The per-expert leaves that hold weights (ModelOpt, compressed-tensors).
_WEIGHT_LEAVES = ("weight", "weight_packed")
_FLOAT32_BYTES = 4
# Bytes per weight the quantizer holds at once over one chunk of experts: the float32 quotients and their
# magnitudes, two int32 bucketize results and the absolute values (``pipeline.quantize.layer``, ``e2m1``).
QUANTIZE_TEMP_BYTES_PER_WEIGHT = 20
# Bytes of NVFP4 per weight: half a byte of E2M1 and one float8 block scale per 16 weights.
NVFP4_BYTES_PER_WEIGHT = 0.5 + 1 / 16


def _dims(specs: Sequence[TensorSpec], per_expert: bool, packed: bool = True) -> tuple[int, int, int, int] | None:
    """(E, N1, H, I) from the weight shapes (two FP4 values a byte when ``packed``, else one a element), or None
    when the header is too malformed to tell."""
    shapes = {spec.name: spec.shape for spec in specs}
    per_byte = 2 if packed else 1
    if not per_expert:
        w13, w2 = shapes.get("w13_weight"), shapes.get("w2_weight")
        if w13 is None or w2 is None or len(w13) != 3 or len(w2) != 3:
            return None
        return w13[0], w13[1], per_byte * w13[2], per_byte * w2[2]
    experts: set[int] = set()
    first = down = None
    for name, shape in shapes.items():
        key = parse_expert_key(name)
        if key is not None and key.leaf in _WEIGHT_LEAVES and len(shape) == 2:
            experts.add(key.expert)
            # A non-gated (relu2) layer has only the up projection; a gated one has both, of the same shape.
            if key.role != "down":
                first = shape
            else:
                down = shape
    if first is None or down is None:
        return None
    # N1 as for a gated pair: prepared_bytes reads N1 only for stacked layers, and pads from H, I and the activation.
    return len(experts), 2 * first[0], per_byte * first[1], per_byte * down[1]


def prepared_bytes(specs: Sequence[TensorSpec], per_expert: bool, backend: str, activation: str,
                   profile: str = DEFAULT_PROFILE, *, packed: bool = True) -> int | None:
    """Bytes of the prepared layer (with the profile's paddings), or None when the shapes do not describe a layer;
    ``packed`` False: the weights are high-precision ones to quantize (one value an element).

    For a shard of a whole streamed layer this is the whole layer's: an over-estimate of the rank's outputs.
    """
    dims = _dims(specs, per_expert, packed)
    if dims is None or backend not in BACKENDS or activation not in ALL_ACTIVATIONS:
        return None
    experts, n1, hidden, inter = dims
    gated = activation in GATED_ACTIVATIONS
    if not per_expert and not gated:
        inter = n1
    if min(experts, hidden, inter) <= 0:
        return None
    padded = padded_dims(backend, experts, hidden, inter, gated, profile=profile)
    hidden_p, inter_p = padded.hidden_padded, padded.intermediate_padded
    n1_p = padded.n1_padded
    per_expert_bytes = (
        n1_p * hidden_p // 2 + math.prod(tiled_shape(n1_p, hidden_p // 16))
        + hidden_p * inter_p // 2 + math.prod(tiled_shape(hidden_p, inter_p // 16))
    )
    scalars = (len(STACKED_NAMES) - 4 + len(DERIVED_NAMES)) * _FLOAT32_BYTES
    return experts * (per_expert_bytes + scalars)


def _is_weight_to_quantize(name: str) -> bool:
    key = parse_expert_key(name)
    return name in ("w13_weight", "w2_weight") or (key is not None and key.leaf == "weight")


def quantize_bytes(specs: Sequence[TensorSpec], per_expert: bool) -> int:
    """Bytes quantizing holds beside its inputs: the stacked copy of per-expert weights, the NVFP4 layer, and
    the temporaries of one chunk of experts (``CHUNK_ELEMENTS`` weights, or one expert's group if larger)."""
    weights = [spec for spec in specs if _is_weight_to_quantize(spec.name)]
    weight_bytes = sum(spec.byte_length for spec in weights)
    elements = sum(math.prod(spec.shape) for spec in weights)
    largest_group = max((math.prod(spec.shape[-2:]) * (2 if per_expert else 1) for spec in weights), default=0)
    chunk = min(elements, max(CHUNK_ELEMENTS, largest_group))
    return ((weight_bytes if per_expert else 0) + math.ceil(elements * NVFP4_BYTES_PER_WEIGHT)
            + chunk * QUANTIZE_TEMP_BYTES_PER_WEIGHT)


def reservation_bytes(specs: Sequence[TensorSpec], per_expert: bool, backend: str, activation: str,
                      profile: str = DEFAULT_PROFILE, *, quantize: bool = False) -> int:
    """Bytes to reserve for one request: inputs, an assembled copy if per-expert, outputs; with ``quantize``
    (high-precision inputs), what quantizing holds (``quantize_bytes``) in place of the assembled copy."""
    inputs = sum(spec.byte_length for spec in specs)
    outputs = prepared_bytes(specs, per_expert, backend, activation, profile, packed=not quantize)
    # Malformed shapes fail validation before any output is allocated; inputs bound what they hold.
    if outputs is None:
        outputs = inputs
    if quantize:
        return inputs + quantize_bytes(specs, per_expert) + outputs
    return inputs * (2 if per_expert else 1) + outputs
