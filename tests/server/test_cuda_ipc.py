"""Same-node delivery over CUDA IPC: the server writes the layer into a client process's tensors on its own GPU, or
the client maps the server's GPU memory, copies the layer and takes it.

The server runs in this process on cuda:0, each client in a subprocess (``tests.helpers.ipc_client``: a process
cannot open its own CUDA IPC handles). Written, the layer goes into the client's tensors, whose allocations the
server keeps mapped for the next call and closes when idle; a destination outside the client's allocation is
refused before anything is written. Handed out, it goes as one exported storage, its tensors packed at aligned
offsets. Every way a lease ends must give the memory back: the budget's bytes, the tensors the worker tracks, and
the device memory itself (torch keeps memory a client still maps in its "limbo"). The packing runs on the CPU too
and is tested there; the rest is skipped without CUDA, the cross-GPU case needs two devices. The file needs no
conftest: on a GPU machine, ``python -m pytest --noconftest tests/server/test_cuda_ipc.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from nvfp4_prep import pipeline
from nvfp4_prep.client import PrepClient
from nvfp4_prep.client import ipc as client_ipc
from nvfp4_prep.client.ipc import HeldRequests, IpcDelivery
from nvfp4_prep.client.landing import DEFAULT_STAGING_BYTES, DeviceLanding, Placement
from nvfp4_prep.client.receiver import Answer
from nvfp4_prep.client.sdk import header_options
from nvfp4_prep.contract.node import node_id
from nvfp4_prep.contract.tensor_bytes import packed_offsets
from nvfp4_prep.server.budget import MemoryBudget
from nvfp4_prep.server.config import ServeConfig
from nvfp4_prep.server.estimate import reservation_bytes
from nvfp4_prep.server.ipc import pack, packed_size, packing_room
from nvfp4_prep.server.server import PrepServer
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.v1 import prep_pb2_grpc
from nvfp4_prep.wire import TensorSpec, encode_tensors, header_for, read_headers
from tests.helpers import ipc_client
from tests.helpers.server_state import settled as _settled

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REPO = Path(__file__).resolve().parents[2]
ALIGN = 256  # bytes: where every packed tensor must start (cudaMalloc's alignment)


def settled(condition) -> bool:
    return _settled(condition, timeout=30.0)  # a lease's memory comes back through torch's IPC limbo



def same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same names in the same order, same dtypes and shapes, same bytes."""
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].cpu().contiguous().view(torch.uint8),
                           tensor.cpu().contiguous().view(torch.uint8)), name


def assert_aligned_and_apart(ranges: list[tuple[int, int]]) -> None:
    """Byte ranges ``(start, size)`` that start aligned, at distinct offsets, in order, none overlapping the next."""
    for (start, size), (after, _) in itertools.pairwise(ranges):
        assert start + size <= after, (start, size, after)
    assert all(start % ALIGN == 0 for start, _ in ranges)
    assert len({start for start, _ in ranges}) == len(ranges)


# The packing, on the CPU.

@pytest.mark.parametrize(("sizes", "offsets", "total"), [
    ([1, 256, 3], [0, 256, 512], 515),
    ([256, 512, 1], [0, 256, 768], 769),
    ([4, 0, 4], [0, 256, 256], 260),
    ([300, 40], [0, 512], 552),
])
def test_packed_offsets_start_each_tensor_aligned_right_after_the_one_before(sizes, offsets, total):
    assert packed_offsets(sizes) == (offsets, total)


def test_pack_puts_every_tensor_in_one_buffer_and_lets_the_originals_go():
    prepared = pipeline.prepare(ipc_client.layer(), ipc_client.BACKEND)
    want = {name: tensor.clone() for name, tensor in prepared.tensors.items()}
    originals = [weakref.ref(tensor) for tensor in prepared.tensors.values()]

    buffer, views = pack(prepared.tensors)

    assert prepared.tensors == {}  # taken out as they were copied
    assert all(original() is None for original in originals), "an original prepared tensor is still alive"
    same_tensors(views, want)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    base = buffer.untyped_storage().data_ptr()
    assert {view.untyped_storage().data_ptr() for view in views.values()} == {base}
    starts = [(view.data_ptr() - base, view.numel() * view.element_size()) for view in views.values()]
    assert_aligned_and_apart(starts)
    sizes = [size for _, size in starts]
    assert starts[-1][0] + sizes[-1] == buffer.numel() == packed_size(want.values())
    assert buffer.numel() < sum(sizes) + ALIGN * len(sizes)  # no more slack than the alignment


