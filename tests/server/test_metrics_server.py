"""A real server's /metrics after real requests: every counter and histogram moved by the right amount."""

from __future__ import annotations

import logging
import os
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nvfp4_prep.client import PrepClient, PrepInvalidArgument
from nvfp4_prep.pipeline import prepare

BACKEND = "flashinfer_trtllm"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.fixture
def served(start_server):
    port = free_port()
    server = start_server(metrics_port=port, cache_bytes=64 << 20)
    return server, port


def test_metrics_move_by_the_amounts_of_real_requests(served, make_layer, caplog):
    server, port = served
    layer = make_layer(experts=2, hidden=400, inter=80)
    expected_out = nbytes(prepare(layer, BACKEND).tensors)
    before = scrape(port)
    caplog.set_level(logging.INFO)
    with PrepClient(server.address, retries=0) as client:
        first = client.prepare_layer(layer, BACKEND)
        second = client.prepare_layer(layer, BACKEND)
        with pytest.raises(PrepInvalidArgument):
            client.prepare_layer(layer, "no_such_backend")
        client.capabilities()
    assert not first.cache_hit and second.cache_hit
    after = scrape(port)

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("nvfp4_prep_requests_total", method="Prepare", backend=BACKEND, code="OK") == 2
    assert moved("nvfp4_prep_requests_total", method="Prepare", backend="unknown", code="INVALID_ARGUMENT") == 1
    # GetCapabilities has no backend: its label is empty, which Prometheus reads as absent.
    assert moved("nvfp4_prep_requests_total", method="GetCapabilities", backend="", code="OK") == 1
    assert moved("nvfp4_prep_request_duration_seconds_count", method="Prepare", backend=BACKEND) == 2
    assert moved("nvfp4_prep_received_bytes_total", backend=BACKEND, source="stream") == 2 * nbytes(layer)
    assert moved("nvfp4_prep_sent_bytes_total", backend=BACKEND) == 2 * expected_out
    assert moved("nvfp4_prep_cache_misses_total") == 1
    assert moved("nvfp4_prep_cache_hits_total") == 1
    # Both requests were read; only the first was prepared, copied out and sent chunk by chunk.
    assert moved("nvfp4_prep_stage_duration_seconds_count", stage="read", backend=BACKEND) == 2
    for stage in ("prepare", "device_to_host", "send"):
        assert moved("nvfp4_prep_stage_duration_seconds_count", stage=stage, backend=BACKEND) == 1, stage
    assert moved("nvfp4_prep_stage_duration_seconds_sum", stage="prepare", backend=BACKEND) > 0
    assert after[("nvfp4_prep_memory_budget_bytes", (("device", "cpu"),))] == 1 << 30
    assert after[("nvfp4_prep_memory_budget_in_use_bytes", (("device", "cpu"),))] == 0
    assert after[("nvfp4_prep_queue_depth", (("device", "cpu"),))] == 0
    assert after[("nvfp4_prep_inflight_requests", (("method", "Prepare"),))] == 0
    assert after[("nvfp4_prep_cache_bytes", ())] == expected_out

    # The SDK's request id reaches the server's log line for the same request.
    prepared_line = f"prepared for {first.layout['layout_id']}"
    sdk_ids = [r.args[0] for r in caplog.records
               if r.name == "nvfp4_prep.client.sdk" and r.getMessage().endswith(prepared_line)]
    server_ids = [getattr(r, "request_id", None) for r in caplog.records if r.name == "nvfp4_prep.server.service"]
    assert len(sdk_ids) == 2 and set(sdk_ids) <= set(server_ids)


def test_metrics_port_0_starts_no_metrics_listener_and_grpc_still_serves(start_server):
    before = listening_ports()
    server = start_server(metrics_port=0)
    assert server.metrics_server is None
    # The only port the server opened is the gRPC one: nothing serves metrics anywhere.
    assert listening_ports() - before == {server.port}
    with grpc.insecure_channel(server.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)


def listening_ports() -> set[int]:
    """Ports of this process's listening TCP sockets (IPv4 and IPv6), from /proc."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN, one of our sockets
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
