"""assemble_layer(): per-expert checkpoint tensors to the stacked form of SPEC section 2.

Accepts ModelOpt names (``weight``, ``weight_scale``, ``weight_scale_2``,
``input_scale``) and compressed-tensors names (``weight_packed``,
``weight_scale``, ``weight_global_scale``, ``input_global_scale``, stored as
reciprocals), with ``gate_proj/up_proj/down_proj`` or ``w1/w3/w2`` projection
names; keys are relative to the experts prefix, e.g. ``"3.up_proj.weight"``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.expert_keys import PROJECTION_ROLES, parse_expert_key
from nvfp4_prep.contract.layout import ALL_ACTIVATIONS, GATED_ACTIVATIONS, INTERLEAVED_ACTIVATIONS

from .validate import check_choice

MODELOPT = {"weight": "weight", "block": "weight_scale", "global": "weight_scale_2", "input": "input_scale"}
COMPRESSED = {"weight": "weight_packed", "block": "weight_scale", "global": "weight_global_scale",
              "input": "input_global_scale"}


def _parse(expert_tensors: Mapping[str, torch.Tensor]) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    experts: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in expert_tensors.items():
        parsed = parse_expert_key(key)
        if parsed is None:
            raise PrepError(key, "is not an expert tensor name",
                            "'<expert>.<gate_proj|up_proj|down_proj|w1|w3|w2>.<tensor>'")
        index, proj, leaf = parsed
        experts.setdefault(index, {}).setdefault(proj, {})[leaf] = tensor
    if not experts:
        raise PrepError("experts", "no expert tensors were given", "at least one expert")
    return experts


def _format_of(experts: dict) -> dict[str, str]:
    leaves = {leaf for projs in experts.values() for tensors in projs.values() for leaf in tensors}
    if "weight_packed" in leaves and "weight" not in leaves:
        return COMPRESSED
    if "weight" in leaves and "weight_packed" not in leaves:
        return MODELOPT
    raise PrepError("experts", f"tensor names {sorted(leaves)} mix or miss formats",
                    "ModelOpt 'weight' or compressed-tensors 'weight_packed' names")


def _scalar(name: str, tensor: torch.Tensor, reciprocal: bool) -> torch.Tensor:
    if tensor.numel() != 1:
        raise PrepError(name, f"has shape {list(tensor.shape)}", "a scalar (0-d or [1])")
    if tensor.dtype != torch.float32:
        raise PrepError(name, f"has dtype {str(tensor.dtype).removeprefix('torch.')}", "float32")
    value = tensor.reshape(())
    return torch.reciprocal(value) if reciprocal else value


def _projection(experts: dict, index: int, roles: tuple[str, ...], names: dict[str, str]) -> dict[str, torch.Tensor]:
    projs = experts[index]
    for proj, tensors in projs.items():
        if PROJECTION_ROLES[proj] in roles:
            missing = [leaf for leaf in names.values() if leaf not in tensors]
            if missing:
                raise PrepError(f"{index}.{proj}.{missing[0]}", "is missing",
                                "all of " + ", ".join(names.values()))
            reciprocal = names is COMPRESSED
            return {
                "weight": tensors[names["weight"]],
                "block": tensors[names["block"]],
                "global": _scalar(f"{index}.{proj}.{names['global']}", tensors[names["global"]], reciprocal),
                "input": _scalar(f"{index}.{proj}.{names['input']}", tensors[names["input"]], reciprocal),
            }
    raise PrepError(f"{index}.{roles[0]}", "projection is missing", "/".join(roles) + " tensors for every expert")


def _stack_rows(name: str, parts: list[list[torch.Tensor]], interleave: bool) -> torch.Tensor:
    """Concatenate each expert's projections along rows into one preallocated tensor."""
    first = parts[0][0]
    rows = sum(p.shape[0] for p in parts[0])
    out = torch.empty((len(parts), rows, *first.shape[1:]), dtype=first.dtype, device=first.device)
    for e, projections in enumerate(parts):
        shapes = {tuple(p.shape) for p in projections}
        if len(shapes) != 1 or tuple(projections[0].shape) != tuple(first.shape):
            raise PrepError(f"{e}.{name}", f"has shapes {sorted(shapes)}", f"{list(first.shape)} like expert 0")
        for p in projections:
            if p.dtype != first.dtype or p.device != first.device:
                raise PrepError(f"{e}.{name}", f"has dtype {p.dtype} on {p.device}",
                                f"{first.dtype} on {first.device} like expert 0")
        if interleave:
            for j, p in enumerate(projections):
                out[e, j::len(projections)] = p
        else:
            torch.cat(projections, dim=0, out=out[e])
    return out


def check_expert_indices(experts: Mapping[int, object]) -> int:
    """The expert count, once every index 0..E-1 is present; PrepError naming the first one missing.

    Compared by position, so that a client-chosen index such as 4000000000 costs nothing.
    """
    count = len(experts)
    for position, index in enumerate(sorted(experts)):
        if position != index:
            raise PrepError("experts", f"expert {position} is missing (found {count} experts, up to {max(experts)})",
                            f"experts 0..{count - 1} all present")
    return count


def assemble_layer(expert_tensors: Mapping[str, torch.Tensor], activation: str = "swiglu") -> dict[str, torch.Tensor]:
    """Stack per-expert tensors; W13 rows are ``[gate; up]`` (interleaved for ``swigluoai``)."""
    check_choice("activation", activation, ALL_ACTIVATIONS)
    experts = _parse(expert_tensors)
    names = _format_of(experts)
    count = check_expert_indices(experts)
    gated = activation in GATED_ACTIVATIONS
    first = [("gate",), ("up",)] if gated else [("up", "gate")]
    w13 = [[_projection(experts, e, roles, names) for roles in first] for e in range(count)]
    w2 = [_projection(experts, e, ("down",), names) for e in range(count)]
    interleave = activation in INTERLEAVED_ACTIVATIONS

    def column(parts: list[dict], leaf: str) -> list[torch.Tensor]:
        return [p[leaf] for p in parts]

    def scalars(leaf: str) -> torch.Tensor:
        """``[E, 2]`` (gate, up) for gated layers, ``[E]`` otherwise."""
        stacked = torch.stack([torch.stack(column(p, leaf)) for p in w13])
        return stacked if gated else stacked.squeeze(-1)

    return {
        "w13_weight": _stack_rows("w13.weight", [column(p, "weight") for p in w13], interleave),
        "w13_weight_scale": _stack_rows("w13.weight_scale", [column(p, "block") for p in w13], interleave),
        "w13_weight_scale_2": scalars("global"),
        "w13_input_scale": scalars("input"),
        "w2_weight": _stack_rows("w2.weight", [[p["weight"]] for p in w2], False),
        "w2_weight_scale": _stack_rows("w2.weight_scale", [[p["block"]] for p in w2], False),
        "w2_weight_scale_2": torch.stack([p["global"] for p in w2]),
        "w2_input_scale": torch.stack([p["input"] for p in w2]),
    }
