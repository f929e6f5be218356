"""How ``config.json`` reads in a prepared checkpoint.

Decision: ``quantization_config`` stays exactly as in the source. The engine
still needs it to load the attention and other NVFP4 linears the usual way, and
the ModelOpt and compressed-tensors parsers validate it against their own schema,
so foreign keys there could be rejected or silently dropped. The prepared layout
is marked by a separate top-level object ``"nvfp4_prep"`` holding the layout
record's shared fields (layout_id, backend, activation, input-scale policy,
pipeline and FlashInfer layout versions, epilogue tile, scale vector size), the
tensor naming (SPEC section 7) and the manifest's file name. transformers keeps
unknown top-level keys as config attributes, so a loader reads
``config.nvfp4_prep``; a loader that does not know the key fails loudly on the
expert tensor names instead of misreading prepared bytes. ``hf_quant_config.json``
is copied unchanged.
"""

from __future__ import annotations

import json

from .manifest import MANIFEST_NAME

CONFIG_MARKER_KEY = "nvfp4_prep"
TENSOR_NAMING = "SPEC section 7: <experts prefix>.{w13,w2}_{weight,weight_scale,weight_scale_2,input_scale}, " \
                "g1_alphas, g2_alphas, a1_gscale, a2_gscale, g1_scale_c"


def marker(shared_layout: dict) -> dict:
    return {"prepared": True, **shared_layout, "tensor_names": TENSOR_NAMING, "manifest": MANIFEST_NAME}


def prepared_config_bytes(source_config: bytes, shared_layout: dict) -> bytes:
    """The source config.json with the prepared-layout marker added."""
    config = json.loads(source_config.decode("utf-8"))
    config[CONFIG_MARKER_KEY] = marker(shared_layout)
    return (json.dumps(config, indent=2) + "\n").encode("utf-8")
