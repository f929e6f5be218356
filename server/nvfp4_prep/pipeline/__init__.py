"""NVFP4 fused-MoE weight preparation as pure functions over torch tensors.

No gRPC here: the service wraps these functions, and tests and ``verify`` call
them directly. See ``shared/SPEC.md`` for the layout contract, ``nvfp4_prep.contract`` for its names.
"""

from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.mma_view import mma_view

from .assemble import assemble_layer
from .merge import merge_shards
from .prepare import Preparation, PreparedLayer, cut_shard, preparation, prepare
from .quantized_prepare import prepare_quantized, split_quantize_inputs
from .unprepare import unprepare

# PrepError and mma_view belong to the contract (the SDK needs them without the pipeline); they are
# re-exported because every caller of prepare() uses them.
__all__ = [
    "PrepError", "Preparation", "PreparedLayer", "assemble_layer", "cut_shard", "merge_shards", "mma_view",
    "preparation", "prepare", "prepare_quantized", "split_quantize_inputs", "unprepare",
]
