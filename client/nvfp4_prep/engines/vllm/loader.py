"""``--load-format nvfp4_prep``: vLLM's model, with each NVFP4 MoE layer's prepared bytes placed, not prepared again.

vLLM's ``BaseModelLoader.load_model`` builds the model as the default loader does, calls ``load_weights`` and
then the model-wide post-load step. ``load_weights`` here: checks vLLM's version and every ModelOpt NVFP4 MoE
layer (method, backend, the layout record of a prepared folder) before any byte moves; loads every other
tensor the usual way (``model.load_weights``); then per layer takes this rank's prepared tensors, checks
names, shapes and dtypes, places them, and defers that layer's post-load step to vLLM's pre-processed mode
(``placement``). Tensor- and expert-parallel ranks each read their own shard (vLLM's parallel state).
vLLM's model is a prepared folder (quantization ``nvfp4_prep``, ``quant_config``) or the source checkpoint
with a folder or server named in ``--model-loader-extra-config``; any other is refused (``source``).
"""

from __future__ import annotations

import copy
import logging

import vllm
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from .checks import Expectation, PreparedLoadRefused, check_layout, check_tensors, check_vllm_version
from .layer_state import expectation, is_nvfp4_moe
from .placement import defer_post_load, place
from .source import FolderSource, ServerSource, source_from_config, without_layers

log = logging.getLogger(__name__)


def nvfp4_moe_layers(model: nn.Module) -> list[tuple[str, RoutedExperts]]:
    """(prefix, layer) of each routed-experts layer vLLM quantized with an NVFP4 MoE method."""
    return [(module.layer_name, module) for _, module in model.named_modules()
            if isinstance(module, RoutedExperts) and is_nvfp4_moe(module.quant_method)]


class PreparedModelLoader(BaseModelLoader):
    """Loads a model whose ModelOpt NVFP4 MoE layers come prepared (``vllm-0.33`` profile, FlashInfer TRT-LLM)."""

    def __init__(self, load_config: LoadConfig, vllm_version: str = vllm.__version__) -> None:
        super().__init__(load_config)
        check_vllm_version(vllm_version)
        self._extra = dict(load_config.model_loader_extra_config or {})
        plain = copy.copy(load_config)
        plain.load_format, plain.model_loader_extra_config = "safetensors", {}
        self._default = DefaultModelLoader(plain)

    def download_model(self, model_config: ModelConfig) -> None:
        self._default.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        layers = nvfp4_moe_layers(model)
        if not layers:
            raise PreparedLoadRefused("model", "vLLM built no NVFP4 MoE layer; nothing to load prepared")
        expected = {}
        for prefix, layer in layers:
            expected[prefix] = expectation(layer, layer.quant_method, prefix)  # refuses methods and backends
        source = source_from_config(self._extra, model_config.model, model_config.quantization)
        try:
            source.open(next(iter(expected.values())))
            if isinstance(source, FolderSource):
                self._check_folder(source, expected)
                model.load_weights(source.other_weights())
            else:
                model.load_weights(without_layers(self._default.get_all_weights(model_config, model),
                                                  set(expected)))
            for prefix, layer in layers:
                self._place(source, layer, expected[prefix])
        finally:
            source.close()
        log.info("placed %d prepared MoE layers; vLLM's post-load step runs in its pre-processed mode for them",
                 len(layers))

    @staticmethod
    def _check_folder(source: FolderSource, expected: dict[str, Expectation]) -> None:
        """Every layer's record, and that the folder holds exactly the model's NVFP4 MoE layers."""
        prepared = source.prefixes()
        if prepared != set(expected):
            raise PreparedLoadRefused(
                "prepared layers", f"vLLM's model has NVFP4 MoE layers {sorted(set(expected) - prepared)} the folder "
                f"lacks, the folder has {sorted(prepared - set(expected))} the model lacks")
        for prefix, want in expected.items():
            check_layout(source.layout(prefix), want)

    @staticmethod
    def _place(source: FolderSource | ServerSource, layer: RoutedExperts, expected: Expectation) -> None:
        tensors, layout = source.layer(expected, str(layer.w13_weight.device))
        check_layout(layout, expected)
        check_tensors(tensors, expected)
        place(layer, tensors)
        defer_post_load(layer.quant_method, tensors, layout, expected)
