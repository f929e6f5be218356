"""What the input scales and derived scalars of a prepared layer must be: SPEC sections 4 and 6.

A second formulation, independent of the pipeline, for ``verify``: numpy in
float64, rounded once to float32. A product of two float32 numbers is exact in
float64, and a float64 quotient rounded to float32 is the correctly rounded
float32 quotient (53 >= 2*24 + 2), so the results equal IEEE float32 arithmetic
bit for bit without sharing code with ``prepare``.
"""

from __future__ import annotations

import numpy as np


class PolicyViolation(ValueError):
    """The source layer cannot satisfy the requested input-scale policy; names the tensor."""

    def __init__(self, tensor: str, problem: str) -> None:
        self.tensor = tensor
        super().__init__(f"{tensor}: {problem}")


def _f32(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32)


def expected_input_scales(a13: np.ndarray, a2: np.ndarray, backend: str, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """``(a13', a2')`` float32 ``[E]`` from the source's a13 (``[E, 2]`` or ``[E]``) and a2 ``[E]``."""
    experts = a2.shape[0]
    if policy == "strict":
        if a13.ndim == 2 and np.any(a13[:, 0] != a13[:, 1]):
            raise PolicyViolation("w13_input_scale", "gate and up input scales differ, which policy 'strict' rejects")
        for name, values in (("w13_input_scale", a13), ("w2_input_scale", a2)):
            if np.any(values != values.flat[0]):
                raise PolicyViolation(name, "experts have different input scales, which policy 'strict' rejects")
    if backend == "vllm_cutlass":
        per_expert = a13.max(axis=1) if a13.ndim == 2 else a13
        return _f32(per_expert), _f32(a2)
    return np.full(experts, a13.max(), dtype=np.float32), np.full(experts, a2.max(), dtype=np.float32)


def expected_derived(ws13: np.ndarray, a13p: np.ndarray, ws2: np.ndarray, a2p: np.ndarray,
                     gated: bool) -> dict[str, np.ndarray]:
    """The five derived float32 scalars per expert, in SPEC section 6 order."""
    wide = {name: values.astype(np.float64) for name, values in
            (("ws13", ws13), ("a13", a13p), ("ws2", ws2), ("a2", a2p))}
    g1_alphas = _f32(wide["ws13"] * wide["a13"])
    a2_gscale = _f32(1.0 / wide["a2"])
    g1_scale_c = _f32(g1_alphas.astype(np.float64) * a2_gscale.astype(np.float64)) if gated else a2_gscale
    return {
        "g1_alphas": g1_alphas,
        "g2_alphas": _f32(wide["ws2"] * wide["a2"]),
        "a1_gscale": _f32(1.0 / wide["a13"]),
        "a2_gscale": a2_gscale,
        "g1_scale_c": g1_scale_c,
    }
