"""vLLM 0.33.0 integration: ``register()``, the ``vllm.general_plugins`` entry point, adds ``--load-format nvfp4_prep``
and the quantization method ``nvfp4_prep`` that a prepared folder's config.json names (``vllm serve DIR``).

vLLM calls every general plugin once in each of its processes; vLLM itself is imported only here, when it runs.
"""

from __future__ import annotations

import logging

LOAD_FORMAT = "nvfp4_prep"

log = logging.getLogger(__name__)
_registered = False


def register() -> None:
    """Register ``PreparedModelLoader`` under ``--load-format nvfp4_prep`` and ``PreparedQuantConfig`` under the
    quantization method ``nvfp4_prep`` (once per process)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.model_loader import register_model_loader

    from nvfp4_prep.prepared.prepared_config import QUANT_METHOD

    from .loader import PreparedModelLoader
    from .quant_config import PreparedQuantConfig

    register_model_loader(LOAD_FORMAT)(PreparedModelLoader)
    register_quantization_config(QUANT_METHOD)(PreparedQuantConfig)
    _registered = True
    log.debug("registered the %s model loader and quantization method", LOAD_FORMAT)
