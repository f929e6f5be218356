"""Backends, activations, tensor names and the versions that tag every prepared layer (SPEC sections 5-7).

A loader compares a layer's layout record (or its ``layout_id``) with what its kernel expects, so a layout
produced for another backend or pipeline version is never used silently.
"""

from __future__ import annotations

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
# The FlashInfer release line whose kernels read these layouts (checked against the helpers of FlashInfer 0.7.2).
FLASHINFER_LAYOUT_VERSION = "0.7"
EPILOGUE_TILE_M = 128
SF_VEC_SIZE = 16


def layout_id(backend: str) -> str:
    """The layout version string for ``backend`` that clients ask for and check."""
    return f"{backend}/fi{FLASHINFER_LAYOUT_VERSION}/t{EPILOGUE_TILE_M}/sf{SF_VEC_SIZE}/p{PIPELINE_VERSION}"
