"""Finding MoE layers and their experts among a checkpoint's tensor names.

Two naming schemes exist in the wild (SPEC section 2): ``<p>.mlp.experts.<e>.
{gate_proj,up_proj,down_proj}`` (Qwen-MoE, DeepSeek) and ``<p>.block_sparse_moe.
experts.<e>.{w1,w3,w2}`` (Mixtral). Shared experts (``mlp.shared_experts``) and
dense MLPs do not match either and stay untouched, as do layers the quantization
config excludes and layers whose experts carry no NVFP4 tensors (in a ``bf16``
checkpoint, every layer whose experts have weights).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import CheckpointInvalid, shown
from .formats import QuantFormat

_EXPERT_TENSOR = re.compile(
    r"^(?P<prefix>.+\.(?:mlp|block_sparse_moe)\.experts)\.(?P<expert>\d+)\."
    r"(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.(?P<suffix>[A-Za-z0-9_]+)$")

# Projection names of each scheme, in gate, up, down order.
SCHEMES = {"qwen": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}
_SCHEME_OF = {proj: scheme for scheme, projs in SCHEMES.items() for proj in projs}


# Longest expert index accepted (int64 range); int() of a file's 5000-digit number would raise.
MAX_EXPERT_DIGITS = 18


def _number_key(digits: str) -> tuple[int, str]:
    """Orders decimal numbers of any length as their values, without converting them."""
    digits = digits.lstrip("0")
    return len(digits), digits


def _layer_number(prefix: str) -> tuple:
    """Sort key: the numbers in the prefix (the decoder layer index), then the prefix."""
    return tuple(_number_key(n) for n in re.findall(r"\.(\d+)\.", f".{prefix}.")), prefix


@dataclass
class MoeLayer:
    """One MoE layer: its experts prefix, expert count, projection names and tensor names."""

    prefix: str
    projections: tuple[str, ...]
    num_experts: int
    suffixes: tuple[str, ...]
    tensor_names: list[str] = field(default_factory=list)


def _check_layer(prefix: str, found: dict[int, dict[str, set[str]]], quant: QuantFormat) -> MoeLayer:
    """Checks a layer's experts and projections are complete; SPEC section 8 names each gap."""
    schemes = {_SCHEME_OF[proj] for projs in found.values() for proj in projs}
    if len(schemes) != 1:
        raise CheckpointInvalid(
            f"{shown(prefix)}: mixes projection names of {sorted(schemes)}; expected one naming scheme")
    gate, up, down = SCHEMES[schemes.pop()]
    seen = {proj for projs in found.values() for proj in projs}
    projections = (gate, up, down) if gate in seen else (up, down)
    experts = sorted(found)
    # Sorted distinct indices are 0..E-1 exactly when each equals its position; compare without building
    # a range up to the largest index, which a file can make as large as it likes.
    gap = next((position for position, expert in enumerate(experts) if expert != position), None)
    if gap is not None:
        raise CheckpointInvalid(
            f"{shown(prefix)}: expert {gap} is missing (found {len(experts)} experts, "
            f"indices {experts[0]}..{experts[-1]}); "
            "expected every expert from 0 to the highest index")
    names = []
    for expert in experts:
        for proj in projections:
            present = found[expert].get(proj, set())
            if not present:
                raise CheckpointInvalid(
                    f"{shown(prefix)}.{expert}.{proj}: projection missing; "
                    f"expected tensors {', '.join(quant.suffixes)}")
            for suffix in quant.suffixes:
                if suffix not in present:
                    raise CheckpointInvalid(
                        f"{shown(prefix)}.{expert}.{proj}.{suffix}: tensor missing; a {quant.name} projection needs "
                        f"{', '.join(quant.suffixes)}")
                names.append(f"{prefix}.{expert}.{proj}.{suffix}")
    return MoeLayer(prefix, projections, len(experts), quant.suffixes, names)


def discover_moe_layers(tensor_names: Iterable[str], quant: QuantFormat) -> list[MoeLayer]:
    """Every NVFP4 MoE layer, sorted by layer number; excluded or unquantized layers are skipped."""
    grouped: dict[str, dict[int, dict[str, set[str]]]] = {}
    for name in tensor_names:
        match = _EXPERT_TENSOR.match(name)
        if match:
            if len(match["expert"]) > MAX_EXPERT_DIGITS:
                raise CheckpointInvalid(f"{shown(name)}: expert index of {len(match['expert'])} digits; expected "
                                        f"at most {MAX_EXPERT_DIGITS}")
            experts = grouped.setdefault(match["prefix"], {})
            experts.setdefault(int(match["expert"]), {}).setdefault(match["proj"], set()).add(match["suffix"])
    layers = []
    for prefix, found in grouped.items():
        if quant.excludes(prefix):
            continue
        # A weight and its block scale (a bf16 format's one tensor, the weight) mark a layer of this format.
        quantized = any(all(suffix in suffixes for suffix in quant.suffixes[:2])
                        for projs in found.values() for suffixes in projs.values())
        modules = [f"{prefix}.{e}.{p}" for e, projs in found.items() for p in projs]
        if not quantized or all(quant.excludes(module) for module in modules):
            continue
        layers.append(_check_layer(prefix, found, quant))
    return sorted(layers, key=lambda layer: _layer_number(layer.prefix))
