"""End-to-end Prepare through the server on loopback, against raw TCP of the same bytes.

    python bench/service.py --experts 256 --hidden 7168 --inter 2048 --device cuda:0 --streams 1,2,4

Starts ``nvfp4-prep serve`` as a subprocess on 127.0.0.1 (its metrics on a free
port) and a raw TCP peer as another process, then, for one random layer of the
given size:

- raw TCP: the layer's bytes sent up one connection and as many bytes as the
  prepared layer has sent back (the peer receives into and sends from one
  reusable buffer: transport and nothing else); also N connections at once;
- gRPC: ``PrepClient.prepare_layer`` end to end; with N streams, N layers at
  once over N channels (one Prepare call per layer, as the SDK does);
- bulk: the same calls with ``PrepClient(bulk_streams=--bulk-streams)``: the
  tensor chunks travel over the server's bulk port (``--bulk-address``), the
  gRPC stream carries only the headers;
- reference: ``PrepClient.prepare_reference`` of the same layer written as a
  checkpoint under the server's ``--allowed-root`` (hot page cache): the server
  reads it and only prepared bytes travel, so this row's rate counts bytes down
  over wall time, against one raw TCP stream carrying as many bytes one way;
  through the bulk client, the answer over the bulk transport (skipped, saying
  why, when the server's log shows an answer that went inline), and through the
  inline client;
- cuda_ipc: the same reference with ``delivery="cuda_ipc"`` into tensors this process allocated once on the
  server's GPU (``out=``, as an engine's parameters in a weight sync; client and server share the node): the
  prepared bytes over the delivery time, against ``clone()`` of as many bytes on that device (skipped, saying
  why, without a GPU). The server writes the layer into those tensors, whose places went with the request.
  Delivery is the SDK's own figure (its DEBUG line from ``nvfp4_prep.client.ipc``): from the answer's header to
  the server's word that every byte is written. The server's hand-over (from sending the header to the end of
  its copies) and the whole call are printed beside it.

The JSON's rows ``stream xN`` and ``reference x1`` are the bulk transport's (the fast path, which a client
asks for with ``bulk_streams``); the inline gRPC rows are ``stream xN (inline)`` and ``reference x1 (inline)``.

Rates count bytes up plus bytes down over wall time (the reference rows: down only). ``vs tcp1`` divides by the
single raw TCP stream, ``vs tcpN`` by N raw streams side by side. ``overlap``
is end-to-end time over pure transfer time, the latter being the client's
upload phase plus its download phase: 1.00 means that staging, host-to-device,
compute and device-to-host all hid behind the network, and below 1.00 that the
answer came back while the upload was still going (it starts as soon as the
first experts are in). ``compute`` is the
server's own compute time (from its JSON log); ``cli cores`` and ``srv cores``
the CPU time the client and server processes used over wall time. Each row is
the best of --repeat runs.

``srv RSS`` and ``srv dev`` (GB) are the server process's peaks over each row's runs
(the JSON's ``peak_rss_bytes`` and ``peak_device_bytes``; the raw TCP rows,
which the server takes no part in, have none): its resident set's high-water
mark (VmHWM, reset before the row by writing "5" to its /proc clear_refs), and
the device memory its CUDA allocator holds in tensors beyond what it held before
the row (the ``nvfp4_prep_gpu_memory_allocated_bytes`` gauge of its metrics
page, sampled every 50 ms, so a peak shorter than that can be missed). Without
a GPU the server reports no device memory: ``-`` in the table, 0 in the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

from nvfp4_prep.client import PrepClient, Progress
from nvfp4_prep.server.config import parse_size
from report import Row as ReportRow
from report import add_json_flag, write_json

_TCP_BUFFER = 8 << 20


# -- the layer ---------------------------------------------------------------------------------------

def random_layer(experts: int, hidden: int, inter: int, gated: bool) -> dict[str, torch.Tensor]:
    """A stacked layer of random bytes (made on the GPU when there is one: a DeepSeek layer is 6 GB)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    n1 = 2 * inter if gated else inter

    def u8(*shape: int, high: int = 256) -> torch.Tensor:
        return torch.randint(0, high, shape, dtype=torch.uint8, generator=gen, device=device).cpu()

    def scale(*shape: int) -> torch.Tensor:
        return (torch.rand(shape, generator=gen, device=device) + 0.5).cpu()

    first = scale(experts)
    layer = {
        "w13_weight": u8(experts, n1, hidden // 2),
        "w13_weight_scale": u8(experts, n1, hidden // 16, high=0x7F).view(torch.float8_e4m3fn),
        "w13_weight_scale_2": torch.stack([first, first], 1) if gated else first,
        "w13_input_scale": torch.stack([first, first], 1) if gated else first,
        "w2_weight": u8(experts, hidden, inter // 2),
        "w2_weight_scale": u8(experts, hidden, inter // 16, high=0x7F).view(torch.float8_e4m3fn),
        "w2_weight_scale_2": scale(experts),
        "w2_input_scale": scale(experts),
    }
    if device == "cuda":
        torch.cuda.empty_cache()
    return layer


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


PREFIX = "model.layers.0.mlp.experts"


def write_layer_checkpoint(directory: Path, layer: dict[str, torch.Tensor], gated: bool) -> Path:
    """``layer`` as a one-layer ModelOpt NVFP4 checkpoint (per-expert tensors, SPEC section 2) in ``directory``."""
    directory.mkdir(parents=True)
    experts, n1 = layer["w13_weight"].shape[:2]
    inter = n1 // 2 if gated else n1
    first = (("gate_proj", 0), ("up_proj", 1)) if gated else (("up_proj", 0),)
    tensors: dict[str, torch.Tensor] = {}
    for e in range(experts):
        for proj, part in first:
            rows = slice(part * inter, (part + 1) * inter)
            tensors[f"{PREFIX}.{e}.{proj}.weight"] = layer["w13_weight"][e, rows].clone()  # no shared storage
            tensors[f"{PREFIX}.{e}.{proj}.weight_scale"] = layer["w13_weight_scale"][e, rows].clone()
            for name in ("weight_scale_2", "input_scale"):
                value = layer[f"w13_{name}"][e]
                tensors[f"{PREFIX}.{e}.{proj}.{name}"] = (value[part] if value.dim() else value).clone()
        for name in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
            tensors[f"{PREFIX}.{e}.down_proj.{name}"] = layer[f"w2_{name}"][e].clone()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"model_type": "synthetic_moe", "quantization_config": {
        "quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": []}}))
    return directory


# -- raw TCP -----------------------------------------------------------------------------------------

def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        part = conn.recv(size - len(data))
        if not part:
            raise ConnectionError("peer closed early")
        data += part
    return bytes(data)


def _peer_connection(conn: socket.socket) -> None:
    with conn:
        up, down = struct.unpack("!QQ", _recv_exact(conn, 16))
        buffer = memoryview(bytearray(_TCP_BUFFER))
        while up:
            received = conn.recv_into(buffer[:min(up, _TCP_BUFFER)])
            if not received:
                return
            up -= received
        while down:
            sent = conn.send(buffer[:min(down, _TCP_BUFFER)])
            down -= sent


def tcp_peer(port_out: multiprocessing.Queue) -> None:
    """Receives a header (bytes up, bytes down), swallows the upload, sends the download."""
    listener = socket.create_server(("127.0.0.1", 0))
    port_out.put(listener.getsockname()[1])
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_peer_connection, args=(conn,), daemon=True).start()


