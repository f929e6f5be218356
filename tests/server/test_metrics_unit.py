"""The metrics module over real HTTP: what is recorded is what a Prometheus scrape reads."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from nvfp4_prep.server.metrics import STAGES, GpuMemoryCollector, Metrics
from nvfp4_prep.server.metrics_http import MetricsHttpServer
from nvfp4_prep.server.refusals import RefusalLog

README = Path(__file__).resolve().parents[2] / "deploy" / "README.md"
BACKEND = "flashinfer_cutedsl"


@pytest.fixture
def served():
    """A Metrics object and its running /metrics server on a free loopback port."""
    metrics = Metrics(devices=("cpu",))
    server = MetricsHttpServer(metrics.page, "127.0.0.1", 0).start()
    yield metrics, f"http://127.0.0.1:{server.port}/metrics"
    server.stop()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the page by (sample name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_counters_gauges_and_histograms_read_back_by_the_amounts_recorded(served):
    metrics, url = served
    before = scrape(url)
    metrics.observe_request("Prepare", BACKEND, "OK", 0.3)
    metrics.observe_request("Prepare", BACKEND, "OK", 7.0)
    metrics.observe_request("Prepare", "unknown", "INVALID_ARGUMENT", 0.002)
    metrics.received_bytes.labels(BACKEND, "stream").inc(3 << 20)
    metrics.received_bytes.labels(BACKEND, "checkpoint").inc(1000)
    metrics.sent_bytes.labels(BACKEND).inc(5 << 20)
    metrics.queue_depth.labels("cpu").set(2)
    metrics.memory_budget_bytes.labels("cpu").set(1 << 30)
    metrics.memory_in_use_bytes.labels("cpu").set(123456)
    metrics.cache_hits.inc(4)
    metrics.cache_misses.inc()
    metrics.cache_bytes.set(4096)
    after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert moved("nvfp4_prep_requests_total", method="Prepare", backend=BACKEND, code="OK") == 2
    assert moved("nvfp4_prep_requests_total", method="Prepare", backend="unknown", code="INVALID_ARGUMENT") == 1
    duration = "nvfp4_prep_request_duration_seconds"
    assert moved(f"{duration}_count", method="Prepare", backend=BACKEND) == 2
    assert moved(f"{duration}_sum", method="Prepare", backend=BACKEND) == pytest.approx(7.3)
    # Cumulative buckets: 0.3 s falls in le=0.5 and above, 7 s only in le=10 and above.
    assert moved(f"{duration}_bucket", method="Prepare", backend=BACKEND, le="0.25") == 0
    assert moved(f"{duration}_bucket", method="Prepare", backend=BACKEND, le="0.5") == 1
    assert moved(f"{duration}_bucket", method="Prepare", backend=BACKEND, le="5.0") == 1
    assert moved(f"{duration}_bucket", method="Prepare", backend=BACKEND, le="10.0") == 2
    assert moved(f"{duration}_bucket", method="Prepare", backend=BACKEND, le="+Inf") == 2
    assert moved("nvfp4_prep_received_bytes_total", backend=BACKEND, source="stream") == 3 << 20
    assert moved("nvfp4_prep_received_bytes_total", backend=BACKEND, source="checkpoint") == 1000
    assert moved("nvfp4_prep_sent_bytes_total", backend=BACKEND) == 5 << 20
    assert after["nvfp4_prep_queue_depth", (("device", "cpu"),)] == 2
    assert after["nvfp4_prep_memory_budget_bytes", (("device", "cpu"),)] == 1 << 30
    assert after["nvfp4_prep_memory_budget_in_use_bytes", (("device", "cpu"),)] == 123456
    assert moved("nvfp4_prep_cache_hits_total") == 4
    assert moved("nvfp4_prep_cache_misses_total") == 1
    assert after["nvfp4_prep_cache_bytes", ()] == 4096


def test_stage_timer_observes_each_stage_and_failed_blocks_too(served):
    metrics, url = served
    for stage in STAGES:
        with metrics.stage_timer(stage, BACKEND):
            time.sleep(0.01)
    with pytest.raises(RuntimeError):
        with metrics.stage_timer("send", BACKEND):
            time.sleep(0.01)
            raise RuntimeError("client went away")
    samples = scrape(url)
    for stage in STAGES:
        labels = (("backend", BACKEND), ("stage", stage))
        count = samples["nvfp4_prep_stage_duration_seconds_count", labels]
        assert count == (2 if stage == "send" else 1)
        assert samples["nvfp4_prep_stage_duration_seconds_sum", labels] >= 0.01 * count


def test_stage_timer_rejects_an_unknown_stage():
    with pytest.raises(ValueError, match="'decode' is not one of read, host_to_device"):
        with Metrics().stage_timer("decode", BACKEND):
            pass


def test_inflight_gauge_tracks_a_running_block(served):
    metrics, url = served
    with metrics.inflight.labels("Prepare").track_inprogress():
        assert scrape(url)["nvfp4_prep_inflight_requests", (("method", "Prepare"),)] == 1
    assert scrape(url)["nvfp4_prep_inflight_requests", (("method", "Prepare"),)] == 0


def test_two_servers_count_apart():
    first, second = Metrics(), Metrics()
    first.cache_hits.inc(3)
    assert first.registry.get_sample_value("nvfp4_prep_cache_hits_total") == 3
    assert second.registry.get_sample_value("nvfp4_prep_cache_hits_total") == 0


def test_build_info_names_the_running_torch(served):
    _, url = served
    (labels,) = [dict(labels) for (name, labels), _ in scrape(url).items() if name == "nvfp4_prep_build_info"]
    assert labels["torch"] == torch.__version__
    assert labels["cuda"] == (torch.version.cuda or "none")


def test_every_metric_the_deploy_readme_lists_is_served(served):
    metrics, url = served
    # Labelled metrics have no samples until a child exists.
    metrics.observe_request("Prepare", BACKEND, "OK", 0.1)
    with metrics.stage_timer("read", BACKEND):
        pass
    metrics.received_bytes.labels(BACKEND, "stream")
    metrics.checkpoint_read_bytes.labels(BACKEND)
    metrics.sent_bytes.labels(BACKEND)
    metrics.inflight.labels("Prepare")
    for gauge in (metrics.queue_depth, metrics.memory_budget_bytes, metrics.memory_in_use_bytes):
        gauge.labels("cpu")
    metrics.watch_refusals(RefusalLog())
    samples = {name for name, _ in scrape(url)}
    served_names = samples | {re.sub(r"_(bucket|count|sum)$", "", name) for name in samples}
    listed = set()
    # The names in the first cell of each row of the metrics table (the text also names derived series, such as
    # the autoscaler's, that the server does not serve itself).
    first_cells = re.findall(r"^\| (`nvfp4_prep_[^|]*)\|", README.read_text(), re.M)
    for cell in (name for row in first_cells for name in re.findall(r"`(nvfp4_prep_[a-z_{},]+)`", row)):
        if "{" in cell:  # nvfp4_prep_gpu_memory_{allocated,reserved,free,total}_bytes
            head, options, tail = re.fullmatch(r"(.*)\{(.*)\}(.*)", cell).groups()
            listed |= {head + option + tail for option in options.split(",")}
        else:
            listed.add(cell)
    # GPU memory is read at scrape time and a CPU server has no samples: compare the collector's names.
    gpu = {name for name in listed if name.startswith("nvfp4_prep_gpu_memory_")}
    assert gpu == {family.name for family in GpuMemoryCollector(["cuda:0"]).describe()}
    assert listed - gpu <= served_names, listed - gpu - served_names
    assert len(listed) > 10


def test_gpu_memory_has_no_samples_without_cuda_devices():
    collector = GpuMemoryCollector(["cpu"])
    families = list(collector.collect())
    assert [family.name for family in families] == [family.name for family in collector.describe()]
    assert all(not family.samples for family in families)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_reads_the_allocator_at_scrape_time():
    metrics = Metrics(devices=("cuda:0",))
    baseline = metrics.registry.get_sample_value("nvfp4_prep_gpu_memory_allocated_bytes", {"device": "cuda:0"})
    block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda:0")
    allocated = metrics.registry.get_sample_value("nvfp4_prep_gpu_memory_allocated_bytes", {"device": "cuda:0"})
    assert allocated - baseline >= block.numel()
    free = metrics.registry.get_sample_value("nvfp4_prep_gpu_memory_free_bytes", {"device": "cuda:0"})
    total = metrics.registry.get_sample_value("nvfp4_prep_gpu_memory_total_bytes", {"device": "cuda:0"})
    assert 0 < free < total


def test_stopped_server_refuses_connections():
    metrics = Metrics()
    server = MetricsHttpServer(metrics.page, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{server.port}/metrics"
    assert scrape(url)
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
