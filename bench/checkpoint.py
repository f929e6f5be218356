"""Benchmark of ``prepare`` on a whole checkpoint against plainly reading the same files.

Writes a synthetic ModelOpt NVFP4 checkpoint (one shard per MoE layer, with an
index), then measures in the same run, on the same hot page cache:

- baselines: a Python read loop over every file, ``cat`` of every file, and a
  copy loop (read, write and fsync every file), since prepare writes as many
  bytes as it reads;
- ``prepare``: what ``nvfp4-prep prepare`` does without --server (the pipeline in
  this process, on the GPU when there is one; no gRPC);
- ``prepare --server``: what ``nvfp4-prep prepare --server`` does, through a separately
  started server process on loopback, started with ``--allowed-root`` over the
  checkpoint and a bulk port (``--bulk-address``): ``--send auto`` finds that it reads
  the files and sends references, so the server reads each layer itself and only
  prepared bytes come back, over the bulk transport (the CLI's default 4 connections);
- ``prepare --server --send tensors``: the same server sent the layers' bytes
  (what a server that cannot read the files gets);
- both again with ``--bulk-streams 0``: the tensor bytes on the gRPC stream (what a
  server without a bulk port, or out of its reach, gets).

Each prepare run reads every shard, prepares every layer and writes (and fsyncs)
a complete prepared checkpoint. GB/s is source checkpoint bytes over wall time;
the ratios are that over the read loop's and the copy loop's GB/s (1.0 = as
fast as reading, or as copying, the files). Every timed run starts after
``os.sync()``, so that none pays for the writeback of an earlier one.

With ``--profile``, one more embedded ``prepare`` run is timed stage by stage
(read, prepare, stage: header, checksums and carried tensors, write, commit:
fsync, rename and manifest): each stage's calls, summed seconds and busy share
of the wall time. The job is as fast as the disk allows when "write|commit" is
busy close to 100% of it.

    python bench/checkpoint.py                   # here (2 cores): a 0.7 GB checkpoint
    python bench/checkpoint.py --size-gb 8       # device machine: Qwen3-30B-A3B-shaped, ~8 GB
    python bench/checkpoint.py --json rows.json  # also the rows as JSON (see bench/report.py)
    python bench/checkpoint.py --profile         # also where the embedded job's time goes
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from nvfp4_prep.checkpoint import open_checkpoint
from nvfp4_prep.checkpoint.checkpoint import Checkpoint
from nvfp4_prep.cli.checkpoint_commands import Sending, layer_preparers
from nvfp4_prep.cli.connection_flags import DEFAULT_BULK_STREAMS
from nvfp4_prep.client.sdk import PrepClient
from nvfp4_prep.contract.layout import BACKENDS
from nvfp4_prep.prepared.prepare_job import ReferencePreparer, prepare_checkpoint
from nvfp4_prep.prepared.writer import PreparedCheckpointWriter
from report import add_json_flag, print_rows, reset_device_peak, row, write_json

SERVER = ("import sys; from nvfp4_prep.server.config import ServeConfig; from nvfp4_prep.server.server import run; "
          "sys.exit(run(ServeConfig(host='127.0.0.1', port=int(sys.argv[1]), metrics_port=0, log_level='WARNING', "
          "allowed_roots=(sys.argv[2],), bulk_address=('127.0.0.1', 0))))")


def layer_bytes(experts: int, hidden: int, inter: int) -> int:
    per_projection = inter * hidden // 2 + inter * hidden // 16 + 8
    return experts * 3 * per_projection


def write_layer(path: Path, layer: int, experts: int, hidden: int, inter: int, gen: torch.Generator) -> None:
    prefix = f"model.layers.{layer}.mlp.experts"
    tensors = {f"model.layers.{layer}.mlp.gate.weight": torch.randn(experts, hidden, generator=gen).to(torch.bfloat16)}
    for e in range(experts):
        shared_scale = torch.rand((), generator=gen) + 0.5  # gate and up share it, as quantizers do
        for proj, (rows, cols) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                   ("down_proj", (hidden, inter))):
            name = f"{prefix}.{e}.{proj}"
            tensors[f"{name}.weight"] = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen)
            tensors[f"{name}.weight_scale"] = torch.randint(
                0, 0x7F, (rows, cols // 16), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
            global_scale = torch.rand((), generator=gen) + 0.5 if proj == "down_proj" else shared_scale
            tensors[f"{name}.weight_scale_2"] = global_scale.clone()
            tensors[f"{name}.input_scale"] = torch.rand((), generator=gen) + 0.5
    save_file(tensors, path, metadata={"format": "pt"})


def write_checkpoint(directory: Path, layers: int, experts: int, hidden: int, inter: int) -> list[Path]:
    """A ModelOpt NVFP4 checkpoint with ``layers`` MoE layers, one shard each, plus embeddings."""
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    total = layers + 1
    weight_map, files = {}, []
    for number in range(total):
        path = directory / f"model-{number + 1:05d}-of-{total:05d}.safetensors"
        if number < layers:
            write_layer(path, number, experts, hidden, inter, gen)
        else:
            save_file({"model.embed_tokens.weight": torch.randn(1024, hidden, generator=gen).to(torch.bfloat16)}, path)
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        weight_map.update({name: path.name for name in header if name != "__metadata__"})
        files.append(path)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"model_type": "synthetic_moe", "quantization_config": {
        "quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": []}}))
    return files


def read_loop(files: list[Path]) -> float:
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass
    return time.perf_counter() - start


def copy_loop(files: list[Path], target: Path) -> float:
    """Read + write + fsync of every file: the floor for any job that reads and writes as many bytes."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as source, open(target / path.name, "wb", buffering=0) as sink:
            while count := source.readinto(view):
                sink.write(view[:count])
            os.fsync(sink.fileno())
    seconds = time.perf_counter() - start
    shutil.rmtree(target)
    return seconds


