"""The bulk transport's frames against raw TCP of the same bytes, over K loopback connections.

    python bench/bulk_frames.py                              # small: about 10 s on 2 cores
    python bench/bulk_frames.py --gb 8 --streams 4 --repeat 5  # a 16-core host

A sender process (started once, for every run) and this process, the receiver, connect ``--streams``
connections per run; chunk k of the ``--gb`` GB buffer travels on stream k % K, as the bulk transport sends it:

- raw tcp: each stream's thread ``sendall``s views of its chunks and the receiver's ``recv_into``s them
  straight into the output array: transport and nothing else, the baseline;
- bulk frames: ``FrameWriters`` given pieces ``(0, offset, view)`` (CRC32C and the gathering write on the
  streams' threads), ``FrameReaders`` (decode and CRC32C on the streams' threads) and one consumer that
  checks every chunk with ``TensorReceiver`` and lands it in a numpy array (``HostTensors``), as a Prepare
  call's upload or answer over bulk does.

Each run's output is compared with the sent bytes afterwards (untimed). A rate is the buffer's bytes over
the time from the receiver's go to its last byte landed; each row is the best of ``--repeat`` runs, the runs of
both rows interleaved. ``ratio`` divides by raw tcp (bench/report.py).
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import sys
import threading
import time
from pathlib import Path

import numpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nvfp4_prep.wire import DEFAULT_CHUNK_SIZE, MESSAGE_OVERHEAD, HostTensors, TensorReceiver, TensorSpec
from nvfp4_prep.wire.bulk_transport import FrameReaders, FrameWriters
from report import add_json_flag, print_rows, row, write_json

RAW, BULK = "raw tcp", "bulk frames"
_PATTERN = 16 << 20  # random bytes repeated over the buffer: making GBs of them would take longer than the runs


def source_bytes(size: int) -> numpy.ndarray:
    """The same ``size`` bytes in both processes."""
    pattern = numpy.random.default_rng(0).integers(0, 256, min(size, _PATTERN), dtype=numpy.uint8)
    return numpy.resize(pattern, size)


def slices(size: int, chunk: int, index: int, streams: int) -> list[slice]:
    """The byte ranges of the chunks stream ``index`` carries."""
    return [slice(start, min(start + chunk, size)) for start in range(index * chunk, size, streams * chunk)]


# -- the sender process --------------------------------------------------------------------------------

def _connect(port: int, streams: int) -> list[socket.socket]:
    """Every stream of one run, each having said its index; returns once the receiver said go."""
    sockets = []
    for index in range(streams):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(bytes((index,)))
        sockets.append(sock)
    if sockets[0].recv(1) != b"g":
        raise ConnectionError("the receiver went away before the run")
    return sockets


def send_raw(sockets: list[socket.socket], data: memoryview, chunk: int) -> None:
    def stream(index: int) -> None:
        for part in slices(len(data), chunk, index, len(sockets)):
            sockets[index].sendall(data[part])

    threads = [threading.Thread(target=stream, args=(index,)) for index in range(len(sockets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def send_bulk(sockets: list[socket.socket], data: memoryview, chunk: int) -> None:
    writers = FrameWriters(sockets)
    try:
        for offset in range(0, len(data), chunk):
            writers.send((0, offset, data[offset:offset + chunk]))
        writers.finish()
    finally:
        writers.close()


def sender(port: int, modes: list[str], streams: int, size: int, chunk: int) -> None:
    data = memoryview(source_bytes(size))
    for mode in modes:
        sockets = _connect(port, streams)
        (send_raw if mode == RAW else send_bulk)(sockets, data, chunk)
        for sock in sockets:
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # the receiver closes once it has everything
            sock.close()


# -- the receiver (this process) -----------------------------------------------------------------------

def _accept(listener: socket.socket, streams: int) -> list[socket.socket]:
    sockets: list[socket.socket | None] = [None] * streams
    for _ in range(streams):
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sockets[sock.recv(1)[0]] = sock
    return sockets


def receive_raw(sockets: list[socket.socket], out: numpy.ndarray, chunk: int) -> None:
    view = memoryview(out)

    def stream(index: int) -> None:
        for part in slices(len(out), chunk, index, len(sockets)):
            got, want = 0, part.stop - part.start
            while got < want:
                received = sockets[index].recv_into(view[part.start + got:part.stop])
                if not received:
                    raise ConnectionError(f"stream {index} closed early")
                got += received

    threads = [threading.Thread(target=stream, args=(index,)) for index in range(len(sockets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def receive_bulk(sockets: list[socket.socket], sink: HostTensors, spec: TensorSpec, chunk: int) -> None:
    receiver = TensorReceiver([spec], sink)
    for frame, decoded in FrameReaders(sockets, chunk + MESSAGE_OVERHEAD):
        if decoded is None:
            raise ValueError(f"a frame of {len(frame)} bytes that is not a chunk")
        receiver.add(decoded)
    receiver.finish()


def run(listener: socket.socket, mode: str, streams: int, expected: numpy.ndarray, chunk: int) -> float:
    """Seconds of one run; raises unless every byte arrived intact."""
    spec = TensorSpec("data", torch.uint8, (len(expected),), len(expected))
    sink = HostTensors([spec]) if mode == BULK else None
    out = sink.tensors()["data"].numpy() if sink is not None else numpy.empty_like(expected)
    out[:] = 0  # touched before the clock starts, as a landing buffer that is reused is
    sockets = _accept(listener, streams)
    start = time.perf_counter()
    sockets[0].sendall(b"g")
    if mode == RAW:
        receive_raw(sockets, out, chunk)
    else:
        receive_bulk(sockets, sink, spec, chunk)
    seconds = time.perf_counter() - start
    for sock in sockets:
        sock.close()
    for start in range(0, len(expected), _PATTERN):  # a block at a time: no GB-sized temporary
        if not numpy.array_equal(out[start:start + _PATTERN], expected[start:start + _PATTERN]):
            raise AssertionError(f"{mode}: the bytes that arrived differ from those sent, from byte {start} on")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=0.3, help="GB moved per run (default 0.3)")
    parser.add_argument("--streams", type=int, default=4, help="connections, K (default 4)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help=f"bytes per chunk (default {DEFAULT_CHUNK_SIZE}, the SDK's)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row, best taken (default 3)")
    add_json_flag(parser)
    args = parser.parse_args()
    size = int(args.gb * 1e9)
    expected = source_bytes(size)
    modes = [RAW, BULK] * args.repeat
    with socket.create_server(("127.0.0.1", 0), backlog=args.streams) as listener:
        peer = multiprocessing.get_context("spawn").Process(
            target=sender, args=(listener.getsockname()[1], modes, args.streams, size, args.chunk_size), daemon=True)
        peer.start()
        best: dict[str, float] = {}
        for mode in modes:
            seconds = run(listener, mode, args.streams, expected, args.chunk_size)
            best[mode] = min(best.get(mode, seconds), seconds)
        peer.join(60)
    print(f"{size / 1e9:.2f} GB per run over {args.streams} loopback connections, chunks of {args.chunk_size} "
          f"bytes, best of {args.repeat}")
    baseline = size / best[RAW] / 1e9
    rows = [row(f"{mode} x{args.streams}", size / best[mode] / 1e9, f"{RAW} x{args.streams}", baseline)
            for mode in (RAW, BULK)]
    print_rows(rows)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
