"""A layer the server reads itself (``prepare_reference``), read straight into its stacked tensors by several
threads and answered in chunks that several threads encode: bit-exact with preparing, in process, the tensors
that the safetensors library reads, for every backend and activation, inline and over the bulk transport; a
client that walks away mid-answer leaves the server idle; the server process holds about one copy of the layer
beside its answer (peak RSS); and, on a GPU, a CUDA server (pinned reads, copies to the device while later
experts are read) gives the same bytes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from nvfp4_prep import pipeline
from nvfp4_prep.checkpoint import stacked_read
from nvfp4_prep.client import PrepClient, Progress
from nvfp4_prep.contract import layout
from tests.helpers.checkpoint_factory import load_all, moe_layer_tensors, write_checkpoint
from tests.helpers.server_process import ServerProcess
from tests.helpers.server_state import idle, wait_for

PREFIX = "model.layers.0.mlp.experts"
CHUNK = 64 << 10
BULK = {"bulk_address": ("127.0.0.1", 0)}
# Peak resident growth of the server process over one referenced layer, in layers: the layer read (one copy,
# straight into its stacked form), the prepared answer (as large for these backends) and a margin for the CPU
# pipeline's temporaries and the messages in flight. Reading the per-expert tensors before stacking them took
# one more layer (3.1).
PEAK_LAYERS = 2.6


def write_layer(directory: Path, activation: str, experts: int = 4, hidden: int = 1024, inter: int = 256,
                seed: int = 11) -> Path:
    """A one-layer ModelOpt checkpoint (without gate projections for the non-gated relu2), in two shard files."""
    tensors = moe_layer_tensors(0, experts, hidden, inter, seed=seed)
    if activation == "relu2":
        tensors = {name: t for name, t in tensors.items() if ".gate_proj." not in name}
    return write_checkpoint(directory, tensors, shards=2)


def expected(directory: Path, backend: str, activation: str) -> pipeline.PreparedLayer:
    """The layer as the safetensors library reads it, stacked and prepared in this process."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_all(file))
    start = len(PREFIX) + 1
    experts = {name[start:]: t for name, t in tensors.items() if name.startswith(PREFIX + ".")}
    return pipeline.prepare(pipeline.assemble_layer(experts, activation), backend, activation)