def tcp_transfer(port: int, tensors: dict[str, torch.Tensor], down: int, sink: memoryview) -> None:
    """One raw TCP exchange: every tensor's bytes up (no copies), ``down`` bytes back into ``sink``."""
    views = [memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) for t in tensors.values()]
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(struct.pack("!QQ", sum(len(v) for v in views), down))
        for view in views:
            conn.sendall(view)
        got = 0
        while got < down:
            received = conn.recv_into(sink[got:down])
            if not received:
                raise ConnectionError("peer closed early")
            got += received


# -- the server --------------------------------------------------------------------------------------

@dataclass
class Server:
    process: subprocess.Popen
    address: str
    metrics_port: int
    compute_s: list[float] = field(default_factory=list)
    handover_s: list[float] = field(default_factory=list)  # CUDA IPC hand-overs (see run_cuda_ipc)
    bulk_streams: dict[str, int] = field(default_factory=dict)  # by request id: its bulk connections, 0 inline

    def read_log(self) -> None:
        for line in self.process.stderr:
            if line.startswith("{"):
                record = json.loads(line)
                if "compute_s" in record:
                    self.compute_s.append(record["compute_s"])
                if "request_id" in record:
                    self.bulk_streams[record["request_id"]] = record.get("bulk_streams", 0)
                if "handover_s" in record:
                    self.handover_s.append(record["handover_s"])
            else:
                sys.stderr.write(line)

    @staticmethod
    def wait_for(logged: Callable[[], bool]) -> bool:
        """Whether ``logged`` comes true within 30 s: a call's log line comes a little after its end."""
        end = time.monotonic() + 30
        while not logged() and time.monotonic() < end:
            time.sleep(0.05)
        return logged()

    def answered_over_bulk(self, request_ids: set[str]) -> bool:
        """Whether the server's log says that it answered each of these calls over its bulk transport."""
        return (self.wait_for(lambda: request_ids <= self.bulk_streams.keys())
                and all(self.bulk_streams[request_id] for request_id in request_ids))

    def reset_peak_rss(self) -> bool:
        """Sets the server's VmHWM back to its resident set now ("5" into clear_refs); False where refused."""
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def peak_rss(self) -> int:
        """The server process's peak resident set (VmHWM), in bytes."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0


def start_server(device: str, chunk_size: str, budget: str, allowed_root: Path) -> Server:
    """``nvfp4-prep serve`` on 127.0.0.1 with its metrics on another free port and a bulk port on any."""
    with socket.socket() as grpc_probe, socket.socket() as metrics_probe:  # both held: two different ports
        grpc_probe.bind(("127.0.0.1", 0))
        metrics_probe.bind(("127.0.0.1", 0))
        port, metrics_port = grpc_probe.getsockname()[1], metrics_probe.getsockname()[1]
    command = [sys.executable, "-m", "nvfp4_prep.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--device", device, "--chunk-size", chunk_size, "--memory-budget", budget, "--cache-bytes", "0",
               "--log-format", "json", "--metrics-port", str(metrics_port), "--allowed-root", str(allowed_root),
               "--bulk-address", "127.0.0.1:0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    server = Server(process, f"127.0.0.1:{port}", metrics_port)
    threading.Thread(target=server.read_log, daemon=True).start()
    with grpc.insecure_channel(server.address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nvfp4_prep.v1.Prep"),
                                                  wait_for_ready=True, timeout=300)
    return server


# -- the server's memory, per row -------------------------------------------------------------------

_DEVICE_GAUGE = "nvfp4_prep_gpu_memory_allocated_bytes"  # metrics.GpuMemoryCollector, read at each scrape


def device_allocated(metrics_port: int) -> int | None:
    """Bytes the server's CUDA allocator holds in tensors, its devices together, from its metrics page; None
    where the page has no such samples (a server on the CPU, no GPU) or does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as page:
            text = page.read().decode()
        values = [sample.value for family in text_string_to_metric_families(text) if family.name == _DEVICE_GAUGE
                  for sample in family.samples]
    except (OSError, ValueError):
        return None
    return int(sum(values)) if values else None


