"""``quant_method: nvfp4_prep``: what lets vLLM take a prepared folder as the model (``vllm serve DIR``).

A prepared folder's ``quantization_config`` names ``nvfp4_prep`` so that stock vLLM refuses it; once our plugin
registers this class under that name, vLLM hands it that object (``from_config``), which carries the source's
own quantization config. The class is vLLM's ``ModelOptNvFp4Config`` built from that original, under our name:
every linear layer and the FusedMoE method (``ModelOptNvFp4FusedMoE``) are exactly ModelOpt's, and the loader
places the prepared MoE bytes. It refuses a compressed-tensors original (vLLM has no pre-processed mode for its
MoE method) and any load format but ours, which alone knows the expert tensors hold prepared bytes.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w4a4_nvfp4 import (  # noqa: E501
    CompressedTensorsW4A4Nvfp4MoEMethod,
)
from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config

from nvfp4_prep.prepared.prepared_config import (
    ORIGINAL_QUANTIZATION_KEY,
    QUANT_METHOD,
    QUANTIZATION_KEY,
    original_quantization,
)

from . import LOAD_FORMAT
from .checks import PROFILE, PreparedLoadRefused, no_pre_processed_mode

# What vLLM adds to the checkpoint's quantization config for ModelOpt configs (get_quant_config): passed on.
_VLLM_KEYS = ("_online_quantization_args",)
_ORIGINAL = f"{QUANTIZATION_KEY}.{ORIGINAL_QUANTIZATION_KEY}"


def _original(config: dict[str, Any]) -> dict[str, Any]:
    """The source's quantization config the guard carries, refused unless vLLM's ModelOpt NVFP4 config takes it."""
    original = original_quantization(config)
    if not isinstance(original, dict):
        raise PreparedLoadRefused(_ORIGINAL, f"expected the source's quantization config (a JSON object), got "
                                             f"{original!r}: vLLM builds its ModelOpt NVFP4 config from it, and the "
                                             f"{PROFILE} profile holds the layers of a ModelOpt NVFP4 checkpoint")
    method = str(original.get("quant_method", "")).lower().replace("_", "-")
    if method == "compressed-tensors":
        raise PreparedLoadRefused(_ORIGINAL, no_pre_processed_mode(
            CompressedTensorsW4A4Nvfp4MoEMethod.__name__,
            CompressedTensorsW4A4Nvfp4MoEMethod.supports_pre_processed_weights, compressed_tensors=True))
    return original


class PreparedQuantConfig(ModelOptNvFp4Config):
    """vLLM's ModelOpt NVFP4 config of the source checkpoint, under the name ``nvfp4_prep``."""

    guard: dict[str, Any] | None = None  # the prepared folder's quantization_config; set by from_config

    def get_name(self) -> str:
        return QUANT_METHOD

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> None:
        """Never claims another checkpoint (ModelOpt's override would claim every ModelOpt NVFP4 one)."""
        return None

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config is the whole of it

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PreparedQuantConfig:
        """ModelOpt's ``from_config`` of the original the guard carries (vLLM's own checks and messages)."""
        original = _original(config)
        try:
            built = super().from_config({**original, **{key: config[key] for key in _VLLM_KEYS if key in config}})
        except ValueError as exc:
            raise PreparedLoadRefused(_ORIGINAL, f"vLLM's ModelOpt NVFP4 config refuses it: {exc}") from None
        built.guard = {key: value for key, value in config.items() if key not in _VLLM_KEYS}
        return built

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        """ModelOpt's method for the layer, once the folder and the load format are known to be ours."""
        if self.guard is None:
            raise PreparedLoadRefused("quantization", f"{QUANT_METHOD} is the quantization method of a prepared "
                                      "folder's config.json, and vLLM built it without one; point vLLM at a "
                                      "prepared folder instead of passing --quantization nvfp4_prep")
        current = get_current_vllm_config_or_none()
        load_format = current.load_config.load_format if current is not None else LOAD_FORMAT
        if load_format != LOAD_FORMAT:
            raise PreparedLoadRefused("load_format", f"the model is a prepared folder (quantization {QUANT_METHOD}, "
                                      f"layout {self.guard.get('layout_id')}), whose expert tensors hold prepared "
                                      f"bytes; load it with --load-format {LOAD_FORMAT}, not {load_format!r}")
        return super().get_quant_method(layer, prefix)
