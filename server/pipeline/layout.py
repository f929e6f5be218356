"""Names, versions and the layout record that tags every prepared layer.

A loader compares the record (or its ``layout_id``) with what its kernel
expects, so a layout produced for another backend or pipeline version is never
used silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BACKENDS = ("flashinfer_cutedsl", "flashinfer_cutlass", "flashinfer_trtllm", "vllm_cutlass")
ACTIVATIONS = ("swiglu", "swigluoai", "relu2")
GATED_ACTIVATIONS = ("swiglu", "swigluoai")
INPUT_SCALE_POLICIES = ("max", "strict")

STACKED_NAMES = (
    "w13_weight", "w13_weight_scale", "w13_weight_scale_2", "w13_input_scale",
    "w2_weight", "w2_weight_scale", "w2_weight_scale_2", "w2_input_scale",
)
DERIVED_NAMES = ("g1_alphas", "g2_alphas", "a1_gscale", "a2_gscale", "g1_scale_c")
PREPARED_NAMES = STACKED_NAMES + DERIVED_NAMES

# Bumped whenever any output byte of any backend changes.
PIPELINE_VERSION = "1"
# The FlashInfer release line whose kernels read these layouts (checked
# against the helpers of FlashInfer 0.7.2).
FLASHINFER_LAYOUT_VERSION = "0.7"
EPILOGUE_TILE_M = 128
SF_VEC_SIZE = 16


def layout_id(backend: str) -> str:
    """The layout version string for ``backend`` that clients ask for and check."""
    return (
        f"{backend}/fi{FLASHINFER_LAYOUT_VERSION}/t{EPILOGUE_TILE_M}"
        f"/sf{SF_VEC_SIZE}/p{PIPELINE_VERSION}"
    )


def round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


@dataclass(frozen=True)
class LayerDims:
    """Logical sizes of one MoE layer and the padded sizes a backend needs."""

    num_experts: int
    hidden: int
    intermediate: int
    gated: bool
    hidden_padded: int
    intermediate_padded: int

    @property
    def n1(self) -> int:
        return 2 * self.intermediate if self.gated else self.intermediate

    @property
    def n1_padded(self) -> int:
        return 2 * self.intermediate_padded if self.gated else self.intermediate_padded


def padded_dims(backend: str, num_experts: int, hidden: int, intermediate: int, gated: bool) -> LayerDims:
    """SPEC P9 and the CUTLASS non-gated padding: the sizes each backend writes."""
    hidden_padded, intermediate_padded = hidden, intermediate
    if backend == "flashinfer_trtllm":
        hidden_padded = round_up(hidden, 256)
        intermediate_padded = round_up(intermediate, 64 if gated else 128)
    elif backend in ("flashinfer_cutlass", "vllm_cutlass") and not gated:
        intermediate_padded = round_up(intermediate, 128)
    return LayerDims(num_experts, hidden, intermediate, gated, hidden_padded, intermediate_padded)


def layout_record(backend: str, activation: str, policy: str, dims: LayerDims) -> dict:
    """The JSON-serialisable record sent with, and stored beside, every prepared layer."""
    return {
        "layout_id": layout_id(backend),
        "backend": backend,
        "activation": activation,
        "input_scale_policy": policy,
        "pipeline_version": PIPELINE_VERSION,
        "flashinfer_layout_version": FLASHINFER_LAYOUT_VERSION,
        "epilogue_tile_m": EPILOGUE_TILE_M,
        "sf_vec_size": SF_VEC_SIZE,
        "num_experts": dims.num_experts,
        "hidden_dim": dims.hidden_padded,
        "hidden_dim_unpadded": dims.hidden,
        "intermediate_dim": dims.intermediate_padded,
        "intermediate_dim_unpadded": dims.intermediate,
    }