@dataclass
class Peaks:
    """One row's peaks in the server process, in bytes; None where they could not be read."""

    rss: int | None = None
    device: int | None = None


@contextmanager
def server_peaks(server: Server) -> Iterator[Peaks]:
    """Measures the ``with`` block: the server's peak resident set (VmHWM, reset first) and its peak extra
    device memory (its allocator's bytes sampled every 50 ms during the block, less their value before it).
    The sampler runs only where the server reports device memory, so a CPU run is not disturbed by it."""
    peaks = Peaks()
    reset = server.reset_peak_rss()
    idle = device_allocated(server.metrics_port)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            value = device_allocated(server.metrics_port)
            if value is not None:
                samples.append(value)

    sampler = threading.Thread(target=sample, daemon=True)
    if idle is not None:
        sampler.start()
    try:
        yield peaks
    finally:
        stop.set()
        if idle is not None:
            sampler.join()
            peaks.device = max(0, max(samples, default=idle) - idle)
        peaks.rss = server.peak_rss() if reset else None


def gigabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def peaks_text(peaks: Peaks) -> str:
    return ", ".join(f"{name} {'-' if value is None else f'{value / 1e9:.2f} GB'}"
                     for name, value in (("srv RSS", peaks.rss), ("srv dev", peaks.device)))


# -- runs --------------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    mode: str
    streams: int
    bytes: int
    seconds: float
    overlap: float | None = None
    compute: float | None = None
    client_cores: float | None = None
    server_cores: float | None = None
    peaks: Peaks = field(default_factory=Peaks)  # the server's; none for raw TCP, which it takes no part in

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds


