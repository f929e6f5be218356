"""NVFP4 fused-MoE weight preparation as pure functions over torch tensors.

No gRPC here: the service wraps these functions, and tests and ``verify`` call
them directly. See ``shared/SPEC.md`` for the layout contract.
"""

from .assemble import assemble_layer
from .errors import PrepError
from .layout import (
    ACTIVATIONS, BACKENDS, DERIVED_NAMES, EPILOGUE_TILE_M, FLASHINFER_LAYOUT_VERSION, INPUT_SCALE_POLICIES,
    PIPELINE_VERSION, PREPARED_NAMES, SF_VEC_SIZE, STACKED_NAMES, layout_id,
)
from .prepare import PreparedLayer, prepare
from .swizzle import mma_view
from .unprepare import unprepare

__all__ = [
    "ACTIVATIONS", "BACKENDS", "DERIVED_NAMES", "EPILOGUE_TILE_M", "FLASHINFER_LAYOUT_VERSION",
    "INPUT_SCALE_POLICIES", "PIPELINE_VERSION", "PREPARED_NAMES", "SF_VEC_SIZE", "STACKED_NAMES",
    "PrepError", "PreparedLayer", "assemble_layer", "layout_id", "mma_view", "prepare", "unprepare",
]
