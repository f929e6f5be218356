"""How many bytes a request will hold on its device, known before any tensor arrives.

Admission control reserves this up front: the received tensors, the stacked
copy that per-expert tensors are assembled into, and the prepared outputs,
whose padded sizes follow from the shapes in the header.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from nvfp4_prep.contract.expert_keys import parse_expert_key
from nvfp4_prep.contract.layout import ACTIVATIONS, BACKENDS, DERIVED_NAMES, GATED_ACTIVATIONS, STACKED_NAMES
from nvfp4_prep.pipeline.layout import padded_dims
from nvfp4_prep.pipeline.swizzle import tiled_shape
from nvfp4_prep.wire import TensorSpec

# The per-expert leaves that hold weights (ModelOpt, compressed-tensors).
_WEIGHT_LEAVES = ("weight", "weight_packed")
_FLOAT32_BYTES = 4


def _dims(specs: Sequence[TensorSpec], per_expert: bool) -> tuple[int, int, int, int] | None:
    """(E, N1, H, I) from the weight shapes, or None when the header is too malformed to tell."""
    shapes = {spec.name: spec.shape for spec in specs}
    if not per_expert:
        w13, w2 = shapes.get("w13_weight"), shapes.get("w2_weight")
        if w13 is None or w2 is None or len(w13) != 3 or len(w2) != 3:
            return None
        return w13[0], w13[1], 2 * w13[2], 2 * w2[2]
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
    return len(experts), 2 * first[0], 2 * first[1], 2 * down[1]


def prepared_bytes(specs: Sequence[TensorSpec], per_expert: bool, backend: str, activation: str) -> int | None:
    """Bytes of the prepared layer, or None when the shapes do not describe a layer."""
    dims = _dims(specs, per_expert)
    if dims is None or backend not in BACKENDS or activation not in ACTIVATIONS:
        return None
    experts, n1, hidden, inter = dims
    gated = activation in GATED_ACTIVATIONS
    if not per_expert and not gated:
        inter = n1
    if min(experts, hidden, inter) <= 0:
        return None
    padded = padded_dims(backend, experts, hidden, inter, gated)
    hidden_p, inter_p = padded.hidden_padded, padded.intermediate_padded
    n1_p = padded.n1_padded
    per_expert_bytes = (
        n1_p * hidden_p // 2 + math.prod(tiled_shape(n1_p, hidden_p // 16))
        + hidden_p * inter_p // 2 + math.prod(tiled_shape(hidden_p, inter_p // 16))
    )
    scalars = (len(STACKED_NAMES) - 4 + len(DERIVED_NAMES)) * _FLOAT32_BYTES
    return experts * (per_expert_bytes + scalars)


def reservation_bytes(specs: Sequence[TensorSpec], per_expert: bool, backend: str, activation: str) -> int:
    """Bytes to reserve for one request: inputs, an assembled copy if per-expert, outputs."""
    inputs = sum(spec.byte_length for spec in specs)
    outputs = prepared_bytes(specs, per_expert, backend, activation)
    # Malformed shapes fail validation before any output is allocated; inputs bound what they hold.
    if outputs is None:
        outputs = inputs
    return inputs * (2 if per_expert else 1) + outputs
