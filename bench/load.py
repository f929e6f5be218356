"""Load test: many concurrent clients preparing layers against one server on loopback, for a bounded time.

    python bench/load.py --clients 32 --duration 60 --experts 128 --hidden 2048 --inter 768 --device cuda:0

Starts ``nvfp4-prep serve`` as a subprocess on 127.0.0.1 (prepared-layer cache
off, so every call computes), makes ``--layers`` distinct random layers and
their expected prepared bytes in this process (``nvfp4_prep.pipeline.prepare``
on the CPU), then runs ``--clients`` clients spread over ``--processes``
processes, each client with its own connection, each preparing layer after
layer until ``--duration`` is up. Every answer's chunks are CRC-checked by the
SDK and its tensors are compared with the expected SHA-256 digests.

Prints throughput (layers/s and GB/s moved, up plus down), p50 and p99
latency, the peak server memory against its budget (resident set, the
budget's bytes in use and GPU memory when the server's metrics show them),
and counts of errors and checksum mismatches; exits 1 unless both are zero.
The baseline, measured first in the same run, is one client alone: ``vs 1``
divides by it.

Then the landing rows: one client prepares one layer of ``--landing-experts``
experts (0: no such rows) into pageable CPU tensors (the plain path, the
baseline) and with ``device="cuda"`` (pinned staging ring, asynchronous copies
on a stream of their own), each row in a fresh process of its own after a
one-expert warm-up, best of ``--landing-repeat`` calls. Each row prints its
rate (bytes up plus down over the call's wall time), its ratio to the plain
path, the process's peak resident set and torch's peak device memory, then how
much the resident set grew during the call (VmHWM reset before each call, where
the kernel allows it) and the peak of pinned host memory. On a host without
CUDA the CUDA row is skipped with the reason. ``--json PATH``
writes the landing rows (bench/report.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from report import Row, add_json_flag, print_rows, write_json

BACKEND_DEFAULT = "flashinfer_cutedsl"
_PORT = re.compile(r" on [^ ]*:(\d+)")


# -- layers and their expected answers ---------------------------------------------------------------

def make_layer(experts: int, hidden: int, inter: int, seed: int) -> dict[str, torch.Tensor]:
    """A stacked, gated layer of random codes and block scales with positive global scales."""
    gen = torch.Generator().manual_seed(seed)
    n1 = 2 * inter

    def u8(*shape: int, high: int = 256) -> torch.Tensor:
        return torch.randint(0, high, shape, dtype=torch.uint8, generator=gen)

    def scale(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=gen, dtype=torch.float32) + 0.5

    first = scale(experts)
    return {
        "w13_weight": u8(experts, n1, hidden // 2),
        "w13_weight_scale": u8(experts, n1, hidden // 16, high=0x7F).view(torch.float8_e4m3fn),
        "w13_weight_scale_2": torch.stack([first, first], 1),
        "w13_input_scale": torch.stack([first, first], 1),
        "w2_weight": u8(experts, hidden, inter // 2),
        "w2_weight_scale": u8(experts, hidden, inter // 16, high=0x7F).view(torch.float8_e4m3fn),
        "w2_weight_scale_2": scale(experts),
        "w2_input_scale": scale(experts),
    }


def digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for name, t in tensors.items()}


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# -- the server --------------------------------------------------------------------------------------

@dataclass
class Server:
    process: subprocess.Popen
    address: str = ""
    metrics_port: int = 0
    log_tail: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args: argparse.Namespace, extra: Sequence[str] = ()) -> Server:
    """The server on ``args.device`` with ``args.memory_budget``; ``extra`` flags come last, so they win."""
    metrics_port = free_port()
    command = [sys.executable, "-m", "nvfp4_prep.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
               "--device", args.device, "--memory-budget", args.memory_budget, "--cache-bytes", "0",
               "--max-concurrent", str(max(args.clients, 1) * 2), "--log-format", "json",
               "--metrics-port", str(metrics_port), *extra]
    server = Server(subprocess.Popen(command, stderr=subprocess.PIPE, text=True), metrics_port=metrics_port)
    bound = threading.Event()

    def read_log() -> None:
        for line in server.process.stderr:
            server.log_tail = [*server.log_tail, line][-20:]
            if bound.is_set() or not line.startswith("{"):
                continue
            record = json.loads(line)
            port = record.get("port") or (_PORT.search(record.get("message", "")) or [None, None])[1]
            if record.get("message", "").startswith("serving") and port:
                server.address = f"127.0.0.1:{port}"
                bound.set()
        bound.set()

    threading.Thread(target=read_log, daemon=True).start()
    if not bound.wait(300) or not server.address:
        server.process.kill()
        raise RuntimeError("the server did not start:\n" + "".join(server.log_tail))
    return server


def scrape(port: int) -> dict[str, float]:
    """Samples of the server's metrics page, by metric name with labels (empty if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
            text = page.read().decode()
    except OSError:
        return {}
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                samples[name] = float(value)
            except ValueError:
                pass
    return samples


