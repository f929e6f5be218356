"""What every bench prints and, with ``--json PATH``, writes: one row per measured path.

A row's ``ratio`` is its rate over the rate of the baseline named in ``baseline``, measured in the same
run. ``peak_rss_bytes`` is the process's peak resident set so far (Linux ``ru_maxrss``), so a row only
shows more than the rows before it when it raised the peak; ``peak_device_bytes`` is the peak of torch's
CUDA allocator during the row (0 on CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Row:
    name: str
    gbps: float
    ratio: float
    baseline: str
    peak_rss_bytes: int
    peak_device_bytes: int


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help='also write {"rows": [...]} to PATH (name, gbps, ratio, baseline, peak memory)')


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_device_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_device_bytes() -> int:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0


def row(name: str, gbps: float, baseline: str, baseline_gbps: float) -> Row:
    """A row measured just now: its peaks are read at the call."""
    return Row(name, gbps, gbps / baseline_gbps, baseline, peak_rss_bytes(), peak_device_bytes())


def print_rows(rows: list[Row]) -> None:
    print(f"{'row':<32} {'GB/s':>9} {'ratio':>7}  {'baseline':<28} {'peak RSS':>10} {'peak dev':>10}")
    for r in rows:
        print(f"{r.name:<32} {r.gbps:9.2f} {r.ratio:7.3f}  {r.baseline:<28} {r.peak_rss_bytes / 1e9:8.2f}GB "
              f"{r.peak_device_bytes / 1e9:8.2f}GB")


def write_json(path: Path | None, rows: list[Row]) -> None:
    if path is not None:
        path.write_text(json.dumps({"rows": [asdict(r) for r in rows]}, indent=2) + "\n")
