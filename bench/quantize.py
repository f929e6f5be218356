"""Benchmark of BF16 -> NVFP4 quantization (each recipe), then prepare, against clone() of the BF16 inputs; and
the same BF16 layer streamed through the server into device memory, against raw TCP of the same bytes.

Prints, per recipe: the time of quantize_layer and of quantize + prepare for one backend, GB/s (BF16 input
bytes over time) and the ratio of clone() time to that time, measured in the same run (1.0 = as fast as a
plain device copy of the BF16 bytes). Runs on CUDA when present, through the fused Triton kernels
(``triton_quantize``) where Triton imports; ``NVFP4_PREP_QUANTIZE_KERNEL=torch`` measures the eager torch path.

``--server`` (on by default when CUDA is present) starts ``nvfp4-prep serve`` on 127.0.0.1 on the bench's
device (bench/service.py's ``start_server``, with a bulk port) and times, per recipe, ``PrepClient.prepare_layer``
of a BF16 host layer of ``--server-experts`` experts with ``quantize=recipe``, landing in the bench's device
(``device=``): once over the inline gRPC stream, once with ``bulk_streams=--bulk-streams``. After a warm-up with a
tiny layer, every path's first call is checked bit for bit against ``prepare(quantize_layer(...))`` in this process
on the same device (the bench stops if it differs, or if the bulk client went inline); each row is then the median
of --repeat calls. The baseline is one raw TCP stream (bench/service.py's peer) carrying the same bytes: the BF16
layer and its activation scales up, the prepared bytes down. A row prints its seconds, GB/s of BF16 input bytes
over wall time (the raw TCP row too, so that a JSON row's ratio is its gbps over the baseline's), the ratio of its
rate to raw TCP's over the same bytes (up + down over wall time, as bench/service.py counts) and the server's peaks
during the row (bench/service.py's ``server_peaks``: its peak RSS and its peak extra device memory), which its JSON
row carries too.

    python bench/quantize.py                    # GPU: a DeepSeek-R1-sized layer (E 256, H 7168, I 2048);
                                                # through the server E 64 (5.6 GB of BF16), landing on the GPU
    python bench/quantize.py --small            # a small layer for the CPU
    python bench/quantize.py --small --server   # also through a server on the CPU, the small layer
    python bench/quantize.py --no-server        # the in-process rows only
    python bench/quantize.py --server-experts 32 --bulk-streams 8   # the server part's E, bulk connections
    python bench/quantize.py --json rows.json   # also one row per measured path as JSON (bench/report.py)
    NVFP4_PREP_QUANTIZE_KERNEL=torch python bench/quantize.py --recipes modelopt --repeat 1
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nvfp4_prep.client import PrepClient, RemoteLayer
from nvfp4_prep.contract.environment import env_value
from nvfp4_prep.contract.layout import BACKENDS
from nvfp4_prep.contract.tensor_bytes import dense
from nvfp4_prep.pipeline import prepare
from nvfp4_prep.pipeline.quantize import RECIPES, quantize_layer, triton_quantize
from nvfp4_prep.server.config import parse_size
from pipeline import clone_all, timed
from report import Row, add_json_flag, reset_device_peak, row, write_json
from service import Server, nbytes, peaks_text, run_tcp, server_peaks, start_server, tcp_peer

SMALL = {"experts": 8, "hidden": 1024, "intermediate": 512}
SERVER_EXPERTS = 64  # E of the server part without --small: 5.6 GB of BF16 at H 7168, I 2048
CHUNK_SIZE = "4MiB"  # bench/service.py's default chunk size, for the server and the SDK alike


def bf16_layer(experts: int, hidden: int, inter: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    return {"w13_weight": torch.randn(experts, 2 * inter, hidden, generator=gen, device=device,
                                      dtype=torch.bfloat16) * 0.02,
            "w2_weight": torch.randn(experts, hidden, inter, generator=gen, device=device, dtype=torch.bfloat16) * 0.02}


def input_scales(experts: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {"w13_input_scale": torch.full((experts, 2), 0.002, device=device),
            "w2_input_scale": torch.full((experts,), 0.001, device=device)}


def in_process_rows(args: argparse.Namespace, sizes: dict[str, int], device: torch.device) -> list[Row]:
    """quantize_layer and prepare(quantize_layer(...)) per recipe, against clone() of the BF16 inputs."""
    layer = bf16_layer(sizes["experts"], sizes["hidden"], sizes["intermediate"], device)
    scales = input_scales(sizes["experts"], device)
    size = nbytes(layer)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fused = env_value("quantize-kernel", "auto") != "torch" and triton_quantize.available(layer["w13_weight"])
    print(f"device {name}; E={sizes['experts']} H={sizes['hidden']} I={sizes['intermediate']}; "
          f"{size / 1e9:.2f} GB of BF16; quantize kernel: {'triton' if fused else 'torch'}")

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
    return rows


# -- through the server ------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    """``device`` as ``nvfp4-prep serve --device`` takes it: cpu or cuda:N (a bare "cuda" is the current GPU)."""
    if device.type != "cuda":
        return "cpu"
    return f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"


def wall_seconds(call: Callable[[], object], repeat: int) -> float:
    """Median wall seconds of ``repeat`` calls; each result is freed outside the clock."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
        del result
    return statistics.median(times)


