"""Backends, profiles, activations, tensor names and the versions that tag every prepared layer (SPEC sections 5-11).

A loader compares a layer's layout record (or its ``layout_id``) with what its kernel expects, so a layout
produced for another backend, engine version, shard or pipeline version is never used silently.
"""

from __future__ import annotations

BACKENDS = ("flashinfer_cutedsl", "flashinfer_cutlass", "flashinfer_trtllm", "vllm_cutlass")

# SPEC section 10: which engine version's bytes. "seed" is the default everywhere a backend is chosen.
PROFILES = ("seed", "vllm-0.33")
DEFAULT_PROFILE = "seed"

# The seed profile's activations (what the service offered before profiles; the default set).
ACTIVATIONS = ("swiglu", "swigluoai", "relu2")
# Every activation name of any profile, each meaning what it means to vLLM 0.33.0: ``swigluoai`` rows are
# gpt-oss's interleaved ``[g0, u0, g1, u1, ...]``, ``swigluoai_uninterleave`` the same math on ``[gate; up]``.
ALL_ACTIVATIONS = ("swiglu", "swigluoai", "swigluoai_uninterleave", "relu2")
GATED_ACTIVATIONS = ("swiglu", "swigluoai", "swigluoai_uninterleave")
INTERLEAVED_ACTIVATIONS = ("swigluoai",)
INPUT_SCALE_POLICIES = ("max", "strict")
# Recipes that quantize high-precision (BF16, FP16, FP32) experts to NVFP4 before preparing, each byte for byte
# one tool's: NVIDIA ModelOpt 0.47 NVFP4_DEFAULT_CFG and llm-compressor 0.14 (compressed-tensors NVFP4); the
# formulas are in nvfp4_prep.pipeline.quantize.recipes. The prepared bytes equal preparing that tool's checkpoint,
# so the layout id does not name the recipe; the layout record does (``quantize_recipe``, ``quantized_from``).
QUANTIZE_RECIPES = ("modelopt", "llm-compressor")
# The layout record's keys that only a quantized layer has (absent otherwise): its recipe, and the torch dtype
# name of the weights it quantized.
QUANTIZED_LAYOUT_KEYS = ("quantize_recipe", "quantized_from")

# The (backend -> activations) each profile runs; vLLM 0.33.0's TRT-LLM experts refuse interleaved swigluoai
# (trtllm_nvfp4_moe.py _supports_activation).
PROFILE_ACTIVATIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "seed": dict.fromkeys(BACKENDS, ACTIVATIONS),
    "vllm-0.33": {
        "flashinfer_cutedsl": ALL_ACTIVATIONS,
        "flashinfer_cutlass": ALL_ACTIVATIONS,
        "flashinfer_trtllm": ("swiglu", "swigluoai_uninterleave", "relu2"),
        "vllm_cutlass": ALL_ACTIVATIONS,
    },
}

# SPEC section 11: vLLM's expert placements for expert parallelism.
EXPERT_PLACEMENTS = ("linear", "round_robin")

# CuteDSL gated FC1 row grouping: 64 (FlashInfer 0.7.2) or 16 (FlashInfer 0.7.4's swap-AB kernels).
GATED_GROUP_SIZES = (64, 16)
DEFAULT_GATED_GROUP_SIZE = 64

STACKED_NAMES = (
    "w13_weight", "w13_weight_scale", "w13_weight_scale_2", "w13_input_scale",
    "w2_weight", "w2_weight_scale", "w2_weight_scale_2", "w2_input_scale",
)
# The per-expert scale tensors of the stacked form: a few floats per expert, which the derived scalars need first.
STACKED_SCALE_NAMES = ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale")
DERIVED_NAMES = ("g1_alphas", "g2_alphas", "a1_gscale", "a2_gscale", "g1_scale_c")
PREPARED_NAMES = STACKED_NAMES + DERIVED_NAMES

# Bumped whenever any output byte of any backend changes for an existing (profile, options) choice.
PIPELINE_VERSION = "1"
# The FlashInfer release line whose kernels read these layouts; the exact release is flashinfer_release().
FLASHINFER_LAYOUT_VERSION = "0.7"
# Exact FlashInfer releases a layout can target (SPEC section 10).
FLASHINFER_RELEASES = ("0.7.2", "0.7.2.post1", "0.7.4")
EPILOGUE_TILE_M = 128
SF_VEC_SIZE = 16
PADDING_FILL_BYTE = 0x00


def backend_activations(profile: str, backend: str) -> tuple[str, ...]:
    """The activations ``profile`` runs on ``backend`` (empty for an unknown pair)."""
    return PROFILE_ACTIVATIONS.get(profile, {}).get(backend, ())


def flashinfer_release(profile: str = DEFAULT_PROFILE, gated_group_size: int = DEFAULT_GATED_GROUP_SIZE) -> str:
    """The exact FlashInfer release whose kernels read the bytes.

    The seed and vLLM 0.33.0 (its pin) target 0.7.2.post1; the 16-row CuteDSL grouping exists from 0.7.4.
    """
    return "0.7.4" if gated_group_size == 16 else "0.7.2.post1"


def layout_id(
    backend: str,
    *,
    profile: str = DEFAULT_PROFILE,
    activation: str = "swiglu",
    policy: str = "max",
    gated_group_size: int = DEFAULT_GATED_GROUP_SIZE,
    tp_rank: int = 0,
    tp_size: int = 1,
    ep_rank: int = 0,
    ep_size: int = 1,
    expert_placement: str = "linear",
) -> str:
    """The compact, deterministic name of everything that changes a prepared layer's bytes.

    e.g. ``flashinfer_cutedsl/vllm-0.33/fi0.7.2.post1/swiglu/max/g64/t128/sf16/p1/tp0of2/ep1of4-linear``;
    the shard part is present only for a shard (``tp_size`` or ``ep_size`` above 1).
    """
    parts = [backend, profile, f"fi{flashinfer_release(profile, gated_group_size)}", activation, policy,
             f"g{gated_group_size}", f"t{EPILOGUE_TILE_M}", f"sf{SF_VEC_SIZE}", f"p{PIPELINE_VERSION}"]
    if tp_size > 1 or ep_size > 1:
        parts += [f"tp{tp_rank}of{tp_size}", f"ep{ep_rank}of{ep_size}-{expert_placement}"]
    return "/".join(parts)
