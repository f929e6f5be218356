"""GPU output equals CPU output byte for byte, for every backend, activation and gather path.

    python bench/gpu_check.py      # needs a CUDA device
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layers import random_layer
from nvfp4_prep.contract.layout import ACTIVATIONS, BACKENDS
from nvfp4_prep.pipeline import gather, prepare

SHAPES = [(4, 512, 256), (3, 7168, 2048), (2, 400, 80), (5, 272, 208)]


def main() -> int:
    failures = 0
    for path in ("triton", "torch"):
        gather._KERNEL = path if path == "torch" else "auto"
        for experts, hidden, inter in SHAPES:
            for activation in ACTIVATIONS:
                gated = activation != "relu2"
                cpu = random_layer(experts, hidden, inter, gated, "cpu", seed=experts + hidden)
                gpu = {k: v.cuda() for k, v in cpu.items()}
                for backend in BACKENDS:
                    try:
                        want = prepare(cpu, backend, activation)
                    except ValueError as err:
                        print(f"skip {backend} {activation} {hidden}x{inter}: {err}")
                        continue
                    got = prepare(gpu, backend, activation)
                    same = all(
                        torch.equal(want.tensors[n].view(torch.uint8) if want.tensors[n].element_size() == 1
                                    else want.tensors[n], got.tensors[n].cpu().view(torch.uint8)
                                    if got.tensors[n].element_size() == 1 else got.tensors[n].cpu())
                        for n in want.tensors
                    )
                    failures += not same
                    print(f"{path:6} {backend:20} {activation:10} E={experts} H={hidden} I={inter}: "
                          f"{'identical' if same else 'DIFFERENT'}")
    print(f"{failures} differences")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