def check_landed(got: RemoteLayer, want: dict[str, torch.Tensor], layout_id: str, device: torch.device,
                 path: str) -> None:
    """Stops the bench unless ``got`` holds exactly ``want``'s tensors, bytes and layout id, on ``device``."""
    if got.layout.get("layout_id") != layout_id:
        raise SystemExit(f"{path}: layout_id is {got.layout.get('layout_id')!r}, expected {layout_id!r} "
                         "(prepare(quantize_layer(...)) in this process)")
    if sorted(got.tensors) != sorted(want):
        raise SystemExit(f"{path}: landed tensors {sorted(got.tensors)}, expected {sorted(want)}")
    for name, expected in want.items():
        landed = got.tensors[name]
        if landed.device != device or landed.dtype != expected.dtype or landed.shape != expected.shape:
            raise SystemExit(f"{path}: {name} landed as {landed.dtype} {tuple(landed.shape)} on {landed.device}, "
                             f"expected {expected.dtype} {tuple(expected.shape)} on {device}")
        if not torch.equal(dense(landed).reshape(-1).view(torch.uint8), dense(expected).reshape(-1).view(torch.uint8)):
            raise SystemExit(f"{path}: {name} differs from prepare(quantize_layer(...)) in this process")


def raw_tcp_seconds(port: int, sent: dict[str, torch.Tensor], down: int, repeat: int) -> float:
    """Median seconds of one raw TCP stream carrying ``sent`` up and ``down`` bytes back, after a warm-up."""
    sink = [memoryview(torch.zeros(down, dtype=torch.uint8).numpy())]
    run_tcp(port, sent, down, 1, sink)
    return statistics.median(run_tcp(port, sent, down, 1, sink) for _ in range(repeat))


