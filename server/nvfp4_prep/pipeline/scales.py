"""SPEC sections 4 and 6: activation-scale policies and the derived scalars."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from nvfp4_prep.contract.errors import PrepError

log = logging.getLogger(__name__)


def weight_scale_2(ws13: torch.Tensor) -> torch.Tensor:
    """The gate's global weight scale per expert; warns when up's differs."""
    if ws13.dim() == 1:
        return ws13.contiguous()
    if not torch.equal(ws13[:, 0], ws13[:, 1]):
        log.warning("w13_weight_scale_2: gate and up global scales differ; using the gate's (SPEC section 2)")
    return ws13[:, 0].contiguous()


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
        return per_expert.to(torch.float32).contiguous(), a2.to(torch.float32).contiguous()
    return (
        a13.max().to(torch.float32).expand(experts).contiguous(),
        a2.max().to(torch.float32).expand(experts).contiguous(),
    )


def derived_scalars(
    ws13: torch.Tensor, a13: torch.Tensor, ws2: torch.Tensor, a2: torch.Tensor, gated: bool
) -> Mapping[str, torch.Tensor]:
    """The float32 scalars of SPEC section 6, computed in its order."""
    g1_alphas = ws13 * a13
    g2_alphas = ws2 * a2
    a1_gscale = 1.0 / a13
    a2_gscale = 1.0 / a2
    g1_scale_c = g1_alphas * a2_gscale if gated else a2_gscale.clone()
    return {
        "g1_alphas": g1_alphas,
        "g2_alphas": g2_alphas,
        "a1_gscale": a1_gscale,
        "a2_gscale": a2_gscale,
        "g1_scale_c": g1_scale_c,
    }
