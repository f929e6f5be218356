"""Abuse test: correct clients beside hostile ones against one server on loopback, bounded in time and count.

    python bench/abuse.py --clients 4 --duration 20 --json abuse.json

Starts ``nvfp4-prep serve`` as a subprocess on 127.0.0.1 (``--device``, CPU by
default; cache off; its limits at their defaults, apart from ``--server-flags``),
and runs ``--clients`` correct clients (bench/load.py's: every answer's bytes are
compared with the expected ones) for ``--duration`` seconds alone, then again
beside the hostile clients of ``--kinds``:

- ``idle``: Prepare streams that never send a header (opened again when the
  server ends one);
- ``hogs``: streams that send a header announcing a layer that needs
  ``--hog-fraction`` of the memory budget, then stall;
- ``garbage``: a header over the message size limit, a tensor name of 64 KiB,
  bytes that are no message at all, one after the other;
- ``unauth``: bursts of calls without a token or with a wrong one (with
  ``--token``: the server then wants one, and the correct clients send it);
- ``metrics``: idle TCP connections to the metrics port that send half a
  request and nothing more.

The hostile gRPC traffic comes from another loopback address (``--hostile-source``,
through a relay in this process), as another host's would, so that the server's
per-client limit can tell it from the correct clients; so do the metrics
connections. Every hostile thread pauses between calls, and all stop when the
phase ends.

Prints, and writes with ``--json PATH`` as ``{"rows": [...]}``, one row per
phase: the correct clients' p50 and p99 latency, their errors (failed calls,
answers that differ from the expected bytes) and ``ratio``, the phase's p99 over
the p99 of its ``baseline`` row (the clients alone, measured first in the same
run). Then what each hostile kind got back. Exits 1 unless the correct clients
had no errors in either phase.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import torch

from load import add_layer_flags, digests, make_layer, nbytes, percentile, run_load, start_server

KINDS = ("idle", "hogs", "garbage", "unauth", "metrics")
PREPARE = "/nvfp4_prep.v1.Prep/Prepare"
CAPABILITIES = "/nvfp4_prep.v1.Prep/GetCapabilities"
PAUSE_S = 0.1  # between one hostile thread's calls, so that none spins


@dataclass(frozen=True)
class Row:
    """One phase of the correct clients; latencies and ratio are None when no call of the phase succeeded."""

    name: str
    p50_s: float | None
    p99_s: float | None
    errors: int
    ratio: float | None
    baseline: str


# -- another host, on loopback -----------------------------------------------------------------------

class Relay:
    """Accepts on 127.0.0.1 and connects each connection on to ``target`` from the address ``source``,
    copying bytes both ways: the server sees whoever uses ``address`` as another host."""

    def __init__(self, target: str, source: str) -> None:
        host, _, port = target.rpartition(":")
        self._target, self._source = (host, int(port)), source
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self._listener.accept()
            except OSError:  # closed
                return
            outbound = socket.socket()
            try:
                outbound.bind((self._source, 0))
                outbound.connect(self._target)
            except OSError:
                inbound.close()
                outbound.close()
                continue
            with self._lock:
                self._open += [inbound, outbound]
            for one, other in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=_copy, args=(one, other), daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._open:
                sock.close()


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# -- hostile clients ---------------------------------------------------------------------------------

class Hostile:
    """The hostile threads of one phase: what each kind got back, and one stop for all.

    ``metadata`` goes with every call but the unauthenticated ones: a hostile client may hold a valid token
    (a buggy loader, a compromised pod), and without one the server would refuse it before anything else."""

    def __init__(self, address: str, metadata: tuple) -> None:
        self.address, self.metadata = address, metadata
        self.stop = threading.Event()
        self.outcomes: dict[str, Counter] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._calls: list[grpc.Future] = []
        self._channels: list[grpc.Channel] = []

    def count(self, kind: str, outcome: str) -> None:
        with self._lock:
            self.outcomes.setdefault(kind, Counter())[outcome] += 1

    def spawn(self, threads: int, work: Callable[[grpc.Channel], None], pause: float = PAUSE_S) -> None:
        """``threads`` threads, each with a connection of its own, calling ``work(channel)`` until the stop,
        ``pause`` seconds apart."""
        for _ in range(threads):
            self.start(self._loop, work, pause)

    def start(self, target: Callable, *args) -> None:
        """``target(*args)`` on a thread of its own, which ``finish`` waits for."""
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _loop(self, work: Callable[[grpc.Channel], None], pause: float) -> None:
        channel = grpc.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1),
                                                               ("grpc.enable_retries", 0)])
        with self._lock:
            self._channels.append(channel)
        while not self.stop.is_set():
            work(channel)
            self.stop.wait(pause)

    def stream(self, kind: str, channel: grpc.Channel, first: tuple = (), stall: bool = False) -> None:
        """One Prepare stream that sends ``first`` (messages or raw bytes) and then, with ``stall``, nothing
        more while it lasts; read to its end, and its status counted."""
        ended = threading.Event()

        def requests() -> Iterator:
            yield from first
            while stall and not ended.is_set() and not self.stop.wait(0.2):
                pass

        prepare = channel.stream_stream(PREPARE, request_serializer=_encode, response_deserializer=bytes)
        call = prepare(requests(), metadata=self.metadata)
        with self._lock:
            self._calls.append(call)
        try:
            for _ in call:
                pass
            self.count(kind, "OK")
        except grpc.RpcError as err:
            self.count(kind, err.code().name if not self.stop.is_set() else "ended by the bench")
        finally:
            ended.set()
            with self._lock:
                self._calls.remove(call)

    def finish(self, timeout: float = 30) -> None:
        self.stop.set()
        with self._lock:
            for call in self._calls:
                call.cancel()
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        for channel in self._channels:
            channel.close()


def _encode(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def hog_header(args: argparse.Namespace, budget: int):
    """A valid header of a stacked layer whose reservation (inputs plus outputs, about twice its bytes) is
    about ``--hog-fraction`` of the budget."""
    from nvfp4_prep.v1 import prep_pb2 as pb
    from nvfp4_prep.wire import header_for

    one = make_layer(1, args.hidden, args.inter, 0)
    experts = max(1, int(args.hog_fraction * budget / (2 * nbytes(one))))
    tensors = [header_for(name, torch.empty((experts, *t.shape[1:]), dtype=t.dtype, device="meta"))
               for name, t in one.items()]
    return pb.PrepareRequest(header=pb.PrepareHeader(
        backend=args.backend, activation="swiglu", input_scale_policy="max",
        tensors=pb.TensorSet(form=pb.TENSOR_FORM_STACKED, tensors=tensors)))


def garbage_requests(args: argparse.Namespace) -> Iterator:
    """Endless: a header over the message size limit, a header with a 64 KiB tensor name, bytes that are
    no message."""
    from nvfp4_prep.v1 import prep_pb2 as pb

    oversized = pb.PrepareRequest(header=pb.PrepareHeader(backend="x" * (6 << 20)))
    long_name = pb.PrepareRequest(header=pb.PrepareHeader(
        backend=args.backend, tensors=pb.TensorSet(form=pb.TENSOR_FORM_STACKED, tensors=[
            pb.TensorHeader(name="w" * (64 << 10), dtype="uint8", shape=[1], byte_length=1)])))
    return itertools.cycle([oversized.SerializeToString(), long_name, os.urandom(4096)])


def start_hostile(args: argparse.Namespace, metrics_port: int, budget: int, relay: Relay, token: str) -> Hostile:
    """Every hostile kind of ``--kinds``, running until ``finish``."""
    from nvfp4_prep.v1 import prep_pb2 as pb

    hostile = Hostile(relay.address, (("authorization", f"Bearer {token}"),) if token else ())
    kinds = set(args.kinds)
    if "idle" in kinds:
        hostile.spawn(args.idle_streams, lambda channel: hostile.stream("idle", channel, stall=True))
    if "hogs" in kinds:
        header = hog_header(args, budget)
        hostile.spawn(args.header_hogs, lambda channel: hostile.stream("hogs", channel, (header,), stall=True))
    if "garbage" in kinds:
        bad = garbage_requests(args)
        hostile.spawn(1, lambda channel: hostile.stream("garbage", channel, (next(bad),)))
    if "unauth" in kinds and token:
        def burst(channel: grpc.Channel) -> None:
            ask = channel.unary_unary(CAPABILITIES, request_serializer=_encode, response_deserializer=bytes)
            wrong = (("authorization", "Bearer " + "0" * len(token)),)
            calls = [ask.future(pb.GetCapabilitiesRequest(), timeout=10, metadata=wrong if i % 2 else None)
                     for i in range(args.burst)]
            for call in calls:
                try:
                    call.result()
                    hostile.count("unauth", "OK")
                except grpc.RpcError as err:
                    hostile.count("unauth", err.code().name)

        hostile.spawn(1, burst, pause=1.0)
    if "metrics" in kinds and metrics_port:
        hostile.start(hold_metrics_connections, hostile, metrics_port, args.metrics_idle, args.hostile_source)
    return hostile


def hold_metrics_connections(hostile: Hostile, port: int, count: int, source: str) -> None:
    """Opens ``count`` connections that send half a request, holds them until the phase ends, and counts
    those the server closed meanwhile."""
    held = []
    for _ in range(count):
        sock = socket.socket()
        try:
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
            held.append(sock)
            hostile.count("metrics", "opened")
        except OSError as err:
            hostile.count("metrics", f"refused ({err.strerror or err})")
            sock.close()
    hostile.stop.wait()
    for sock in held:
        sock.setblocking(False)
        try:
            closed = sock.recv(1 << 16) == b""
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True
        hostile.count("metrics", "closed by the server" if closed else "still open at the end")
        sock.close()


# -- phases ------------------------------------------------------------------------------------------

def phase_row(name: str, outcome: dict, baseline: Row | None) -> Row:
    latencies = outcome["latencies"]
    errors = sum(outcome["errors"].values()) + outcome["mismatches"] + outcome["checksum_errors"]
    p50, p99 = (percentile(latencies, 0.5), percentile(latencies, 0.99)) if latencies else (None, None)
    if baseline is None:
        ratio = 1.0 if p99 is not None else None
    else:
        ratio = p99 / baseline.p99_s if p99 is not None and baseline.p99_s else None
    return Row(name, p50, p99, errors, ratio, "" if baseline is None else baseline.name)


def _number(value: float | None, width: int, digits: int) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--clients", type=int, default=4, help="correct clients (default 4)")
    parser.add_argument("--processes", type=int, default=2, help="processes they are spread over (default 2)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of each phase (default 20)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds the hostile clients get to take their places first (default 3)")
    parser.add_argument("--call-timeout", type=float, default=60.0,
                        help="deadline of each correct call (default 60): bounds the run")
    add_layer_flags(parser, layers=2)
    parser.add_argument("--backend", default="flashinfer_cutlass", help="default flashinfer_cutlass")
    parser.add_argument("--device", default="cpu", help="the server's device (default cpu)")
    parser.add_argument("--memory-budget", default="2GiB", help="the server's --memory-budget (default 2GiB)")
    parser.add_argument("--server-flags", default="", help="further serve flags, e.g. '--max-concurrent-per-client 0'")
    parser.add_argument("--kinds", type=lambda text: text.split(","), default=None,
                        help=f"hostile kinds, comma-separated (default {','.join(KINDS)}; without unauth under "
                             "--no-token)")
    parser.add_argument("--idle-streams", type=int, default=40, help="streams that send no header (default 40)")
    parser.add_argument("--header-hogs", type=int, default=2, help="streams that stall after a header (default 2)")
    parser.add_argument("--hog-fraction", type=float, default=0.6,
                        help="share of the memory budget each hog's header claims (default 0.6)")
    parser.add_argument("--burst", type=int, default=50, help="unauthenticated calls per burst (default 50)")
    parser.add_argument("--metrics-idle", type=int, default=200, help="idle metrics connections (default 200)")
    parser.add_argument("--token", action=argparse.BooleanOptionalAction, default=True,
                        help="make the server want a bearer token, which the correct clients send (default on; "
                             "'unauth' needs it)")
    parser.add_argument("--hostile-source", default="127.0.0.2",
                        help="loopback address the hostile clients come from (default 127.0.0.2)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help='also write {"rows": [...]} to PATH (name, p50_s, p99_s, errors, ratio, baseline)')
    args = parser.parse_args(argv)
    if args.kinds is None:
        args.kinds = [kind for kind in KINDS if args.token or kind != "unauth"]
    unknown = set(args.kinds) - set(KINDS)
    if unknown:
        parser.error(f"--kinds: {sorted(unknown)} unknown (expected some of {','.join(KINDS)})")
    if "unauth" in args.kinds and not args.token:
        parser.error("--kinds: unauth needs a server that wants a token (drop --no-token)")

    from nvfp4_prep import pipeline
    from nvfp4_prep.client import PrepClient
    from nvfp4_prep.server.config import parse_size

    torch.set_num_threads(1)
    shape = (args.experts, args.hidden, args.inter)
    layers = [make_layer(*shape, seed) for seed in range(args.layers)]
    expected = [digests(pipeline.prepare(layer, args.backend).tensors) for layer in layers]
    budget = parse_size(args.memory_budget)
    client_options: dict = {"timeout": args.call_timeout}
    token = secrets.token_hex(16) if args.token else ""
    extra = ["--max-concurrent", "32", *shlex.split(args.server_flags)]  # the server's default, not load.py's
    with tempfile.TemporaryDirectory() as scratch:
        if token:
            client_options["token"] = token
            (Path(scratch) / "tokens").write_text(token + "\n")
            extra += ["--auth-token-file", str(Path(scratch) / "tokens")]
        print(f"{args.clients} correct clients, layers of E={args.experts} H={args.hidden} I={args.inter} "
              f"({nbytes(layers[0]) / 1e6:.1f} MB), backend {args.backend}, server on {args.device}; hostile: "
              f"{','.join(args.kinds)} from {args.hostile_source}", flush=True)
        server = start_server(args, extra)
        relay = Relay(server.address, args.hostile_source)
        hostile = None
        try:
            with PrepClient(server.address, **client_options) as client:
                client.prepare_layer(layers[0], args.backend)  # warm-up
            alone = run_load(server.address, args.clients, args.processes, shape, expected, args.backend,
                             args.duration, client_options)
            hostile = start_hostile(args, server.metrics_port, budget, relay, token)
            time.sleep(args.settle)
            beside = run_load(server.address, args.clients, args.processes, shape, expected, args.backend,
                              args.duration, client_options)
        finally:
            if hostile is not None:
                hostile.finish()
            relay.close()
            server.process.terminate()
            server.process.wait(timeout=60)

    baseline = phase_row("correct clients alone", alone, None)
    rows = [baseline, phase_row(f"beside {'+'.join(args.kinds)}", beside, baseline)]
    print()
    print(f"{'row':<44} {'calls':>6} {'p50 s':>8} {'p99 s':>8} {'errors':>7} {'ratio':>7}")
    for row, outcome in zip(rows, (alone, beside), strict=True):
        print(f"{row.name:<44} {len(outcome['latencies']):>6} {_number(row.p50_s, 8, 3)} {_number(row.p99_s, 8, 3)} "
              f"{row.errors:>7} {_number(row.ratio, 7, 2)}")
        failed = dict(outcome["errors"])
        if failed:
            print(f"    failed calls: {failed}")
    print("\nwhat the hostile clients got:")
    for kind in args.kinds:
        print(f"    {kind:<8} {dict(hostile.outcomes.get(kind, {})) if hostile else {}}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": [asdict(row) for row in rows]}, indent=2) + "\n")
    worked = all(outcome["latencies"] for outcome in (alone, beside))
    return 0 if worked and all(row.errors == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
