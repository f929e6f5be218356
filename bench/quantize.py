"""Benchmark of BF16 -> NVFP4 quantization (each recipe), then prepare, against clone() of the BF16 inputs.

Prints, per recipe: the time of quantize_layer and of quantize + prepare for one backend, GB/s (BF16 input
bytes over time) and the ratio of clone() time to that time, measured in the same run (1.0 = as fast as a
plain device copy of the BF16 bytes). Runs on CUDA when present, through the fused Triton kernels
(``triton_quantize``) where Triton imports; ``NVFP4_PREP_QUANTIZE_KERNEL=torch`` measures the eager torch path.

    python bench/quantize.py                    # GPU: a DeepSeek-R1-sized layer (E 256, H 7168, I 2048)
    python bench/quantize.py --small            # a small layer for the CPU
    python bench/quantize.py --json rows.json   # also one row per measured path as JSON (bench/report.py)
    NVFP4_PREP_QUANTIZE_KERNEL=torch python bench/quantize.py --recipes modelopt --repeat 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nvfp4_prep.contract.environment import env_value
from nvfp4_prep.contract.layout import BACKENDS
from nvfp4_prep.pipeline import prepare
from nvfp4_prep.pipeline.quantize import RECIPES, quantize_layer, triton_quantize
from pipeline import clone_all, timed
from report import add_json_flag, reset_device_peak, row, write_json

SMALL = {"experts": 8, "hidden": 1024, "intermediate": 512}


def bf16_layer(experts: int, hidden: int, inter: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    return {"w13_weight": torch.randn(experts, 2 * inter, hidden, generator=gen, device=device,
                                      dtype=torch.bfloat16) * 0.02,
            "w2_weight": torch.randn(experts, hidden, inter, generator=gen, device=device, dtype=torch.bfloat16) * 0.02}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help=f"a small layer ({SMALL})")
    parser.add_argument("--experts", type=int, default=256, help="E")
    parser.add_argument("--hidden", type=int, default=7168, help="H")
    parser.add_argument("--intermediate", type=int, default=2048, help="I")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated")
    parser.add_argument("--backend", default="flashinfer_cutedsl", choices=BACKENDS)
    parser.add_argument("--repeat", type=int, default=3)
    add_json_flag(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = SMALL if args.small else {"experts": args.experts, "hidden": args.hidden, "intermediate": args.intermediate}
    layer = bf16_layer(sizes["experts"], sizes["hidden"], sizes["intermediate"], device)
    experts = sizes["experts"]
    scales = {"w13_input_scale": torch.full((experts, 2), 0.002, device=device),
              "w2_input_scale": torch.full((experts,), 0.001, device=device)}
    size = sum(t.numel() * t.element_size() for t in layer.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fused = env_value("quantize-kernel", "auto") != "torch" and triton_quantize.available(layer["w13_weight"])
    print(f"device {name}; E={experts} H={sizes['hidden']} I={sizes['intermediate']}; {size / 1e9:.2f} GB of BF16; "
          f"quantize kernel: {'triton' if fused else 'torch'}")

    clone_s = timed(lambda: clone_all(layer), device, args.repeat)
    print(f"{'baseline clone()':<50} {clone_s * 1e3:10.2f} ms {size / clone_s / 1e9:8.1f} GB/s")
    print(f"{'path':<50} {'time':>13} {'GB/s':>8} {'vs clone':>9}")
    rows = []
    for recipe in args.recipes.split(","):
        paths = {
            f"quantize {recipe}": lambda recipe=recipe: quantize_layer(layer, recipe, scales),
            f"quantize+prepare {recipe} {args.backend}":
                lambda recipe=recipe: prepare(quantize_layer(layer, recipe, scales), args.backend),
        }
        for path, run in paths.items():
            reset_device_peak()
            seconds = timed(run, device, args.repeat)
            print(f"{path:<50} {seconds * 1e3:10.2f} ms {size / seconds / 1e9:8.1f} {clone_s / seconds:9.3f}")
            rows.append(row(path, size / seconds / 1e9, "clone() of the BF16 inputs", size / clone_s / 1e9))
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
