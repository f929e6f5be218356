"""SPEC sections 4 and 6: activation-scale policies and the derived scalars."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.tensor_bytes import dense

log = logging.getLogger(__name__)


def weight_scale_2(ws13: torch.Tensor) -> torch.Tensor:
    """The gate's global weight scale per expert; warns when up's differs."""
    if ws13.dim() == 1:
        return dense(ws13)
    if not torch.equal(ws13[:, 0], ws13[:, 1]):
        log.warning("w13_weight_scale_2: gate and up global scales differ; using the gate's (SPEC section 2)")
    return dense(ws13[:, 0])


def _strict(a13: torch.Tensor, a2: torch.Tensor) -> None:
    if a13.dim() == 2 and not torch.equal(a13[:, 0], a13[:, 1]):
        expert = int((a13[:, 0] != a13[:, 1]).nonzero()[0])
        raise PrepError(
            "w13_input_scale",
            f"gate and up input scales differ for expert {expert} "
            f"({float(a13[expert, 0])} vs {float(a13[expert, 1])})",
            "equal gate and up input scales under input_scale_policy 'strict'",
        )
    for name, scale in (("w13_input_scale", a13.flatten()), ("w2_input_scale", a2)):
        if not bool((scale == scale[0]).all()):
            expert = int((scale != scale[0]).nonzero()[0])
            if name == "w13_input_scale" and a13.dim() == 2:
                expert //= 2
            raise PrepError(
                name,
                f"expert {expert} differs from expert 0",
                "one input scale shared by all experts under input_scale_policy 'strict'",
            )


def input_scales(a13: torch.Tensor, a2: torch.Tensor, backend: str, policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a13', a2')``, float32 ``[E]`` each."""
    experts = a2.shape[0]
    if policy == "strict":
        _strict(a13, a2)
    if backend == "vllm_cutlass":
        per_expert = a13.amax(dim=1) if a13.dim() == 2 else a13
        return dense(per_expert.to(torch.float32)), dense(a2.to(torch.float32))
    # expand(1).contiguous() would keep stride 0, which no byte view accepts: dense() copies.
    return (
        dense(a13.max().to(torch.float32).expand(experts)),
        dense(a2.max().to(torch.float32).expand(experts)),
    )


def _check(derived: str, values: torch.Tensor, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
           formula: str) -> None:
    """PrepError naming the input scale behind a non-finite (or zero) ``derived`` value.

    ``factors`` maps each input tensor to ``(its values, its factor in formula)``; an overflow is laid
    at the largest factor's door, an underflow to zero at the smallest one's.
    """
    bad = ~torch.isfinite(values) | (values == 0)
    if not bool(bad.any()):
        return
    expert = int(bad.nonzero()[0])
    value = float(values[expert])
    pick = min if value == 0 else max
    name = pick(factors, key=lambda n: abs(float(factors[n][1][expert])))
    inputs = ", ".join(f"{n} = {float(shown[expert])!r}" for n, (shown, _) in factors.items())
    raise PrepError(
        name,
        f"gives {derived} = {value!r} for expert {expert} ({derived} = {formula} with {inputs})",
        "input and weight scales for which every derived float32 scalar (SPEC section 6) is finite and non-zero",
    )


def derived_scalars(
    ws13: torch.Tensor, a13: torch.Tensor, ws2: torch.Tensor, a2: torch.Tensor, gated: bool
) -> Mapping[str, torch.Tensor]:
    """The float32 scalars of SPEC section 6, computed in its order, each checked finite and non-zero.

    The inputs are finite and positive (validate), yet a subnormal input scale has an infinite reciprocal
    and two large scales an infinite product: those raise PrepError naming the input that caused them.
    """
    g1_alphas = dense(ws13 * a13)
    g2_alphas = dense(ws2 * a2)
    a1_gscale = dense(1.0 / a13)
    a2_gscale = dense(1.0 / a2)
    g1_scale_c = dense(g1_alphas * a2_gscale) if gated else a2_gscale.clone()
    # Reciprocals first: a tiny input scale is the cause, not the product it also underflows.
    checks = [
        ("a1_gscale", a1_gscale, {"w13_input_scale": (a13, a1_gscale)}, "1 / w13_input_scale"),
        ("a2_gscale", a2_gscale, {"w2_input_scale": (a2, a2_gscale)}, "1 / w2_input_scale"),
        ("g1_alphas", g1_alphas, {"w13_weight_scale_2": (ws13, ws13), "w13_input_scale": (a13, a13)},
         "w13_weight_scale_2 * w13_input_scale"),
        ("g2_alphas", g2_alphas, {"w2_weight_scale_2": (ws2, ws2), "w2_input_scale": (a2, a2)},
         "w2_weight_scale_2 * w2_input_scale"),
    ]
    if gated:
        checks.append(("g1_scale_c", g1_scale_c,
                       {"w13_weight_scale_2": (ws13, ws13), "w13_input_scale": (a13, a13),
                        "w2_input_scale": (a2, a2_gscale)},
                       "w13_weight_scale_2 * w13_input_scale / w2_input_scale"))
    # One device-to-host sync for all five on the good path; the naming walk runs only on a failure.
    values = torch.cat([check[1] for check in checks])
    if not bool((torch.isfinite(values) & (values != 0)).all()):
        for check in checks:
            _check(*check)
    return {
        "g1_alphas": g1_alphas,
        "g2_alphas": g2_alphas,
        "a1_gscale": a1_gscale,
        "a2_gscale": a2_gscale,
        "g1_scale_c": g1_scale_c,
    }