def cat(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def timed_prepare(source: Path, out: Path, preparers: list, backend: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = prepare_checkpoint(open_checkpoint(source), out, preparers, backend)
    seconds = time.perf_counter() - start
    if summary.layers_skipped:
        raise RuntimeError("a benchmark run resumed an earlier output")
    shutil.rmtree(out)
    return seconds


# The embedded job's stages that --profile times, as the methods that run them (the preparer is timed apart).
PROFILED = {"read": (Checkpoint, "read_layer"), "stage": (PreparedCheckpointWriter, "stage_layer"),
            "write": (PreparedCheckpointWriter, "write"), "commit": (PreparedCheckpointWriter, "commit")}


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of ``spans``: how long at least one of them ran."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


class StageProfile:
    """Start and end of every call of each stage of one job, and the CPU time of the thread that ran it (not
    counting torch's own worker threads), recorded by wrappers around the stages' methods."""

    def __init__(self) -> None:
        names = ("read", "prepare", "stage", "write", "commit")
        self.spans: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        self.cpu: dict[str, list[float]] = {name: [] for name in names}

    def timed(self, name: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed_call(*args, **kwargs):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:  # list.append: safe from any thread
                self.cpu[name].append(time.thread_time() - cpu)
                self.spans[name].append((start, time.perf_counter()))
        return timed_call

    @contextlib.contextmanager
    def wrapped(self) -> Iterator[None]:
        originals = {name: getattr(owner, method) for name, (owner, method) in PROFILED.items()}
        for name, (owner, method) in PROFILED.items():
            setattr(owner, method, self.timed(name, originals[name]))
        try:
            yield
        finally:
            for name, (owner, method) in PROFILED.items():
                setattr(owner, method, originals[name])

    def print(self, wall: float) -> None:
        print(f"profile of one embedded prepare run, {wall:.2f}s wall:")
        print(f"  {'stage':<14} {'calls':>6} {'sum s':>8} {'cpu s':>8} {'busy s':>8} {'busy':>6}")
        rows = [(name, self.spans[name], self.cpu[name]) for name in self.spans]
        rows.append(("write|commit", self.spans["write"] + self.spans["commit"],
                     self.cpu["write"] + self.cpu["commit"]))
        for name, spans, cpu in rows:
            busy = busy_seconds(spans)
            print(f"  {name:<14} {len(spans):6d} {sum(b - a for a, b in spans):8.2f} {sum(cpu):8.2f} {busy:8.2f} "
                  f"{busy / wall:6.0%}")


def profiled_prepare(source: Path, out: Path, preparer: Callable, backend: str) -> None:
    """One embedded run under ``StageProfile``, printed."""
    profile = StageProfile()
    os.sync()
    with profile.wrapped():
        seconds = timed_prepare(source, out, [profile.timed("prepare", preparer)], backend)
    profile.print(seconds)


def start_server_process(allowed_root: Path) -> tuple[subprocess.Popen, str]:
    """A server process on loopback that also reads checkpoints under ``allowed_root``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(allowed_root)])
    address = f"127.0.0.1:{port}"
    with PrepClient(address, retries=30, backoff=0.2, max_backoff=1.0) as client:
        client.capabilities(timeout=120)
    return process, address


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=0.7, help="checkpoint size in GB (default: %(default)s)")
    parser.add_argument("--experts", type=int, default=128, help="experts per layer (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (default: %(default)s)")
    parser.add_argument("--intermediate", type=int, default=768, help="expert intermediate size (default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default="flashinfer_cutedsl")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each measurement; the best is kept")
    parser.add_argument("--work-dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--profile", action="store_true",
                        help="also time one embedded prepare run stage by stage (read, prepare, stage, write, commit)")
    add_json_flag(parser)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nvfp4-prep-bench-", dir=args.work_dir))
    try:
        per_layer = layer_bytes(args.experts, args.hidden, args.intermediate)
        layers = max(1, round(args.size_gb * 1e9 / per_layer))
        source, out = work / "source", work / "out"
        started = time.perf_counter()
        files = write_checkpoint(source, layers, args.experts, args.hidden, args.intermediate)
        size = sum(path.stat().st_size for path in files)
        print(f"checkpoint: {layers} MoE layers x {args.experts} experts (H={args.hidden}, I={args.intermediate}), "
              f"{size / 1e9:.2f} GB in {len(files)} shards, written in {time.perf_counter() - started:.1f}s; "
              f"backend {args.backend}; hot page cache; best of {args.repeat}")
        read_loop(files)  # warm the page cache

        def synced(fn) -> float:
            os.sync()
            return fn()

        def best(fn) -> float:
            return min(synced(fn) for _ in range(args.repeat))

        def gbps(seconds: float) -> float:
            return size / seconds / 1e9

        read, copy = "read loop", "copy loop (read+write+fsync)"
        read_gbps = gbps(best(lambda: read_loop(files)))
        copy_gbps = gbps(best(lambda: copy_loop(files, out)))
        rows = [row(read, read_gbps, read, read_gbps), row("cat", gbps(best(lambda: cat(files))), read, read_gbps),
                row(copy, copy_gbps, copy, copy_gbps)]
        reset_device_peak()
        with layer_preparers([]) as preparers:  # what the README's first command runs
            rows.append(row("prepare", gbps(best(lambda: timed_prepare(source, out, preparers, args.backend))),
                            copy, copy_gbps))
            if args.profile:
                profiled_prepare(source, out, preparers[0], args.backend)
        process, address = start_server_process(source)
        try:
            for suffix, streams in (("", DEFAULT_BULK_STREAMS), (" --bulk-streams 0", 0)):
                security = {"bulk_streams": streams}
                with open_checkpoint(source) as checkpoint, layer_preparers(  # --send auto: references here
                        [address], security=security,
                        sending=Sending("auto", checkpoint, str(source), args.backend)) as preparers:
                    if not isinstance(preparers[0], ReferencePreparer):
                        raise RuntimeError("--send auto did not send references to a server that reads the files")
                    seconds = best(lambda: timed_prepare(source, out, preparers, args.backend))
                    rows.append(row(f"prepare --server{suffix}", gbps(seconds), copy, copy_gbps))
                with layer_preparers([address], security=security) as preparers:  # uploads: --send tensors
                    seconds = best(lambda: timed_prepare(source, out, preparers, args.backend))
                    rows.append(row(f"prepare --server --send tensors{suffix}", gbps(seconds), copy, copy_gbps))
        finally:
            process.terminate()
            process.wait(60)
        print_rows(rows)
        write_json(args.json, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
