"""How ``config.json`` reads in a prepared checkpoint: a quantization config that stock loaders refuse.

Decision: ``quantization_config`` becomes ``{"quant_method": "nvfp4_prep", "layout_id": ..., "manifest": ...,
"original_quantization_config": {...}}``. The expert tensors hold prepared bytes under SPEC section 7 names; a
stock loader that took the folder for the ModelOpt or compressed-tensors checkpoint it came from would fail
late or, worse, prepare the prepared bytes again. An unknown ``quant_method`` is refused up front: vLLM 0.33.0's
``ModelConfig`` says "Unknown quantization method: nvfp4_prep" and transformers' ``AutoQuantizationConfig.from_dict``
"Unknown quantization type, got nvfp4_prep". (transformers' ``from_pretrained`` only warns and loads unquantized,
which then fails on the missing per-expert weights, not on prepared bytes.)

The source's own quantization config (needed for the attention and other NVFP4 linears) travels inside the guard
as ``original_quantization_config`` (absent when the source had none), because an engine hands a registered
quantization method only the ``quantization_config`` object (vLLM: ``QuantizationConfig.from_config``); our vLLM
plugin's ``nvfp4_prep`` method builds vLLM's own ModelOpt config from it. A ModelOpt source whose config.json has
no quantization config keeps its ``hf_quant_config.json`` (the file vLLM would have read instead) there as
``original_hf_quant_config``. ``original_config`` restores the source's config.json exactly. The top-level
``"nvfp4_prep"`` object is the layout record's shared fields, the engine versions the bytes were made for
(``engine_versions``), the tensor naming and the manifest's file name.

ModelOpt's ``hf_quant_config.json`` is renamed to ``nvfp4_prep_original_hf_quant_config.json`` (bytes
unchanged): vLLM 0.33.0 reads that file as the quantization config whenever config.json has none
(``transformers_utils/config.py``) and ModelOpt's ``get_config_filenames`` makes its file-based fallback
look for it by name; TensorRT-LLM and older engines read it first. Under its original name it would
announce a plain ModelOpt checkpoint.
"""

from __future__ import annotations

import copy
import json

from nvfp4_prep.checkpoint.errors import CheckpointInvalid

from .manifest import MANIFEST_NAME

CONFIG_MARKER_KEY = "nvfp4_prep"
QUANT_METHOD = "nvfp4_prep"
QUANTIZATION_KEY = "quantization_config"
ORIGINAL_QUANTIZATION_KEY = "original_quantization_config"
ORIGINAL_HF_QUANT_KEY = "original_hf_quant_config"
HF_QUANT_CONFIG_NAME = "hf_quant_config.json"
# Source files that would make a stock loader take the folder for its source, and their names here.
RENAMED_FILES = {HF_QUANT_CONFIG_NAME: "nvfp4_prep_original_hf_quant_config.json"}
# The engine release each profile's bytes are exactly what that engine's own post-load step leaves.
PROFILE_ENGINES = {"seed": {}, "vllm-0.33": {"vllm": "0.33.0"}}
TENSOR_NAMING = "SPEC section 7: <experts prefix>.{w13,w2}_{weight,weight_scale,weight_scale_2,input_scale}, " \
                "g1_alphas, g2_alphas, a1_gscale, a2_gscale, g1_scale_c"


def prepared_file_name(source_name: str) -> str:
    """The name a small file of the source gets in the prepared folder."""
    return RENAMED_FILES.get(source_name, source_name)


def engine_versions(shared_layout: dict) -> dict[str, str]:
    """Engine name -> release the layout was made for: the profile's engine, and FlashInfer."""
    return {**PROFILE_ENGINES.get(shared_layout.get("profile"), {}),
            "flashinfer": shared_layout.get("flashinfer_release")}


def marker(shared_layout: dict) -> dict:
    """The ``"nvfp4_prep"`` object the layout record implies."""
    return {"prepared": True, **shared_layout, "engine_versions": engine_versions(shared_layout),
            "tensor_names": TENSOR_NAMING, "manifest": MANIFEST_NAME}


def layout_guard(shared_layout: dict) -> dict:
    """The guard's fields the layout record implies: a method no stock loader knows, the layout, the manifest."""
    return {"quant_method": QUANT_METHOD, "layout_id": shared_layout.get("layout_id"), "manifest": MANIFEST_NAME}


def guard(shared_layout: dict, source_config: dict, hf_quant_config: dict | None = None) -> dict:
    """The ``quantization_config`` of a prepared folder: ``layout_guard`` and the source's quantization config
    (``hf_quant_config``, the source's ``hf_quant_config.json``, only where its config.json has none)."""
    if QUANTIZATION_KEY in source_config:
        return {**layout_guard(shared_layout), ORIGINAL_QUANTIZATION_KEY: source_config[QUANTIZATION_KEY]}
    if hf_quant_config is not None:
        return {**layout_guard(shared_layout), ORIGINAL_HF_QUANT_KEY: hf_quant_config}
    return layout_guard(shared_layout)


def prepared_config_bytes(source_config: bytes, shared_layout: dict, hf_quant_config: bytes | None = None) -> bytes:
    """The source config.json with the guard in place of its quantization config and the marker added;
    ``hf_quant_config`` is the source's ``hf_quant_config.json``, when it has one."""
    config = json.loads(source_config.decode("utf-8"))
    kept = None
    if hf_quant_config is not None:
        try:
            kept = json.loads(hf_quant_config.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointInvalid(f"{HF_QUANT_CONFIG_NAME}: not valid JSON ({exc}); expected ModelOpt's "
                                    "quantization config") from None
    config[QUANTIZATION_KEY] = guard(shared_layout, config, kept)
    config[CONFIG_MARKER_KEY] = marker(shared_layout)
    return (json.dumps(config, indent=2) + "\n").encode("utf-8")


def guard_of(config: dict) -> dict:
    """The guard of a prepared config.json (parsed); CheckpointInvalid naming the field when there is none."""
    found = config.get(QUANTIZATION_KEY)
    if not isinstance(found, dict) or found.get("quant_method") != QUANT_METHOD:
        raise CheckpointInvalid(f"config.json {QUANTIZATION_KEY}: expected a prepared checkpoint's, whose "
                                f"quant_method is {QUANT_METHOD!r}; got {json.dumps(found)[:200]}")
    return found


def original_quantization(guard_config: dict) -> dict | None:
    """The source's quantization config a guard carries (config.json's, else hf_quant_config.json's); None
    when the source had none."""
    return guard_config.get(ORIGINAL_QUANTIZATION_KEY, guard_config.get(ORIGINAL_HF_QUANT_KEY))


def original_config(config: dict) -> dict:
    """A prepared config.json (parsed) as its source had it: quantization config restored, marker removed."""
    if not isinstance(config.get(CONFIG_MARKER_KEY), dict):
        raise CheckpointInvalid(f"config.json has no {CONFIG_MARKER_KEY!r} object; expected a prepared checkpoint's")
    found = guard_of(config)
    restored = copy.deepcopy(config)
    del restored[CONFIG_MARKER_KEY]
    if ORIGINAL_QUANTIZATION_KEY in found:
        restored[QUANTIZATION_KEY] = copy.deepcopy(found[ORIGINAL_QUANTIZATION_KEY])
    else:
        restored.pop(QUANTIZATION_KEY)
    return restored
