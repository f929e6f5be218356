"""Which NVFP4 checkpoint format a directory holds (SPEC section 2) and its module exclusions.

ModelOpt is recognised by ``hf_quant_config.json`` (``quantization.quant_algo ==
"NVFP4"``) or by a ``config.json`` quantization_config whose ``quant_method``
starts with ``modelopt``; compressed-tensors by ``quant_method ==
"compressed-tensors"`` with the ``nvfp4-pack-quantized`` format. The format
decides the per-projection tensor names.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointInvalid

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"

# Per-projection tensor suffixes, in the order weight, block scale, global weight scale, input scale.
PROJECTION_SUFFIXES = {
    MODELOPT: ("weight", "weight_scale", "weight_scale_2", "input_scale"),
    COMPRESSED_TENSORS: ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"),
}

CT_NVFP4_FORMAT = "nvfp4-pack-quantized"


@dataclass(frozen=True)
class QuantFormat:
    """The detected format and the module names its config leaves unquantized."""

    name: str
    exclusions: tuple[str, ...]

    @property
    def suffixes(self) -> tuple[str, ...]:
        return PROJECTION_SUFFIXES[self.name]

    def excludes(self, module: str) -> bool:
        """True when ``module`` or a module above it matches an exclusion entry.

        Entries are exact names, fnmatch globs (ModelOpt) or ``re:`` regular
        expressions (compressed-tensors, matched from the start as llm-compressor does).
        """
        parts = module.split(".")
        candidates = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for entry in self.exclusions:
            for candidate in candidates:
                if entry.startswith("re:"):
                    if re.match(entry[3:], candidate):
                        return True
                elif candidate == entry or fnmatch.fnmatchcase(candidate, entry):
                    return True
        return False


def _load_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointInvalid(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointInvalid(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _string_list(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise CheckpointInvalid(f"{where}: expected a list of module names, found {value!r}")
    try:
        for item in value:
            if item.startswith("re:"):
                re.compile(item[3:])
    except re.error as exc:
        raise CheckpointInvalid(f"{where}: bad regular expression ({exc})") from None
    return tuple(value)


def _compressed_tensors_is_nvfp4(qconfig: dict) -> bool:
    if qconfig.get("format") == CT_NVFP4_FORMAT:
        return True
    groups = qconfig.get("config_groups")
    return isinstance(groups, dict) and any(
        isinstance(group, dict) and group.get("format") == CT_NVFP4_FORMAT for group in groups.values())


def detect_format(directory: Path) -> QuantFormat:
    """The format of the checkpoint in ``directory``, from its config files."""
    hf_quant = _load_json(directory / "hf_quant_config.json")
    config = _load_json(directory / "config.json")
    if hf_quant is None and config is None:
        raise CheckpointInvalid(
            f"{directory}: neither config.json nor hf_quant_config.json found; "
            "expected a Hugging Face checkpoint directory with its quantization config")

    if hf_quant is not None:
        quant = hf_quant.get("quantization")
        algo = quant.get("quant_algo") if isinstance(quant, dict) else None
        if algo == "NVFP4":
            return QuantFormat(MODELOPT, _string_list(
                quant.get("exclude_modules"), f"{directory / 'hf_quant_config.json'} quantization.exclude_modules"))
        if config is None:
            raise CheckpointInvalid(
                f"{directory / 'hf_quant_config.json'}: quantization.quant_algo is {algo!r}, expected 'NVFP4'")

    qconfig = config.get("quantization_config") if config is not None else None
    where = f"{directory / 'config.json'} quantization_config"
    if not isinstance(qconfig, dict):
        raise CheckpointInvalid(
            f"{where} is missing; expected an NVFP4 checkpoint (ModelOpt or compressed-tensors nvfp4-pack-quantized)")
    method = qconfig.get("quant_method")
    if isinstance(method, str) and method.startswith("modelopt"):
        algo = qconfig.get("quant_algo", "NVFP4")
        if algo != "NVFP4":
            raise CheckpointInvalid(f"{where}.quant_algo is {algo!r}, expected 'NVFP4'")
        return QuantFormat(MODELOPT, _string_list(
            qconfig.get("ignore", qconfig.get("exclude_modules")), f"{where}.ignore"))
    if method == COMPRESSED_TENSORS:
        if not _compressed_tensors_is_nvfp4(qconfig):
            raise CheckpointInvalid(
                f"{where}.format is {qconfig.get('format')!r}, expected {CT_NVFP4_FORMAT!r}")
        return QuantFormat(COMPRESSED_TENSORS, _string_list(qconfig.get("ignore"), f"{where}.ignore"))
    raise CheckpointInvalid(
        f"{where}.quant_method is {method!r}, expected 'modelopt' (NVFP4) or 'compressed-tensors' ({CT_NVFP4_FORMAT})")
