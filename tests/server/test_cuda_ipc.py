"""Same-node delivery over CUDA IPC: a client process maps the server's GPU memory, copies the layer and takes it.

The server runs in this process on cuda:0, each client in a subprocess (``tests.helpers.ipc_client``: a process
cannot open its own CUDA IPC handles). Every way a lease ends must give the memory back: the budget's bytes, the
tensors the worker tracks, and the device memory itself (torch keeps memory a client still maps in its "limbo").
Skipped without CUDA; the cross-GPU case needs two devices.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nvfp4_prep import pipeline
from nvfp4_prep.client import PrepClient
from tests.helpers import ipc_client

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[2]


def settle(condition, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def gpu_server(start_server, request):
    """A server on cuda:0 that already prepared one layer (so that what stays allocated after is its baseline)."""
    lease = getattr(request, "param", 30.0)
    server = start_server(devices=("cuda:0",), memory_budget=4 << 30, idle_timeout=120, ipc_lease_timeout=lease)
    with PrepClient(server.address) as client:
        client.prepare_layer(ipc_client.layer(), ipc_client.BACKEND)
    torch.cuda.synchronize(0)
    server.baseline = torch.cuda.memory_allocated(0)
    return server


def _client(server, mode: str, device: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.helpers.ipc_client", server.address, mode, device, str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ))


def _freed(server) -> bool:
    worker = server.workers[0]
    return worker.budget.in_use == 0 and torch.cuda.memory_allocated(0) <= server.baseline


def _served(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "nvfp4_prep.server.service" and hasattr(r, "outcome")]


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_same_node_client_gets_bit_exact_tensors_by_cuda_ipc(gpu_server, tmp_path, same_tensors, caplog, device):
    if torch.device(device).index >= torch.cuda.device_count():
        pytest.skip("needs a second GPU (a peer copy from the server's)")
    caplog.set_level(logging.INFO, logger="nvfp4_prep.server")
    out = tmp_path / "layer.pt"
    client = _client(gpu_server, "take", device, out)
    stdout, _ = client.communicate(timeout=120)
    assert client.returncode == 0 and "taken" in stdout
    want = pipeline.prepare(ipc_client.layer(), ipc_client.BACKEND)
    same_tensors(torch.load(out), want.tensors)
    record = _served(caplog)[-1]
    assert record.outcome == "OK" and record.delivery == "cuda_ipc"
    assert not getattr(record, "bytes_sent", 0)  # no tensor byte went over the socket
    assert settle(lambda: _freed(gpu_server)), "the layer's memory did not come back after taken"


def test_client_killed_with_the_handles_open_frees_the_layer(gpu_server, tmp_path):
    client = _client(gpu_server, "hold", "cuda:0", tmp_path / "unused")
    try:
        assert client.stdout.readline().startswith("opened")
        assert gpu_server.workers[0].budget.in_use > 0  # held for the client meanwhile
    finally:
        client.kill()
        client.wait(30)
    assert settle(lambda: _freed(gpu_server)), "a dead client's layer was not freed"


@pytest.mark.parametrize("gpu_server", [2.0], indirect=True)
def test_lease_timeout_frees_the_layer_and_fails_the_call(gpu_server, tmp_path):
    client = _client(gpu_server, "wait", "cuda:0", tmp_path / "unused")
    try:
        assert client.stdout.readline().strip() == "handed"
        end = json.loads(client.stdout.readline())  # the lease (or, unwired, its 30 s default) runs out first
    finally:
        client.kill()
        client.wait(30)
    assert end["code"] == "DEADLINE_EXCEEDED" and "--ipc-lease-timeout=" in end["details"]
    assert settle(lambda: _freed(gpu_server)), "an expired lease's layer was not freed"


def test_cpu_server_streams_to_a_client_that_asked_for_cuda_ipc(start_server, same_tensors, caplog):
    server = start_server()  # cpu
    caplog.set_level(logging.INFO, logger="nvfp4_prep.server")
    with PrepClient(server.address) as client:
        got = client.prepare_layer(ipc_client.layer(), ipc_client.BACKEND, delivery="cuda_ipc", device="cuda:0")
    assert all(tensor.device == torch.device("cuda:0") for tensor in got.tensors.values())
    same_tensors({n: t.cpu() for n, t in got.tensors.items()},
                 pipeline.prepare(ipc_client.layer(), ipc_client.BACKEND).tensors)
    assert "prepared on cpu" in _served(caplog)[-1].delivery
