"""Which NVFP4 checkpoint format a directory holds (SPEC section 2) and its module exclusions.

ModelOpt is recognised by ``hf_quant_config.json`` (``quantization.quant_algo ==
"NVFP4"``) or by a ``config.json`` quantization_config whose ``quant_method``
starts with ``modelopt``; compressed-tensors by ``quant_method ==
"compressed-tensors"`` with the ``nvfp4-pack-quantized`` format. A ``config.json``
without any quantization config is an unquantized (BF16, FP16 or FP32) checkpoint,
format ``bf16``, whose experts are quantized before they are prepared. The format
decides the per-projection tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CheckpointInvalid, shown
from .exclusions import Exclusions

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"
BF16 = "bf16"

# Per-projection tensor suffixes, in the order weight, block scale, global weight scale, input scale.
PROJECTION_SUFFIXES = {
    MODELOPT: ("weight", "weight_scale", "weight_scale_2", "input_scale"),
    COMPRESSED_TENSORS: ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"),
    BF16: ("weight",),
}

CT_NVFP4_FORMAT = "nvfp4-pack-quantized"
HF_QUANT_CONFIG = "hf_quant_config.json"
CONFIG = "config.json"


@dataclass(frozen=True)
class QuantFormat:
    """The detected format and the module names its config leaves unquantized."""

    name: str
    exclusions: Exclusions

    @property
    def suffixes(self) -> tuple[str, ...]:
        return PROJECTION_SUFFIXES[self.name]

    def excludes(self, module: str) -> bool:
        """True when ``module`` or a module above it matches an exclusion entry (see ``Exclusions``)."""
        return self.exclusions.excludes(module)


def _quant_format(name: str, value: object, where: str) -> QuantFormat:
    """The format with the exclusion list ``value`` (None: none), checked and compiled."""
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise CheckpointInvalid(f"{where}: expected a list of module names, found {type(value).__name__} "
                                "or a list with non-strings")
    return QuantFormat(name, Exclusions(value, where))


def _compressed_tensors_is_nvfp4(qconfig: dict) -> bool:
    if qconfig.get("format") == CT_NVFP4_FORMAT:
        return True
    groups = qconfig.get("config_groups")
    return isinstance(groups, dict) and any(
        isinstance(group, dict) and group.get("format") == CT_NVFP4_FORMAT for group in groups.values())


def detect_format(configs: dict[str, dict | None], directory: str) -> QuantFormat:
    """The format of the checkpoint in ``directory`` (named in messages), from its parsed config files
    (``config.json``, ``hf_quant_config.json``; None where absent)."""
    hf_quant, config = configs.get(HF_QUANT_CONFIG), configs.get(CONFIG)
    if hf_quant is None and config is None:
        raise CheckpointInvalid(
            f"{directory}: neither config.json nor hf_quant_config.json found; "
            "expected a Hugging Face checkpoint directory with its quantization config")

    if hf_quant is not None:
        quant = hf_quant.get("quantization")
        algo = quant.get("quant_algo") if isinstance(quant, dict) else None
        if algo == "NVFP4":
            return _quant_format(MODELOPT, quant.get("exclude_modules"),
                                 f"{directory}/{HF_QUANT_CONFIG} quantization.exclude_modules")
        if config is None:
            raise CheckpointInvalid(
                f"{directory}/{HF_QUANT_CONFIG}: quantization.quant_algo is {shown(repr(algo))}, expected 'NVFP4'")

    if hf_quant is None and "quantization_config" not in config:
        return QuantFormat(BF16, Exclusions([], f"{directory}/{CONFIG}"))
    qconfig = config.get("quantization_config") if config is not None else None
    where = f"{directory}/{CONFIG} quantization_config"
    if not isinstance(qconfig, dict):
        raise CheckpointInvalid(
            f"{where} is missing; expected an NVFP4 checkpoint (ModelOpt or compressed-tensors nvfp4-pack-quantized)")
    method = qconfig.get("quant_method")
    if isinstance(method, str) and method.startswith("modelopt"):
        algo = qconfig.get("quant_algo", "NVFP4")
        if algo != "NVFP4":
            raise CheckpointInvalid(f"{where}.quant_algo is {shown(repr(algo))}, expected 'NVFP4'")
        return _quant_format(MODELOPT, qconfig.get("ignore", qconfig.get("exclude_modules")), f"{where}.ignore")
    if method == COMPRESSED_TENSORS:
        if not _compressed_tensors_is_nvfp4(qconfig):
            raise CheckpointInvalid(
                f"{where}.format is {shown(repr(qconfig.get('format')))}, expected {CT_NVFP4_FORMAT!r}")
        return _quant_format(COMPRESSED_TENSORS, qconfig.get("ignore"), f"{where}.ignore")
    raise CheckpointInvalid(
        f"{where}.quant_method is {shown(repr(method))}, expected 'modelopt' (NVFP4) or 'compressed-tensors' "
        f"({CT_NVFP4_FORMAT})")