def test_packing_room_is_free_within_the_reservation():
    budget = MemoryBudget(10_000)
    reservation = budget.reserve(3_000)
    room = packing_room(reservation, budget, outputs=1_000, packed=2_000)
    assert room is not None and room.nbytes == 0 and budget.in_use == 3_000


def test_packing_room_takes_the_missing_bytes_from_the_budget_until_released():
    budget = MemoryBudget(10_000)
    reservation = budget.reserve(3_000)
    with packing_room(reservation, budget, outputs=2_000, packed=2_100) as room:
        assert room.nbytes == 1_100 and budget.in_use == 4_100
    assert budget.in_use == 3_000


@pytest.mark.parametrize("draining", [False, True])
def test_packing_room_does_not_wait_for_a_full_budget(draining):
    budget = MemoryBudget(5_000)
    reservation = budget.reserve(3_000)
    other = budget.reserve(1_500)
    if draining:
        budget.close()
    started = time.monotonic()
    assert packing_room(reservation, budget, outputs=2_000, packed=2_100) is None
    assert time.monotonic() - started < 1.0  # refused at once, not after waiting
    assert budget.in_use == reservation.nbytes + other.nbytes and budget.waiting == 0


# The hand-over, on a GPU.

@pytest.fixture
def serve() -> Iterator[Callable[..., PrepServer]]:
    """``serve(**ServeConfig fields)``: a started server on loopback, stopped at teardown (this file's own, so
    that it runs without the suite's conftest)."""
    servers: list[PrepServer] = []

    def start(**fields) -> PrepServer:
        fields = {"host": "127.0.0.1", "port": 0, "devices": ("cpu",), "memory_budget": 1 << 30, "metrics_port": 0,
                  **fields}
        servers.append(PrepServer(ServeConfig(**fields)).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop(grace=0)


@pytest.fixture
def gpu_server(serve, request):
    """A server on cuda:0 that already streamed the layer (``streamed``, on the CPU), so that what stays allocated
    after is its baseline."""
    lease = getattr(request, "param", 30.0)
    server = serve(devices=("cuda:0",), memory_budget=4 << 30, idle_timeout=120, ipc_lease_timeout=lease)
    with PrepClient(server.address) as client:
        streamed = client.prepare_layer(ipc_client.layer(), ipc_client.BACKEND)
    server.streamed = {name: tensor.cpu() for name, tensor in streamed.tensors.items()}
    assert settled(lambda: server.workers[0].budget.in_use == 0 and server.workers[0].live.value == 0)
    torch.cuda.synchronize(0)
    server.baseline = torch.cuda.memory_allocated(0)
    return server


def _client(server, mode: str, device: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.helpers.ipc_client", server.address, mode, device, str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ))


def _freed(server) -> bool:
    worker = server.workers[0]
    return (worker.budget.in_use == 0 and worker.live.value == 0
            and torch.cuda.memory_allocated(0) <= server.baseline)


def _served(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "nvfp4_prep.server.service" and hasattr(r, "outcome")]


WRITTEN = "cuda_ipc (written into the client's memory)"  # the delivery the server logs; handed out: "cuda_ipc"


def _mapped(caplog) -> int:
    """Client allocations the server mapped so far."""
    return sum(r.name == "nvfp4_prep.server.client_memory" and r.getMessage().startswith("cuda_ipc: mapped")
               for r in caplog.records)


@pytest.mark.gpu
@cuda_only
def test_a_device_landing_the_server_was_told_to_write_into_outlives_a_call_that_failed(monkeypatch):
    monkeypatch.setattr(client_ipc, "WRITE_GRACE", 1.0)
    device = torch.device("cuda", 0)
    specs = [TensorSpec("w13_weight", torch.uint8, (1 << 20,), 1 << 20)]

    def landing_after(asked_to_write: bool) -> StorageWeakRef:
        landing = DeviceLanding(specs, device, DEFAULT_STAGING_BYTES)
        delivery = IpcDelivery(specs, landing, HeldRequests(iter(())), device, False, time.perf_counter())
        if asked_to_write:
            delivery.receive(pb.PrepareResponse(ipc_write=pb.IpcWrite(lease_id="lease-1", lease_seconds=5)))
        delivery.abandon()  # the call failed before the server said written
        return StorageWeakRef(landing.packed.untyped_storage())

    assert landing_after(asked_to_write=False).expired()  # never shared: let go at once
    held = landing_after(asked_to_write=True)
    assert not held.expired()  # the server may still be writing into it
    assert settled(held.expired)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
@pytest.mark.parametrize("mode", ["take", "take-out"])  # device= (the packed layer in one copy), out= (per tensor)
def test_same_node_client_gets_bit_exact_tensors_by_cuda_ipc(gpu_server, tmp_path, caplog, device, mode):
    """On the server's GPU the layer is written into the client's tensors; on another it is handed out."""
    if torch.device(device).index >= torch.cuda.device_count():
        pytest.skip("needs a second GPU (a peer copy from the server's)")
    caplog.set_level(logging.INFO, logger="nvfp4_prep.server")
    out = tmp_path / "layer.pt"
    client = _client(gpu_server, mode, device, out)
    stdout, _ = client.communicate(timeout=120)
    assert client.returncode == 0 and "taken" in stdout
    same_tensors(torch.load(out), gpu_server.streamed)
    record = _served(caplog)[-1]
    assert record.outcome == "OK" and record.delivery == (WRITTEN if device == "cuda:0" else "cuda_ipc")
    if device == "cuda:0":  # the caller's own tensors are known before the call: their places go with the header
        assert record.ipc_destinations == ("up front" if mode == "take-out" else "asked for")
    assert not getattr(record, "bytes_sent", 0)  # no tensor byte went over the socket
    assert settled(lambda: _freed(gpu_server)), "the layer's memory did not come back after its delivery"


@pytest.mark.gpu
@cuda_only
def test_landing_in_the_same_tensors_again_maps_nothing_new(gpu_server, tmp_path, caplog):
    """An engine's weight sync: the second call into the same ``out=`` tensors reuses the server's mappings."""
    caplog.set_level(logging.INFO, logger="nvfp4_prep.server")
    caplog.set_level(logging.DEBUG, logger="nvfp4_prep.server.client_memory")  # last: the capture's level too
    out = tmp_path / "layer.pt"
    client = subprocess.Popen([sys.executable, "-m", "tests.helpers.ipc_client", gpu_server.address, "again",
                               "cuda:0", str(out)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ))
    try:
        assert client.stdout.readline().strip() == "first"
        mapped = _mapped(caplog)
        assert 1 <= mapped == len(gpu_server.service.client_memory)
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "taken"
    finally:
        client.communicate(timeout=120)
    assert client.returncode == 0
    same_tensors(torch.load(out), gpu_server.streamed)  # the second answer overwrote the 7s everywhere
    assert [(r.delivery, r.ipc_destinations) for r in _served(caplog)[-2:]] == [(WRITTEN, "up front")] * 2
    assert _mapped(caplog) == mapped, "the second call into the same tensors mapped them again"


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("gpu_server", [2.0], indirect=True)
def test_idle_client_mappings_are_closed(gpu_server, tmp_path):
    client = _client(gpu_server, "take", "cuda:0", tmp_path / "layer.pt")
    assert client.communicate(timeout=120)[0].strip() == "taken"
    memory = gpu_server.service.client_memory
    assert len(memory) >= 1
    assert settled(lambda: len(memory) == 0), "a client allocation stayed mapped past --ipc-lease-timeout"


@pytest.mark.gpu
@cuda_only
def test_a_destination_past_the_client_allocation_is_refused_and_nothing_breaks(gpu_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nvfp4_prep.server")
    client = _client(gpu_server, "overrun", "cuda:0", tmp_path / "unused")
    stdout, _ = client.communicate(timeout=120)
    end = json.loads(stdout.splitlines()[-1])
    assert end["code"] == "INVALID_ARGUMENT" and end["field"] == "request.destinations.tensors[0]"
    assert "inside the client's allocation" in end["details"]
    assert settled(lambda: _freed(gpu_server)), "a refused write's layer was not freed"
    # The server's CUDA context is unharmed: the next client gets its layer written, bit-exact.
    out = tmp_path / "layer.pt"
    assert _client(gpu_server, "take", "cuda:0", out).communicate(timeout=120)[0].strip() == "taken"
    same_tensors(torch.load(out), gpu_server.streamed)
    assert _served(caplog)[-1].delivery == WRITTEN


@pytest.mark.gpu
@cuda_only
def test_a_bulk_client_asking_for_cuda_ipc_uploads_inline_and_gets_the_layer_written(serve, tmp_path, caplog):
    """A client with bulk connections that asks for CUDA IPC: its request stream stays open for its destinations,
    so the SDK offers no bulk transport for that call; the chunks go inline and the answer comes back by CUDA
    IPC."""
    server = serve(devices=("cuda:0",), memory_budget=4 << 30, bulk_address=("127.0.0.1", 0))
    caplog.set_level(logging.INFO, logger="nvfp4_prep.server")
    out = tmp_path / "layer.pt"
    client = _client(server, "take-bulk", "cuda:0", out)
    stdout, _ = client.communicate(timeout=120)
    assert client.returncode == 0 and "taken" in stdout
    same_tensors(torch.load(out), pipeline.prepare(ipc_client.layer(), ipc_client.BACKEND).tensors)
    record = _served(caplog)[-1]
    assert record.outcome == "OK" and record.delivery == WRITTEN and not hasattr(record, "bulk_streams")
    assert not getattr(record, "bytes_sent", 0)


@contextlib.contextmanager
def _ipc_call(server) -> Iterator[tuple[pb.PreparedHeader, pb.IpcLayer]]:
    """A raw call in this process that asks for the layer by CUDA IPC: its header and handles (opened by no one:
    this process made them); the call is cancelled after, as by a client that went away without taking it."""
    tensors = ipc_client.layer()
    header = pb.PrepareHeader(backend=ipc_client.BACKEND, activation="swiglu", input_scale_policy="max",
                              **header_options(), delivery=pb.DELIVERY_CUDA_IPC, node_id=node_id(),
                              tensors=pb.TensorSet(form=pb.TENSOR_FORM_STACKED,
                                                   tensors=[header_for(n, t) for n, t in tensors.items()]))
    held = HeldRequests(iter([pb.PrepareRequest(header=header),
                              *(pb.PrepareRequest(chunk=c) for c in encode_tensors(tensors, 1 << 20))]))
    with grpc.insecure_channel(server.address) as channel:
        call = prep_pb2_grpc.PrepStub(channel).Prepare(held, timeout=120)
        try:
            yield next(call).header, next(call).ipc
        finally:
            call.cancel()
            held.close()


@pytest.mark.gpu
@cuda_only
def test_the_layer_is_handed_over_as_one_storage_of_aligned_disjoint_tensors(gpu_server):
    with _ipc_call(gpu_server) as (header, ipc):
        specs = read_headers(header.tensors, "header.tensors")
        assert [spec.name for spec in specs] == list(gpu_server.streamed)
        assert len(ipc.tensors) == len(specs)
        first = ipc.tensors[0]
        assert first.storage_handle and first.ref_counter_handle
        for shared in ipc.tensors:  # one storage: the entries differ only by where their tensors lie in it
            assert (shared.storage_handle, shared.storage_size_bytes, shared.storage_offset_bytes,
                    shared.ref_counter_handle, shared.ref_counter_offset, shared.event_handle) == (
                first.storage_handle, first.storage_size_bytes, first.storage_offset_bytes,
                first.ref_counter_handle, first.ref_counter_offset, first.event_handle)
        ranges = [(shared.tensor_offset * spec.dtype.itemsize, spec.byte_length)
                  for shared, spec in zip(ipc.tensors, specs, strict=True)]
        assert_aligned_and_apart(ranges)
        assert first.storage_offset_bytes % ALIGN == 0  # so the tensors' device addresses are aligned too
        assert ranges[-1][0] + ranges[-1][1] == first.storage_size_bytes  # the buffer ends with the last tensor
        # While its client has it, the call holds exactly the packed buffer of the budget.
        assert gpu_server.workers[0].budget.in_use == first.storage_size_bytes
    assert settled(lambda: _freed(gpu_server)), "a layer its client never took was not freed"


@pytest.mark.gpu
@cuda_only
def test_a_budget_without_room_for_the_packed_copy_streams_a_handed_out_answer_but_writes_a_written_one(
        serve, caplog, tmp_path):
    layer = ipc_client.layer()
    inputs = [header_for(name, tensor) for name, tensor in layer.items()]
    need = reservation_bytes(read_headers(inputs, "tensors"), False, ipc_client.BACKEND, "swiglu")
    want = pipeline.prepare(layer, ipc_client.BACKEND).tensors
    # Stacked inputs are smaller than the outputs (derived scalars): the call's reservation alone cannot hold the
    # outputs twice, and a budget of just that reservation has nothing to add.
    assert sum(h.byte_length for h in inputs) < sum(t.numel() * t.element_size() for t in want.values())
    server = serve(devices=("cuda:0",), memory_budget=need, idle_timeout=120)
    caplog.set_level(logging.INFO, logger="nvfp4_prep.server")
    header = pb.PrepareHeader(backend=ipc_client.BACKEND, activation="swiglu", input_scale_policy="max",
                              **header_options(), delivery=pb.DELIVERY_CUDA_IPC, node_id=node_id(),
                              tensors=pb.TensorSet(form=pb.TENSOR_FORM_STACKED, tensors=inputs))
    held = HeldRequests(iter([pb.PrepareRequest(header=header),
                              *(pb.PrepareRequest(chunk=c) for c in encode_tensors(layer, 1 << 20))]))
    try:  # a raw call naming no GPU of its own: the server would hand its memory out
        with grpc.insecure_channel(server.address) as channel:
            got = Answer(header, None, Placement(device=torch.device("cuda:0"))).receive(
                prep_pb2_grpc.PrepStub(channel).Prepare(held, timeout=120), held)
    finally:
        held.close()
    same_tensors(got.tensors, want)
    record = _served(caplog)[-1]
    assert record.outcome == "OK" and record.delivery.startswith("stream (")
    assert "no room now for the packed copy" in record.delivery
    # Written into the client's memory, the answer needs no second copy of its own.
    out = tmp_path / "layer.pt"
    assert _client(server, "take", "cuda:0", out).communicate(timeout=120)[0].strip() == "taken"
    same_tensors(torch.load(out), want)
    assert _served(caplog)[-1].delivery == WRITTEN


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize(("mode", "said"), [("hold", "opened"), ("wait-write", "asked")])
def test_client_killed_with_the_handles_open_or_before_its_destinations_frees_the_layer(gpu_server, tmp_path, mode,
                                                                                       said):
    client = _client(gpu_server, mode, "cuda:0", tmp_path / "unused")
    try:
        assert client.stdout.readline().startswith(said)
        assert gpu_server.workers[0].budget.in_use > 0  # held for the client meanwhile
    finally:
        client.kill()
        client.wait(30)
    assert settled(lambda: _freed(gpu_server)), "a dead client's layer was not freed"


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("gpu_server", [2.0], indirect=True)
@pytest.mark.parametrize(("mode", "said"), [("wait", "handed"), ("wait-write", "asked")])
def test_lease_timeout_frees_the_layer_and_fails_the_call(gpu_server, tmp_path, mode, said):
    client = _client(gpu_server, mode, "cuda:0", tmp_path / "unused")
    try:
        assert client.stdout.readline().strip() == said
        end = json.loads(client.stdout.readline())  # the lease (or, unwired, its 30 s default) runs out first
    finally:
        client.kill()
        client.wait(30)
    assert end["code"] == "DEADLINE_EXCEEDED" and "--ipc-lease-timeout=" in end["details"]
    assert settled(lambda: _freed(gpu_server)), "an expired lease's layer was not freed"


@pytest.mark.gpu
@cuda_only
def test_a_client_in_the_server_process_gets_the_answer_streamed(serve, caplog):
    server = serve(devices=("cuda:0",), memory_budget=4 << 30)
    caplog.set_level(logging.INFO, logger="nvfp4_prep.server")
    with PrepClient(server.address) as client:
        got = client.prepare_layer(ipc_client.layer(), ipc_client.BACKEND, delivery="cuda_ipc", device="cuda:0")
    same_tensors(got.tensors, pipeline.prepare(ipc_client.layer(), ipc_client.BACKEND).tensors)
    assert "server's own process" in _served(caplog)[-1].delivery


@pytest.mark.gpu
@cuda_only
def test_cpu_server_streams_to_a_client_that_asked_for_cuda_ipc(serve, caplog):
    server = serve()  # cpu
    caplog.set_level(logging.INFO, logger="nvfp4_prep.server")
    with PrepClient(server.address) as client:
        got = client.prepare_layer(ipc_client.layer(), ipc_client.BACKEND, delivery="cuda_ipc", device="cuda:0")
    assert all(tensor.device == torch.device("cuda:0") for tensor in got.tensors.values())
    same_tensors(got.tensors, pipeline.prepare(ipc_client.layer(), ipc_client.BACKEND).tensors)
    assert "prepared on cpu" in _served(caplog)[-1].delivery
