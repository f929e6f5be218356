"""Benchmark of the preparation pipeline against clone() of the same bytes.

Prints, per backend: time per layer, GB/s (input bytes over time), the ratio of
clone() time to prepare time measured in the same run (1.0 = as fast as a
plain device copy), and the peak extra device memory over the output size.
Both are timed over a few back-to-back calls (``--batch``): a stream of layers.

    python bench/pipeline.py                      # GPU: a DeepSeek-R1-sized layer
    python bench/pipeline.py --device cpu         # CPU: a smaller layer
    python bench/pipeline.py --json rows.json     # also one row per backend as JSON (bench/report.py)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layers import nbytes, random_layer
from nvfp4_prep.contract.layout import ACTIVATIONS, BACKENDS
from nvfp4_prep.pipeline import prepare
from report import add_json_flag, reset_device_peak, row, write_json


def timed(fn, device: torch.device, repeat: int, batch: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``batch`` back-to-back calls, after one warm-up run.

    On CUDA, ``batch`` calls between two events measure the rate of a stream of layers (as a server or the
    prepare job sees it): each call's host-side checks overlap the device work of the call before.
    """
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(batch):
                fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3 / batch)
        else:
            begin = time.perf_counter()
            for _ in range(batch):
                fn()
            times.append((time.perf_counter() - begin) / batch)
    return statistics.median(times)


def clone_all(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in tensors.items()}


def peak_extra(fn, device: torch.device) -> tuple[int, int]:
    """(peak bytes allocated beyond the inputs, bytes of the outputs) of one call."""
    if device.type != "cuda":
        return 0, 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
    return peak, nbytes(result.tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--experts", type=int, help="E (default 256 on GPU, 16 on CPU)")
    parser.add_argument("--hidden", type=int, default=7168, help="H")
    parser.add_argument("--intermediate", type=int, default=2048, help="I")
    parser.add_argument("--activation", default="swiglu", choices=ACTIVATIONS)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4,
                        help="back-to-back calls per timing, for both prepare and clone() (default 4; 1 times one "
                             "call alone, host-side checks included)")
    add_json_flag(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    experts = args.experts or (256 if device.type == "cuda" else 16)
    gated = args.activation != "relu2"
    layer = random_layer(experts, args.hidden, args.intermediate, gated, str(device))
    size = nbytes(layer)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; E={experts} H={args.hidden} I={args.intermediate} {args.activation}; "
          f"{size / 1e9:.2f} GB of inputs")

    clone_s = timed(lambda: clone_all(layer), device, args.repeat, args.batch)
    print(f"{'baseline clone()':<20} {clone_s * 1e3:9.2f} ms {size / clone_s / 1e9:8.1f} GB/s")
    print(f"{'backend':<20} {'time':>12} {'GB/s':>8} {'vs clone':>9} {'peak extra/out':>15}")
    rows = []
    for backend in args.backends.split(","):
        run = functools.partial(prepare, layer, backend, args.activation)
        seconds = timed(run, device, args.repeat, args.batch)
        reset_device_peak()
        peak, out = peak_extra(run, device)
        memory = f"{peak / out:15.3f}" if out else f"{'n/a':>15}"
        print(f"{backend:<20} {seconds * 1e3:9.2f} ms {size / seconds / 1e9:8.1f} "
              f"{clone_s / seconds:9.3f} {memory}")
        rows.append(row(backend, size / seconds / 1e9, "clone()", size / clone_s / 1e9))
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