def bulk_streams_used(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [getattr(r, "bulk_streams", 0) for r in caplog.records
            if r.name == "nvfp4_prep.server.service" and getattr(r, "outcome", None) == "OK"]


@pytest.fixture
def threaded_reads(monkeypatch) -> None:
    """Every referenced layer read by several threads, however small (the server runs in this process)."""
    monkeypatch.setattr(stacked_read, "BYTES_PER_THREAD", 1)


@pytest.mark.parametrize("activation", layout.ACTIVATIONS)
@pytest.mark.parametrize("backend", layout.BACKENDS)
def test_a_referenced_layer_is_bit_exact_inline(start_server, same_tensors, tmp_path, threaded_reads, backend,
                                                activation):
    source = write_layer(tmp_path / "models" / "ckpt", activation)
    server = start_server(chunk_size=CHUNK, allowed_roots=(tmp_path / "models",))
    with PrepClient(server.address) as client:
        got = client.prepare_reference(str(source), PREFIX, backend, activation)
    want = expected(source, backend, activation)
    assert sum(t.numel() * t.element_size() for t in want.tensors.values()) > 8 * CHUNK  # many chunks, in order
    same_tensors(got.tensors, want.tensors)
    assert got.layout == want.layout
    wait_for(lambda: idle(server), 30)


@pytest.mark.parametrize("streams", [1, 3])
@pytest.mark.parametrize("backend", layout.BACKENDS)
def test_a_referenced_layer_is_bit_exact_over_the_bulk_transport(start_server, same_tensors, tmp_path, caplog,
                                                                 threaded_reads, backend, streams):
    caplog.set_level(logging.INFO)
    source = write_layer(tmp_path / "models" / "ckpt", "swiglu")
    server = start_server(chunk_size=CHUNK, allowed_roots=(tmp_path / "models",), **BULK)
    with PrepClient(server.address, bulk_streams=streams) as client:
        got = client.prepare_reference(str(source), PREFIX, backend)
    same_tensors(got.tensors, expected(source, backend, "swiglu").tensors)
    assert bulk_streams_used(caplog) == [streams]
    wait_for(lambda: idle(server), 30)


class Stop(Exception):
    pass


@pytest.mark.parametrize("transport", ["inline", "bulk"])
def test_a_client_that_walks_away_mid_answer_leaves_the_server_idle(start_server, same_tensors, tmp_path,
                                                                    threaded_reads, transport):
    source = write_layer(tmp_path / "models" / "ckpt", "swiglu", experts=8, hidden=1024)
    server = start_server(chunk_size=CHUNK, allowed_roots=(tmp_path / "models",), **BULK)

    def walk_away(event: Progress) -> None:
        if event.phase == "download" and event.done >= 5 * CHUNK:
            raise Stop

    with PrepClient(server.address, bulk_streams=2 if transport == "bulk" else 0) as client:
        with pytest.raises(Stop):
            client.prepare_reference(str(source), PREFIX, "flashinfer_trtllm", progress=walk_away)
        wait_for(lambda: idle(server), 30)
        got = client.prepare_reference(str(source), PREFIX, "flashinfer_trtllm")
    same_tensors(got.tensors, expected(source, "flashinfer_trtllm", "swiglu").tensors)
    wait_for(lambda: idle(server), 30)


def _status_bytes(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def test_the_server_holds_about_one_copy_of_a_referenced_layer_beside_its_answer(tmp_path):
    """A real server process (its resident set is the one measured): a small layer first, so that code,
    imports and pools are warm, then the peak resident growth (VmHWM, reset first) over one larger layer."""
    root = tmp_path / "models"
    small = write_layer(root / "small", "swiglu", experts=2, hidden=256, inter=128)
    large = write_layer(root / "large", "swiglu", experts=8, hidden=4096, inter=1536)
    layer_bytes = sum(path.stat().st_size for path in large.glob("*.safetensors"))
    server = ServerProcess("--allowed-root", str(root), "--chunk-size", "1MiB")
    try:
        with PrepClient(server.address, timeout=300) as client:
            client.prepare_reference(str(small), PREFIX, "flashinfer_cutedsl")
            try:
                Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")
            except OSError as exc:
                pytest.skip(f"cannot reset the server's peak resident set: {exc}")
            before = _status_bytes(server.process.pid, "VmRSS:")
            got = client.prepare_reference(str(large), PREFIX, "flashinfer_cutedsl")
            peak = _status_bytes(server.process.pid, "VmHWM:")
    finally:
        server.stop()
    answer = sum(t.numel() * t.element_size() for t in got.tensors.values())
    assert answer >= 0.95 * layer_bytes  # as large as the layer: the bound below counts it as one
    grew = peak - before
    assert grew < PEAK_LAYERS * layer_bytes, f"peak grew by {grew / layer_bytes:.2f} layers of {layer_bytes >> 20} MiB"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("transport", ["inline", "bulk"])
@pytest.mark.parametrize("activation", layout.ACTIVATIONS)
@pytest.mark.parametrize("backend", layout.BACKENDS)
def test_a_referenced_layer_on_a_gpu_server_is_bit_exact(start_server, same_tensors, tmp_path, threaded_reads,
                                                         backend, activation, transport):
    source = write_layer(tmp_path / "models" / "ckpt", activation, experts=6, hidden=1024)
    server = start_server(devices=("cuda:0",), memory_budget=8 << 30, chunk_size=CHUNK,
                          allowed_roots=(tmp_path / "models",), **BULK)
    with PrepClient(server.address, bulk_streams=2 if transport == "bulk" else 0) as client:
        got = client.prepare_reference(str(source), PREFIX, backend, activation)
    want = expected(source, backend, activation)
    same_tensors(got.tensors, want.tensors)
    assert got.layout == want.layout
    wait_for(lambda: idle(server), 30)


@pytest.mark.parametrize("streams", [0, 2])
def test_a_referenced_layer_is_answered_while_it_is_read(start_server, same_tensors, tmp_path, caplog, streams):
    # The server reads the scales first and answers each weight expert by expert as the read goes on; with the
    # cache on it answers once the layer is in, and keeps it: both give the bytes of preparing it in process.
    caplog.set_level(logging.INFO)
    source = write_layer(tmp_path / "models" / "ckpt", "swiglu", experts=8)
    want = expected(source, "flashinfer_trtllm", "swiglu").tensors
    for cache_bytes in (0, 64 << 20):
        server = start_server(chunk_size=CHUNK, allowed_roots=(tmp_path / "models",), cache_bytes=cache_bytes,
                              **(BULK if streams else {}))
        with PrepClient(server.address, bulk_streams=streams) as client:
            same_tensors(client.prepare_reference(str(source), PREFIX, "flashinfer_trtllm").tensors, want)
        wait_for(lambda: idle(server), 30)  # noqa: B023 (the server of this iteration)
    calls = [r for r in caplog.records if r.name == "nvfp4_prep.server.service" and getattr(r, "outcome", "") == "OK"]
    assert [getattr(r, "answered_early", False) for r in calls] == [True, False]
