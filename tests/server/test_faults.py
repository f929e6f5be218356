"""Faults: answer streams that break part-way resume; clients cancelled mid-stream leave the server idle; a
server killed in the middle of a two-server checkpoint prepare loses nothing and corrupts nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nvfp4_prep import pipeline
from nvfp4_prep.checkpoint import open_checkpoint
from nvfp4_prep.client import PrepClient, Progress
from nvfp4_prep.prepared.verify import verify_prepared
from tests.helpers.checkpoint_factory import dense_tensors, moe_checkpoint, moe_layer_tensors, write_checkpoint
from tests.helpers.fault_proxy import CuttingProxy
from tests.helpers.layer_factory import random_layer
from tests.helpers.server_process import ServerProcess
from tests.helpers.server_state import idle, wait_for

BACKEND = "flashinfer_cutlass"
PREFIX = "model.layers.0.mlp.experts"
CHUNK = 64 << 10
RSS_TOLERANCE = 96 << 20


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- broken answer streams resume ------------------------------------------------------------------

def downloads(events: list[Progress]) -> list[int]:
    return [event.done for event in events if event.phase == "download"]


def test_broken_stream_resumes_after_the_last_verified_chunk(start_server, same_tensors):
    server = start_server(chunk_size=CHUNK)
    layer = random_layer(8, 1024, 512)
    want = pipeline.prepare(layer, BACKEND).tensors
    proxy = CuttingProxy(server.port, cut_after=nbytes(want) // 2)  # resets the connection mid-answer
    events: list[Progress] = []
    try:
        with PrepClient(proxy.address, chunk_size=CHUNK) as client:
            got = client.prepare_layer(layer, BACKEND, progress=events.append)
    finally:
        proxy.close()
    same_tensors(got.tensors, want)
    assert proxy.cuts == 1 and server.service.outcomes == {"CANCELLED": 1, "OK": 1}
    done = downloads(events)
    assert done == sorted(done) and done[-1] == nbytes(want), "the download never went back"
    # Starting over would move the cut half and then all of it (1.5x); what the client's gRPC had buffered
    # beyond the last chunk it verified when the connection was cut (its flow-control window) comes again.
    assert proxy.downstream_bytes < nbytes(want) * 1.35, "the answer was not downloaded twice"


@pytest.mark.parametrize("cached", [False, True])
def test_referenced_layer_resumes_without_sending_inputs(start_server, same_tensors, tmp_path, cached):
    """A layer read by the server from its model store: the resumed call is a header again, nothing more;
    the answer is recomputed, or replayed from the cache from the resume point on."""
    source = write_checkpoint(tmp_path / "models" / "ckpt", {**dense_tensors(512),
                                                             **moe_layer_tensors(0, 8, 512, 256)})
    server = start_server(chunk_size=CHUNK, allowed_roots=(tmp_path / "models",),
                          cache_bytes=(64 << 20) if cached else 0)
    stacked = open_checkpoint(source).read_layer(PREFIX, "swiglu")
    want = pipeline.prepare(stacked, BACKEND).tensors
    if cached:
        with PrepClient(server.address) as client:
            client.prepare_reference(str(source), PREFIX, BACKEND)
    proxy = CuttingProxy(server.port, cut_after=nbytes(want) // 2)
    events: list[Progress] = []
    try:
        with PrepClient(proxy.address) as client:
            got = client.prepare_reference(str(source), PREFIX, BACKEND, progress=events.append)
    finally:
        proxy.close()
    same_tensors(got.tensors, want)
    assert proxy.cuts == 1 and got.cache_hit == cached
    assert proxy.upstream_bytes < 16 << 10, "only headers went up"
    assert proxy.downstream_bytes < nbytes(want) * 1.1
    done = downloads(events)
    assert done == sorted(done) and done[-1] == nbytes(want)


# -- cancelled clients -------------------------------------------------------------------------------

class Stop(Exception):
    pass


def test_clients_cancelled_mid_stream_in_a_loop_leave_the_server_idle(start_server, same_tensors):
    server = start_server(chunk_size=CHUNK)
    layer = random_layer(8, 1024, 512)
    want = pipeline.prepare(layer, BACKEND).tensors
    with PrepClient(server.address, chunk_size=CHUNK) as client:
        client.prepare_layer(layer, BACKEND)  # warm-up: the idle level after one full call
        wait_for(lambda: idle(server))
        before = rss()
        for round_ in range(30):
            phase = ("upload", "download")[round_ % 2]
            at = (round_ * 7919) % 40 + 1  # the chunk at which the client walks away

            def cancel(event: Progress, phase: str = phase, at: int = at) -> None:
                if event.phase == phase and event.done >= at * CHUNK:
                    raise Stop

            try:
                client.prepare_layer(layer, BACKEND, progress=cancel)
            except Stop:
                pass
            if round_ % 10 == 9:
                same_tensors(client.prepare_layer(layer, BACKEND).tensors, want)
        wait_for(lambda: idle(server))
    assert rss() - before < RSS_TOLERANCE, f"resident set grew by {(rss() - before) >> 20} MiB"
    outcomes = server.service.outcomes
    assert outcomes["OK"] == 4 and outcomes["CANCELLED"] + outcomes["INVALID_ARGUMENT"] >= 25, outcomes


# -- a server dies during a checkpoint prepare -------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return moe_checkpoint(tmp_path / "src", 12, 8, 1024, 512, seed=5, dense=True)


# Answers reach the job at this pace (bytes/s) through a proxy, so the job is still running when the
# test kills a server after its first layer, however busy the machine is (about 0.6 s a layer).
PACE = 10 << 20


def prepare_command(source: Path, out: Path, addresses: list[str]) -> list[str]:
    return [sys.executable, "-m", "nvfp4_prep.cli.main", "prepare", str(source), "--backend", BACKEND,
            "--out", str(out), "--server", ",".join(addresses), "--timeout", "120", "--quiet"]


def paced(servers: list[ServerProcess]) -> list[CuttingProxy]:
    return [CuttingProxy(server.port, cut_after=None, rate=PACE) for server in servers]


def prepared(server: ServerProcess) -> int:
    return sum(1 for record in server.records() if record.get("message", "").startswith("Prepare OK"))


def kill_after_first_layer(server: ServerProcess, job: subprocess.Popen) -> None:
    server.wait_for_log(lambda r: r.get("message", "").startswith("Prepare OK"), timeout=120)
    assert job.poll() is None, "the job finished before the server could be killed"
    server.kill()


def test_killed_server_mid_prepare_job_finishes_through_the_other(checkpoint, tmp_path):
    servers = [ServerProcess(), ServerProcess()]
    proxies = paced(servers)
    try:
        out = tmp_path / "out"
        job = subprocess.Popen(prepare_command(checkpoint, out, [p.address for p in proxies]), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        kill_after_first_layer(servers[0], job)
        stdout, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr
        assert "12 layers prepared" in stdout
        assert prepared(servers[1]) >= 12 - prepared(servers[0])
    finally:
        for server, proxy in zip(servers, proxies, strict=True):
            server.kill()
            proxy.close()
    assert verify_prepared(out, checkpoint) == []


def test_prepare_job_completes_after_its_only_server_restarts(checkpoint, tmp_path):
    out = tmp_path / "out"
    first = ServerProcess()
    [proxy] = paced([first])
    try:
        job = subprocess.Popen(prepare_command(checkpoint, out, [proxy.address]), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        kill_after_first_layer(first, job)
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 2 and "UNAVAILABLE" in stderr, stderr
    finally:
        first.kill()
        proxy.close()
    second = ServerProcess()
    try:
        rerun = subprocess.run(prepare_command(checkpoint, out, [second.address]), capture_output=True, text=True,
                               timeout=300)
        assert rerun.returncode == 0, rerun.stderr
    finally:
        second.kill()
    assert verify_prepared(out, checkpoint) == []
