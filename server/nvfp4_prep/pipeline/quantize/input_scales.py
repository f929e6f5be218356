"""Activation (input) scales for a quantized layer: calibration is not ours to run, so they are given.

Accepted forms, each value float32, finite and > 0:
- stacked, ModelOpt's form (``amax / 2688``): ``w13_input_scale`` ``[E, 2]`` (gate, up) or ``[E]``, and
  ``w2_input_scale`` ``[E]``;
- per expert, relative to the experts prefix, under the name the tool stores it: ``<e>.<proj>.input_scale``
  (ModelOpt) or ``<e>.<proj>.input_global_scale`` (compressed-tensors, ``2688 / amax``), 0-d or ``[1]``.
  An NVFP4 checkpoint of the same model, or a calibration file of per-module scales, gives exactly these.

Each recipe stores its own form; a scale of the other form is converted as ``recipes`` says
(``input_scale_from_global``, ``input_global_from_scale``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.expert_keys import looks_per_expert, parse_expert_key

from .recipes import MODELOPT, input_global_from_scale, input_scale_from_global

MODELOPT_LEAF = "input_scale"
CT_LEAF = "input_global_scale"
ROLES = ("gate", "up", "down")
# Per role: the stored form of each expert's scale (MODELOPT_LEAF or CT_LEAF) and the float32 [E] values.
Given = tuple[list[str], torch.Tensor]
MISSING = ("the activation scales of every expert's projections (W4A4 NVFP4 needs them): w13_input_scale and "
           "w2_input_scale, or per-expert <e>.<proj>.input_scale / input_global_scale, from the request, a "
           "calibration file or an NVFP4 checkpoint of the same model")


def _scalar(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise PrepError(name, f"is a {type(value).__name__}", "a float32 torch.Tensor")
    if value.numel() != 1:
        raise PrepError(name, f"has shape {list(value.shape)}", "a scalar (0-d or [1])")
    return _values(name, value.reshape(()))


def _values(name: str, value: torch.Tensor) -> torch.Tensor:
    if value.dtype != torch.float32:
        raise PrepError(name, f"has dtype {str(value.dtype).removeprefix('torch.')}", "float32")
    value = value.detach().cpu()
    bad = ~(torch.isfinite(value) & (value > 0))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        shown = float(value[tuple(where)]) if where else float(value)
        at = f" at {where}" if where else ""
        raise PrepError(name, f"is {shown!r}{at}", "finite input scales > 0")
    return value


def _stacked(scales: Mapping[str, torch.Tensor], experts: int, roles: tuple[str, ...]) -> dict[str, Given]:
    for name in ("w13_input_scale", "w2_input_scale"):
        if name not in scales:
            raise PrepError(name, "is missing", MISSING)
    unknown = sorted(set(scales) - {"w13_input_scale", "w2_input_scale"})
    if unknown:
        raise PrepError(unknown[0], "is not an input scale name", MISSING)
    a13 = scales["w13_input_scale"]
    a2 = scales["w2_input_scale"]
    for name, value in (("w13_input_scale", a13), ("w2_input_scale", a2)):
        if not isinstance(value, torch.Tensor):
            raise PrepError(name, f"is a {type(value).__name__}", "a float32 torch.Tensor")
    gated = len(roles) == 3
    shapes13 = ((experts, 2), (experts,)) if gated else ((experts,),)
    if tuple(a13.shape) not in shapes13:
        raise PrepError("w13_input_scale", f"has shape {list(a13.shape)}",
                        " or ".join(str(list(s)) for s in shapes13))
    if tuple(a2.shape) != (experts,):
        raise PrepError("w2_input_scale", f"has shape {list(a2.shape)}", f"[{experts}]")
    a13 = _values("w13_input_scale", a13)
    a2 = _values("w2_input_scale", a2)
    columns = [a13] * (len(roles) - 1) if a13.dim() == 1 else [a13[:, 0], a13[:, 1]]
    given = {role: ([MODELOPT_LEAF] * experts, column) for role, column in zip(roles, columns, strict=False)}
    given["down"] = ([MODELOPT_LEAF] * experts, a2)
    return given


def _per_expert(scales: Mapping[str, torch.Tensor], experts: int, roles: tuple[str, ...],
                projections: tuple[str, ...] | None) -> dict[str, Given]:
    found: dict[str, list] = {role: [None] * experts for role in roles}
    for key, value in scales.items():
        parsed = parse_expert_key(key)
        if parsed is None or parsed.leaf not in (MODELOPT_LEAF, CT_LEAF):
            raise PrepError(key, "is not a per-expert input scale name",
                            "'<expert>.<proj>.input_scale' or '<expert>.<proj>.input_global_scale'")
        if parsed.expert >= experts or parsed.role not in found:
            continue  # another expert's or another projection's (a checkpoint gives every module's)
        if found[parsed.role][parsed.expert] is not None:
            raise PrepError(key, f"gives expert {parsed.expert}'s {parsed.role} input scale a second time",
                            "one input scale per projection")
        found[parsed.role][parsed.expert] = (parsed.leaf, _scalar(key, value))
    default = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    names = dict(zip(roles, projections, strict=True)) if projections else default
    for role in roles:
        for expert, value in enumerate(found[role]):
            if value is None:
                raise PrepError(f"{expert}.{names[role]}.input_scale", "is missing", MISSING)
    return {role: ([leaf for leaf, _ in found[role]], torch.stack([value for _, value in found[role]]))
            for role in roles}


def stored_input_scales(scales: Mapping[str, torch.Tensor] | None, recipe: str, experts: int,
                        roles: tuple[str, ...], dtype: torch.dtype,
                        projections: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """float32 ``[E]`` per role of ``roles`` (the W13 roles then ``down``) in ``recipe``'s stored form: ModelOpt
    ``input_scale`` or compressed-tensors ``input_global_scale``. ``dtype`` is the model's (the precision
    llm-compressor forms a global scale in); ``projections`` (names of the roles) name missing ones in errors."""
    if not scales:
        raise PrepError("input_scales", "are missing", MISSING)
    if any(looks_per_expert(name) for name in scales):
        given = _per_expert(scales, experts, roles, projections)
    else:
        given = _stacked(scales, experts, roles)
    target = MODELOPT_LEAF if recipe == MODELOPT else CT_LEAF
    out = {}
    for role in roles:
        leaves, values = given[role]
        other = torch.tensor([leaf != target for leaf in leaves])
        if not bool(other.any()):
            out[role] = values.clone()  # never the caller's tensor
            continue
        # Elementwise formulas: converting the whole [E] at once gives each value's bytes.
        converted = input_scale_from_global(values) if target == MODELOPT_LEAF else \
            input_global_from_scale(values, dtype)
        out[role] = torch.where(other, converted, values)
    return out