def run_tcp(port: int, layer: dict[str, torch.Tensor], down: int, streams: int, sinks: list[memoryview]) -> float:
    threads = [threading.Thread(target=tcp_transfer, args=(port, layer, down, sinks[i])) for i in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def run_grpc(client: PrepClient, layer: dict[str, torch.Tensor], streams: int, backend: str,
             activation: str) -> tuple[float, float]:
    """(wall seconds, mean overlap) of ``streams`` layers prepared at once."""
    overlaps: list[float] = [0.0] * streams

    def one(index: int) -> None:
        marks: dict[str, float] = {}

        def progress(event: Progress) -> None:
            now = time.perf_counter()
            if event.phase == "upload" and event.done == event.total:
                marks["uploaded"] = now
            elif event.phase == "download":
                marks.setdefault("first_download", now)

        started = time.perf_counter()
        result = client.prepare_layer(layer, backend, activation, progress=progress)
        ended = time.perf_counter()
        del result
        transfer = (marks["uploaded"] - started) + (ended - marks["first_download"])
        overlaps[index] = (ended - started) / transfer

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, sum(overlaps) / streams


def timed_reference(client: PrepClient, location: str, backend: str, activation: str) -> tuple[float, str]:
    """Wall seconds of one ``prepare_reference`` of the layer the server reads from ``location``, and the
    call's request id (which its line in the server's log carries)."""
    started = time.perf_counter()
    result = client.prepare_reference(location, PREFIX, backend, activation)
    seconds = time.perf_counter() - started
    return seconds, result.request_id


class _Deliveries(logging.Handler):
    """Seconds of each CUDA IPC delivery, from the SDK's DEBUG lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("cuda_ipc: lease"):
            self.seconds.append(record.args[-1])


def clone_rate(device: str, nbytes: int, repeat: int) -> float:
    """Bytes per second of ``clone()`` of ``nbytes`` on ``device``, the best of ``repeat`` after a warm-up."""
    flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
    clones = []
    for _ in range(repeat + 1):  # the first warms up
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        copy = flat.clone()
        torch.cuda.synchronize(device)
        clones.append(time.perf_counter() - started)
        del copy
    return nbytes / min(clones[1:])


def run_cuda_ipc(client: PrepClient, location: str, backend: str, activation: str, mine: dict[str, torch.Tensor],
                 clone: float, server: Server, repeat: int) -> ReportRow | None:
    """The ``cuda_ipc x1`` row: the referenced layer written by CUDA IPC into ``mine``, tensors of this process on
    the server's GPU (the same ones each call, allocated before the other rows, as the ``clone`` rate there was
    measured: while they run the server's allocator grows), against that ``clone()`` rate. Its rate is the
    prepared bytes over the delivery (the SDK's: from the header to the server's ``written``); the server's
    hand-over and the whole call, reading and compute included, are printed beside it, and so are the server's
    peaks during the calls. None, with the reason printed, when the server streamed instead."""
    down = sum(tensor.numel() * tensor.element_size() for tensor in mine.values())
    server.handover_s.clear()
    walls = []
    deliveries = _Deliveries()
    sdk_log = logging.getLogger("nvfp4_prep.client.ipc")
    sdk_log.addHandler(deliveries)
    sdk_log.setLevel(logging.DEBUG)
    try:
        with server_peaks(server) as peaks:
            for _ in range(repeat + 1):  # the first has the server map this process's tensors
                started = time.perf_counter()
                client.prepare_reference(location, PREFIX, backend, activation, delivery="cuda_ipc", out=mine)
                walls.append(time.perf_counter() - started)
    finally:
        sdk_log.removeHandler(deliveries)
    if not server.wait_for(lambda: len(server.handover_s) > repeat) or len(deliveries.seconds) <= repeat:
        print("cuda_ipc x1: skipped (the server streamed the answer; its log says why)")
        return None
    delivery = min(deliveries.seconds[1:])
    rate = down / delivery
    print(f"cuda_ipc x1: {down / 1e9:.2f} GB delivered in {delivery * 1e3:.2f} ms, {rate / 1e9:.1f} GB/s, "
          f"{rate / clone:.2f} of clone() ({clone / 1e9:.1f} GB/s); the server's hand-over "
          f"{min(server.handover_s[1:]) * 1e3:.2f} ms; whole call {min(walls[1:]):.2f}s; {peaks_text(peaks)}",
          flush=True)
    return ReportRow("cuda_ipc x1", rate / 1e9, rate / clone, "clone() on the device", peaks.rss or 0,
                     peaks.device or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--experts", type=int, default=256, help="E (default 256, DeepSeek-R1)")
    parser.add_argument("--hidden", type=int, default=7168, help="H (default 7168)")
    parser.add_argument("--inter", type=int, default=2048, help="I (default 2048)")
    parser.add_argument("--activation", default="swiglu")
    parser.add_argument("--backend", default="flashinfer_cutedsl")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu",
                        help="the server's device (default cuda:0 if there is a GPU, else cpu)")
    parser.add_argument("--streams", default="1,2,4", help="comma-separated counts of concurrent streams")
    parser.add_argument("--chunk-size", default="4MiB", help="upload and response chunk size (default 4MiB; the "
                        "server and SDK default to 2MiB)")
    parser.add_argument("--memory-budget", default="auto", help="the server's --memory-budget")
    parser.add_argument("--bulk-streams", type=int, default=1,
                        help="bulk connections per call in the bulk rows (default 1)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per row; the best is reported")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the reference row's checkpoint is written (default: a temporary directory)")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    streams = sorted({int(s) for s in args.streams.split(",")})
    gated = args.activation != "relu2"

    print(f"layer E={args.experts} H={args.hidden} I={args.inter}, server on {args.device}, "
          f"{os.cpu_count()} CPUs", flush=True)
    layer = random_layer(args.experts, args.hidden, args.inter, gated)
    warmup = random_layer(2, args.hidden, args.inter, gated)
    up = nbytes(layer)

    context = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue = context.Queue()
    peer = context.Process(target=tcp_peer, args=(ports,), daemon=True)
    peer.start()
    tcp_port = ports.get(timeout=60)
    store = Path(tempfile.mkdtemp(prefix="nvfp4-prep-bench-", dir=args.work_dir))
    location = write_layer_checkpoint(store / "ckpt", layer, gated)
    server = start_server(args.device, args.chunk_size, args.memory_budget, store)
    rows: list[Row] = []
    try:
        chunk = parse_size(args.chunk_size)
        bulk_client = PrepClient(server.address, chunk_size=chunk, channels=max(streams),
                                 bulk_streams=args.bulk_streams)
        with PrepClient(server.address, chunk_size=chunk, channels=max(streams)) as client, bulk_client:
            client.prepare_layer(warmup, args.backend, args.activation)
            first = client.prepare_layer(layer, args.backend, args.activation)
            down = nbytes(first.tensors)
            ipc = args.device.startswith("cuda") and torch.cuda.is_available()
            if ipc:  # before the other rows grow the server's allocator: the GPU's memory is shared
                clone = clone_rate(args.device, down, args.repeat)
                mine = {name: torch.empty_like(tensor, device=args.device) for name, tensor in first.tensors.items()}
            else:
                print(f"cuda_ipc x1: skipped (the server runs on {args.device}; CUDA IPC needs it on a GPU of this "
                      "node)")
            del first
            print(f"bytes up {up / 1e9:.2f} GB, down {down / 1e9:.2f} GB per layer", flush=True)
            sinks = [memoryview(torch.zeros(down, dtype=torch.uint8).numpy()) for _ in range(max(streams))]
            for count in sorted({1, *streams}):  # one raw stream is the baseline of every row
                best = min(run_tcp(tcp_port, layer, down, count, sinks) for _ in range(args.repeat))
                rows.append(Row("raw TCP", count, count * (up + down), best))
                print(f"raw TCP x{count}: {best:.2f}s", flush=True)
            sinks.clear()
            bulk_client.prepare_layer(warmup, args.backend, args.activation)
            for mode, via in (("gRPC prepare", client), ("bulk prepare", bulk_client)):
                for count in streams:
                    runs = []
                    with server_peaks(server) as peaks:
                        for _ in range(args.repeat):
                            server.compute_s.clear()
                            client_cpu, server_cpu = cpu_seconds(os.getpid()), cpu_seconds(server.process.pid)
                            seconds, overlap = run_grpc(via, layer, count, args.backend, args.activation)
                            client_cpu = cpu_seconds(os.getpid()) - client_cpu
                            server_cpu = cpu_seconds(server.process.pid) - server_cpu
                            runs.append((seconds, overlap, max(server.compute_s, default=float("nan")),
                                         client_cpu / seconds, server_cpu / seconds))
                    seconds, overlap, compute, client_cores, server_cores = min(runs)
                    rows.append(Row(mode, count, count * (up + down), seconds, overlap, compute,
                                    client_cores, server_cores, peaks))
                    print(f"{mode} x{count}: {seconds:.2f}s", flush=True)
            # One direction: the server reads the layer, only the prepared bytes come down.
            sink = [memoryview(torch.zeros(down, dtype=torch.uint8).numpy())]
            tcp_down = min(run_tcp(tcp_port, {}, down, 1, sink) for _ in range(args.repeat))
            sink.clear()
            client.prepare_reference(str(location), PREFIX, args.backend, args.activation)  # the page cache, warm
            references: dict[str, tuple[float, Peaks]] = {}
            for name, via in (("reference x1 (inline)", client), ("reference x1", bulk_client)):
                with server_peaks(server) as peaks:
                    runs = [timed_reference(via, str(location), args.backend, args.activation)
                            for _ in range(args.repeat)]
                if via is bulk_client and not server.answered_over_bulk({request_id for _, request_id in runs}):
                    print(f"{name}: skipped (the server answered inline; its log says why)")
                    continue
                seconds = min(wall for wall, _ in runs)
                references[name] = seconds, peaks
                print(f"{name}: {seconds:.2f}s", flush=True)
            print(f"raw TCP x1 down: {tcp_down:.2f}s", flush=True)
            ipc_row = run_cuda_ipc(client, str(location), args.backend, args.activation, mine, clone, server,
                                   args.repeat) if ipc else None
    finally:
        server.process.terminate()
        server.process.wait(timeout=60)
        peer.terminate()
        shutil.rmtree(store, ignore_errors=True)

    tcp = {row.streams: row.rate for row in rows if row.mode == "raw TCP"}
    print()
    print(f"{'mode':<13} {'streams':>7} {'GB moved':>9} {'seconds':>8} {'GB/s':>6} {'vs tcp1':>8} {'vs tcpN':>8} "
          f"{'overlap':>8} {'compute':>8} {'cli cores':>9} {'srv cores':>9} {'srv RSS':>8} {'srv dev':>8}")

    def optional(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for row in rows:
        print(f"{row.mode:<13} {row.streams:>7} {row.bytes / 1e9:>9.2f} {row.seconds:>8.2f} {row.rate / 1e9:>6.2f} "
              f"{row.rate / tcp[1]:>8.2f} {row.rate / tcp[row.streams]:>8.2f} {optional(row.overlap, 2):>8} "
              f"{optional(row.compute, 3):>8} {optional(row.client_cores, 1):>9} {optional(row.server_cores, 1):>9} "
              f"{gigabytes(row.peaks.rss):>8} {gigabytes(row.peaks.device):>8}")
    tcp_down_rate = down / tcp_down
    for name, (seconds, peaks) in references.items():
        print(f"{name}: {down / 1e9:.2f} GB down in {seconds:.2f}s, {down / seconds / 1e9:.2f} GB/s, "
              f"{down / seconds / tcp_down_rate:.2f} of one raw TCP stream one way ({tcp_down_rate / 1e9:.2f} GB/s); "
              f"{peaks_text(peaks)}")
    print(f"chunk size {args.chunk_size}, backend {args.backend}, activation {args.activation}, "
          f"{args.bulk_streams} bulk connections per call in the bulk rows")
    # The JSON rows: each gRPC row against as many raw TCP streams; its memory is the server process's, that row's.
    suffixes = {"gRPC prepare": " (inline)", "bulk prepare": ""}
    json_rows = [ReportRow(f"stream x{row.streams}{suffixes[row.mode]}", row.rate / 1e9, row.rate / tcp[row.streams],
                           f"raw TCP x{row.streams}", row.peaks.rss or 0, row.peaks.device or 0)
                 for row in rows if row.mode in suffixes]
    json_rows += [ReportRow(name, down / seconds / 1e9, down / seconds / tcp_down_rate, "raw TCP x1 down",
                            peaks.rss or 0, peaks.device or 0) for name, (seconds, peaks) in references.items()]
    if ipc_row is not None:
        json_rows.append(ipc_row)
    write_json(args.json, json_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