class BulkFallbacks(logging.Handler):
    """Collects the SDK's "bulk transport not used" notice (logged at INFO), so a bulk row that went inline fails."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.reasons.append(record.getMessage())


def server_rows(args: argparse.Namespace, sizes: dict[str, int], device: torch.device) -> list[Row]:
    """The BF16 host layer through ``nvfp4-prep serve`` into ``device`` per recipe, inline and bulk, against one
    raw TCP stream of the same bytes; the JSON rows carry the server's peak RSS during each row."""
    where = device_name(device)
    landing = torch.device(where)
    experts = args.server_experts or (sizes["experts"] if args.small else SERVER_EXPERTS)
    hidden, inter = sizes["hidden"], sizes["intermediate"]
    on_device = bf16_layer(experts, hidden, inter, landing)  # made where it is fast; the reference reads it
    host = {name: tensor.cpu() for name, tensor in on_device.items()}  # the one host copy (itself on the CPU)
    device_scales = input_scales(experts, landing)
    host_scales = {name: tensor.cpu() for name, tensor in device_scales.items()}
    warmup, warmup_scales = bf16_layer(2, hidden, inter, torch.device("cpu")), input_scales(2, torch.device("cpu"))
    size, up = nbytes(host), nbytes(host) + nbytes(host_scales)
    recipes = args.recipes.split(",")
    print(f"\nserver on {where}: E={experts} H={hidden} I={inter}; {size / 1e9:.2f} GB of BF16 from host memory, "
          f"landing on {where}; chunk size {CHUNK_SIZE}, {args.bulk_streams} bulk connections per call", flush=True)

    fallbacks = BulkFallbacks()
    sdk_log = logging.getLogger("nvfp4_prep.client.bulk")
    sdk_log.addHandler(fallbacks)
    sdk_log.setLevel(logging.INFO)
    spawn = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue = spawn.Queue()
    peer = spawn.Process(target=tcp_peer, args=(ports,), daemon=True)
    peer.start()
    tcp_port = ports.get(timeout=120)
    root = tempfile.TemporaryDirectory(prefix="nvfp4-prep-bench-")  # the server's --allowed-root: nothing is read
    server: Server = start_server(where, CHUNK_SIZE, "auto", Path(root.name))
    rows: list[Row] = []
    try:
        chunk = parse_size(CHUNK_SIZE)
        with (PrepClient(server.address, chunk_size=chunk) as inline,
              PrepClient(server.address, chunk_size=chunk, bulk_streams=args.bulk_streams) as bulk):
            clients = {"": inline, " (bulk)": bulk}

            def call(client: PrepClient, recipe: str) -> RemoteLayer:
                return client.prepare_layer(host, args.backend, quantize=recipe, activation_scales=host_scales,
                                            device=where)

            for client in clients.values():
                client.prepare_layer(warmup, args.backend, quantize=recipes[0], activation_scales=warmup_scales,
                                     device=where)
            down = {}  # prepared bytes per recipe
            for recipe in recipes:  # every path checked (and warmed up) before any is timed
                want = prepare(quantize_layer(on_device, recipe, device_scales), args.backend)
                down[recipe] = nbytes(want.tensors)
                for suffix, client in clients.items():
                    check_landed(call(client, recipe), want.tensors, want.layout["layout_id"], landing,
                                 f"server bf16 {recipe} x1{suffix}")
                del want
            if fallbacks.reasons:
                raise SystemExit(f"the bulk rows would go inline: {fallbacks.reasons[0]}")
            del on_device  # the timed rows hold nothing on the device but what lands

            # The prepared size is the backend's whatever the recipe: one baseline for every row.
            tcp_s = raw_tcp_seconds(tcp_port, {**host, **host_scales}, down[recipes[0]], args.repeat)
            tcp_rate = (up + down[recipes[0]]) / tcp_s
            print(f"{'path':<50} {'seconds':>9} {'GB/s':>8} {'vs tcp1':>8}  server peaks")
            print(f"{'raw TCP x1':<50} {tcp_s:9.3f} {size / tcp_s / 1e9:8.2f} {1:8.3f}  -  "
                  f"({(up + down[recipes[0]]) / 1e9:.2f} GB moved, {tcp_rate / 1e9:.2f} GB/s)", flush=True)
            rows.append(Row("raw TCP x1", size / tcp_s / 1e9, 1.0, "raw TCP x1", 0, 0))
            for recipe in recipes:
                for suffix, client in clients.items():
                    path = f"server bf16 {recipe} x1{suffix}"
                    with server_peaks(server) as peaks:
                        seconds = wall_seconds(lambda client=client, recipe=recipe: call(client, recipe), args.repeat)
                    ratio = (up + down[recipe]) / seconds / tcp_rate
                    print(f"{path:<50} {seconds:9.3f} {size / seconds / 1e9:8.2f} {ratio:8.3f} "
                          f"{peaks_text(peaks)}", flush=True)
                    rows.append(Row(path, size / seconds / 1e9, ratio, "raw TCP x1", peaks.rss or 0, peaks.device or 0))
    finally:
        sdk_log.removeHandler(fallbacks)
        server.process.terminate()
        server.process.wait(timeout=60)
        peer.terminate()
        root.cleanup()
    return rows


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
    parser.add_argument("--server", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                        help="also through nvfp4-prep serve on the device (default: on when CUDA is present)")
    parser.add_argument("--server-experts", type=int, default=None,
                        help=f"E of the server part (default {SERVER_EXPERTS}; with --small the small layer's)")
    parser.add_argument("--bulk-streams", type=int, default=4,
                        help="bulk connections per call in the bulk rows (default 4)")
    add_json_flag(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = SMALL if args.small else {"experts": args.experts, "hidden": args.hidden, "intermediate": args.intermediate}
    rows = in_process_rows(args, sizes, device)
    if args.server:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the in-process layer's memory, back for the server on the same GPU
        rows += server_rows(args, sizes, device)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