class MemoryWatch:
    """Peaks of the server's resident set, its budget in use and its GPU memory, sampled every 0.2 s."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak_budget_in_use = 0.0
        self.peak_gpu_allocated = 0.0
        self.seen_metrics = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            samples = scrape(self.server.metrics_port)
            for name, value in samples.items():
                if name.startswith("nvfp4_prep_memory_budget_in_use_bytes"):
                    self.seen_metrics = True
                    self.peak_budget_in_use = max(self.peak_budget_in_use, value)
                elif name.startswith("nvfp4_prep_gpu_memory_allocated_bytes"):
                    self.peak_gpu_allocated = max(self.peak_gpu_allocated, value)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak_rss(self) -> int:
        """The server's peak resident set (VmHWM), in bytes."""
        with open(f"/proc/{self.server.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0


# -- clients -----------------------------------------------------------------------------------------

def client_process(address: str, clients: int, first_client: int, shape: tuple[int, int, int],
                   expected: list[dict[str, str]], backend: str, ready: multiprocessing.Queue,
                   window, go, results: multiprocessing.Queue, client_options: dict | None = None) -> None:
    """``clients`` client threads, each with its own connection, preparing layers from when ``go`` is set
    (after every process reported ``ready``) until the end of ``window`` (start, stop in ``time.time()``).
    ``client_options`` are further ``PrepClient`` arguments (a token, a shorter timeout)."""
    from nvfp4_prep.client import PrepClient
    from nvfp4_prep.client.errors import PrepChecksumError, PrepClientError

    torch.set_num_threads(1)
    layers = [make_layer(*shape, seed) for seed in range(len(expected))]  # the parent's layers, made again
    outcome = {"latencies": [], "bytes": 0, "errors": Counter(), "mismatches": 0, "checksum_errors": 0}
    lock = threading.Lock()

    connected = threading.Barrier(clients + 1)

    def run(client_index: int) -> None:
        # Each client its own connection, as separate loader processes would have.
        options = {"options": [("grpc.use_local_subchannel_pool", 1)], "timeout": 600, **(client_options or {})}
        with PrepClient(address, **options) as client:
            client.capabilities()
            connected.wait()
            go.wait()
            start_at, stop_at = window[0], window[1]
            while time.time() < start_at:
                time.sleep(0.001)
            call = client_index
            while time.time() < stop_at:
                which = call % len(layers)
                call += 1
                started = time.perf_counter()
                try:
                    result = client.prepare_layer(layers[which], backend)
                except PrepChecksumError:
                    with lock:
                        outcome["checksum_errors"] += 1
                    continue
                except PrepClientError as err:
                    with lock:
                        outcome["errors"][err.code.name if err.code else type(err).__name__] += 1
                    continue
                seconds = time.perf_counter() - started
                moved = nbytes(layers[which]) + nbytes(result.tensors)
                same = digests(result.tensors) == expected[which]
                del result
                with lock:
                    outcome["latencies"].append(seconds)
                    outcome["bytes"] += moved
                    outcome["mismatches"] += 0 if same else 1

    threads = [threading.Thread(target=run, args=(first_client + i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    connected.wait()
    ready.put(True)
    for thread in threads:
        thread.join()
    results.put({**outcome, "errors": dict(outcome["errors"])})


def run_load(address: str, clients: int, processes: int, shape: tuple[int, int, int],
             expected: list[dict[str, str]], backend: str, duration: float, client_options: dict | None = None) -> dict:
    """Runs ``clients`` clients for ``duration`` seconds; their merged outcome plus the wall time."""
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()
    ready: multiprocessing.Queue = context.Queue()
    window, go = context.Array("d", 2), context.Event()
    processes = max(1, min(processes, clients))
    procs = []
    first = 0
    for p in range(processes):
        count = clients // processes + (1 if p < clients % processes else 0)
        procs.append(context.Process(target=client_process, args=(
            address, count, first, shape, expected, backend, ready, window, go, results, client_options)))
        first += count
    for proc in procs:
        proc.start()
    for _ in procs:  # every client made its layers and connected
        ready.get(timeout=600)
    start_at = time.time() + 0.2
    window[0], window[1] = start_at, start_at + duration
    go.set()
    merged = {"latencies": [], "bytes": 0, "errors": Counter(), "mismatches": 0, "checksum_errors": 0}
    for _ in procs:
        outcome = results.get()
        merged["latencies"] += outcome["latencies"]
        merged["bytes"] += outcome["bytes"]
        merged["errors"].update(outcome["errors"])
        merged["mismatches"] += outcome["mismatches"]
        merged["checksum_errors"] += outcome["checksum_errors"]
    ended = time.time()
    for proc in procs:
        proc.join()
    merged["seconds"] = ended - start_at
    return merged


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def add_layer_flags(parser: argparse.ArgumentParser, layers: int) -> None:
    """--layers (default ``layers``), --experts, --hidden and --inter of the layers the clients send."""
    parser.add_argument("--layers", type=int, default=layers,
                        help=f"distinct layers the clients cycle through (default {layers})")
    parser.add_argument("--experts", type=int, default=8, help="E (default 8)")
    parser.add_argument("--hidden", type=int, default=1024, help="H (default 1024)")
    parser.add_argument("--inter", type=int, default=512, help="I (default 512)")


# -- landing rows: where one client's answer lands ---------------------------------------------------

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def resident(key: str) -> int:
    """This process's VmRSS or VmHWM, in bytes (0 where /proc does not say)."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current resident set (Linux: "5" into clear_refs); False where that is refused."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Landed:
    """The best run of one landing row, and the peaks over all its runs."""

    name: str
    seconds: float = float("inf")
    peak_rss: int = 0
    rss_growth: int = 0
    peak_device: int = 0
    peak_pinned: int = 0


def land(client, layer: dict[str, torch.Tensor], backend: str, device: str | None, expected: dict[str, str],
         row: Landed) -> None:
    """One call landing ``layer``'s answer on ``device``; its time and memory peaks go into ``row``."""
    cuda = device is not None and device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.reset_peak_host_memory_stats()
    start_rss = resident("VmRSS")
    reset = reset_peak_rss()
    started = time.perf_counter()
    result = client.prepare_layer(layer, backend, device=device)
    seconds = time.perf_counter() - started  # the SDK synchronized its copies before returning
    peak = resident("VmHWM")
    row.seconds = min(row.seconds, seconds)
    row.peak_rss = max(row.peak_rss, peak)
    row.rss_growth = max(row.rss_growth, peak - start_rss if reset else 0)
    if cuda:
        row.peak_device = max(row.peak_device, int(torch.cuda.max_memory_allocated()))
        row.peak_pinned = max(row.peak_pinned, int(torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0)))
    if digests({name: t.cpu() for name, t in result.tensors.items()}) != expected:  # after the peaks are read
        raise RuntimeError(f"{row.name}: the answer differs from the expected bytes")


def landing_process(address: str, shape: tuple[int, int, int], backend: str, name: str, device: str | None,
                    repeat: int, expected: dict[str, str], results: multiprocessing.Queue) -> None:
    """One landing row in a fresh process, so that its resident set shows this path alone: a warm-up with a
    one-expert layer (connection, CUDA context), then ``repeat`` calls with the row's layer."""
    from nvfp4_prep.client import PrepClient

    layer = make_layer(*shape, seed=1000)
    warm = make_layer(1, *shape[1:], seed=1001)
    row = Landed(name)
    with PrepClient(address, timeout=600) as client:
        client.prepare_layer(warm, backend, device=device)
        for _ in range(repeat):
            land(client, layer, backend, device, expected, row)
    results.put(row)


def landing_rows(address: str, args: argparse.Namespace) -> list[Row]:
    """The plain path and ``device="cuda"`` for one layer of ``--landing-experts`` experts, each row in a
    process of its own, one after the other."""
    from nvfp4_prep import pipeline

    shape = (args.landing_experts, args.hidden, args.inter)
    layer = make_layer(*shape, seed=1000)
    prepared = pipeline.prepare(layer, args.backend).tensors
    expected, moved = digests(prepared), nbytes(layer) + nbytes(prepared)
    print(f"\nlanding: one layer of E={args.landing_experts} H={args.hidden} I={args.inter} "
          f"({nbytes(layer) / 1e6:.1f} MB in, {nbytes(prepared) / 1e6:.1f} MB out), best of {args.landing_repeat}",
          flush=True)
    del layer, prepared
    paths: list[tuple[str, str | None]] = [("stream plain (cpu)", None)]
    if torch.cuda.is_available():
        paths.append(("stream device=cuda", "cuda"))
    else:
        print("stream device=cuda: skipped, CUDA is not available on this host")
    context = multiprocessing.get_context("spawn")
    landed = []
    for name, device in paths:
        results: multiprocessing.Queue = context.Queue()
        process = context.Process(target=landing_process, args=(address, shape, args.backend, name, device,
                                                                args.landing_repeat, expected, results))
        process.start()
        landed.append(results.get(timeout=1800))
        process.join()
    base = moved / landed[0].seconds / 1e9
    rows = [Row(row.name, moved / row.seconds / 1e9, moved / row.seconds / 1e9 / base, landed[0].name,
                row.peak_rss, row.peak_device) for row in landed]
    print_rows(rows)
    for row in landed:
        pinned = f"; peak pinned {row.peak_pinned / 2**20:.1f} MiB" if row.peak_pinned else ""
        print(f"{row.name}: resident set grew {row.rss_growth / 2**20:.1f} MiB during the call{pinned}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--processes", type=int, default=min(8, os.cpu_count() or 1),
                        help="client processes the clients are spread over (default: up to 8)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    parser.add_argument("--baseline-duration", type=float, default=10.0,
                        help="seconds of the one-client baseline (default 10)")
    add_layer_flags(parser, layers=4)
    parser.add_argument("--backend", default=BACKEND_DEFAULT, help=f"default {BACKEND_DEFAULT}")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu",
                        help="the server's device (default cuda:0 if there is a GPU, else cpu)")
    parser.add_argument("--memory-budget", default="auto", help="the server's --memory-budget (default auto)")
    parser.add_argument("--landing-experts", type=int, default=64,
                        help="E of the layer of the landing rows (default 64; 0: no landing rows)")
    parser.add_argument("--landing-repeat", type=int, default=3, help="runs of each landing row (default 3)")
    add_json_flag(parser)
    args = parser.parse_args(argv)

    from nvfp4_prep import pipeline
    from nvfp4_prep.client import PrepClient

    shape = (args.experts, args.hidden, args.inter)
    layers = [make_layer(*shape, seed) for seed in range(args.layers)]
    expected = [digests(pipeline.prepare(layer, args.backend).tensors) for layer in layers]
    print(f"{args.layers} layers of E={args.experts} H={args.hidden} I={args.inter} "
          f"({nbytes(layers[0]) / 1e6:.1f} MB each), backend {args.backend}, server on {args.device}, "
          f"{os.cpu_count()} CPUs", flush=True)

    server = start_server(args)
    try:
        with PrepClient(server.address) as client:
            capabilities = client.capabilities()
            client.prepare_layer(layers[0], args.backend)  # warm-up: imports, kernels, allocator
        budget = capabilities.devices[0].memory_budget_bytes
        baseline = run_load(server.address, 1, 1, shape, expected, args.backend, args.baseline_duration)
        watch = MemoryWatch(server)
        loaded = run_load(server.address, args.clients, args.processes, shape, expected, args.backend, args.duration)
        watch.stop()
        peak_rss = watch.peak_rss()
        landed = landing_rows(server.address, args) if args.landing_experts > 0 else []
    finally:
        server.process.terminate()
        server.process.wait(timeout=60)

    def row(label: str, outcome: dict) -> str:
        calls = len(outcome["latencies"])
        rate = outcome["bytes"] / outcome["seconds"] / 1e9
        return (f"{label:<12} {calls:>6} {calls / outcome['seconds']:>9.2f} {rate:>7.3f} "
                f"{percentile(outcome['latencies'], 0.5):>8.3f} {percentile(outcome['latencies'], 0.99):>8.3f}")

    print()
    print(f"{'clients':<12} {'calls':>6} {'layers/s':>9} {'GB/s':>7} {'p50 s':>8} {'p99 s':>8}")
    print(row("1 (baseline)", baseline))
    print(row(str(args.clients), loaded))
    base_rate = len(baseline["latencies"]) / baseline["seconds"]
    if base_rate and loaded["latencies"]:
        print(f"vs 1: throughput x{len(loaded['latencies']) / loaded['seconds'] / base_rate:.2f}, "
              f"p50 latency x{percentile(loaded['latencies'], 0.5) / percentile(baseline['latencies'], 0.5):.2f}")
    print(f"server memory budget {budget / 2**30:.2f} GiB; peak resident set {peak_rss / 2**30:.2f} GiB", end="")
    if watch.seen_metrics:
        print(f"; peak budget in use {watch.peak_budget_in_use / 2**30:.2f} GiB "
              f"({watch.peak_budget_in_use / budget:.0%})", end="")
    if watch.peak_gpu_allocated:
        print(f"; peak GPU allocated {watch.peak_gpu_allocated / 2**30:.2f} GiB", end="")
    print()
    errors = Counter(baseline["errors"]) + Counter(loaded["errors"])
    crc_failures = baseline["checksum_errors"] + loaded["checksum_errors"]
    differing = baseline["mismatches"] + loaded["mismatches"]
    mismatches = crc_failures + differing
    print(f"errors {sum(errors.values())} {dict(errors) if errors else ''}".rstrip())
    print(f"checksum mismatches {mismatches} (chunk CRC failures {crc_failures}, answers differing from the "
          f"expected bytes {differing})")
    write_json(args.json, landed)
    return 0 if not errors and not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
