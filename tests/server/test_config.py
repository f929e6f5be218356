"""Server configuration from flags and NVFP4_PREP_* variables, and its start-up errors."""

from __future__ import annotations

import argparse
import socket
import threading
from pathlib import Path

import pytest

from nvfp4_prep.server.config import ConfigError, ServeConfig, add_arguments, parse_size
from tests.helpers.server_state import wait_for


def config(argv: list[str], environ: dict[str, str] | None = None) -> ServeConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return ServeConfig.from_args(parser.parse_args(argv), environ or {})


def test_defaults() -> None:
    assert config([]) == ServeConfig()
    assert ServeConfig().port == 50051 and ServeConfig().chunk_size == 2 << 20 and ServeConfig().metrics_port == 9400


def test_every_flag_and_its_variable(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    flags = ["--host", "127.0.0.1", "--port", "6000", "--device", "cpu", "--memory-budget", "8GiB",
             "--chunk-size", "4MiB", "--log-level", "debug", "--log-format", "json", "--metrics-port", "0",
             "--allowed-root", str(tmp_path / "a"), "--allowed-root", str(tmp_path / "b"),
             "--cache-bytes", "1.5GiB", "--drain-timeout", "2.5"]
    env = {"NVFP4_PREP_HOST": "127.0.0.1", "NVFP4_PREP_PORT": "6000", "NVFP4_PREP_DEVICE": "cpu",
           "NVFP4_PREP_MEMORY_BUDGET": "8GiB", "NVFP4_PREP_CHUNK_SIZE": "4MiB", "NVFP4_PREP_LOG_LEVEL": "debug",
           "NVFP4_PREP_LOG_FORMAT": "json", "NVFP4_PREP_METRICS_PORT": "0",
           "NVFP4_PREP_ALLOWED_ROOT": f"{tmp_path / 'a'}:{tmp_path / 'b'}", "NVFP4_PREP_CACHE_BYTES": "1.5GiB",
           "NVFP4_PREP_DRAIN_TIMEOUT": "2.5"}
    want = ServeConfig(host="127.0.0.1", port=6000, devices=("cpu",), memory_budget=8 << 30, chunk_size=4 << 20,
                       log_level="DEBUG", log_format="json", metrics_port=0,
                       allowed_roots=(tmp_path / "a", tmp_path / "b"), cache_bytes=3 << 29, drain_timeout=2.5)
    assert config(flags) == want
    assert config([], env) == want


def test_flag_wins_over_variable() -> None:
    assert config(["--port", "7000"], {"NVFP4_PREP_PORT": "8000"}).port == 7000
    assert config([], {"NVFP4_PREP_DEVICE": "cuda:0,cuda:1"}).devices == ("cuda:0", "cuda:1")


@pytest.mark.parametrize("argv, environ, fragment", [
    (["--port", "70000"], {}, "--port: '70000'"),
    ([], {"NVFP4_PREP_PORT": "http"}, "--port (from NVFP4_PREP_PORT): 'http'"),
    (["--memory-budget", "lots"], {}, "--memory-budget: 'lots'"),
    (["--memory-budget", "0"], {}, "--memory-budget"),
    (["--chunk-size", "1KiB"], {}, "--chunk-size: '1KiB'"),
    (["--chunk-size", "128MiB"], {}, "--chunk-size"),
    (["--device", "gpu0"], {}, "--device: 'gpu0'"),
    (["--device", "cpu,cuda:0"], {}, "--device"),
    (["--log-level", "chatty"], {}, "--log-level"),
    (["--log-format", "xml"], {}, "--log-format"),
    (["--allowed-root", "/no/such/dir"], {}, "--allowed-root"),
    (["--drain-timeout", "-1"], {}, "--drain-timeout"),
    (["--host", " "], {}, "--host"),
    (["--port", "9500", "--metrics-port", "9500"], {}, "--port and --metrics-port: both are 9500"),
    ([], {"NVFP4_PREP_PORT": "9400"}, "--port and --metrics-port: both are 9400"),
])
def test_bad_values_name_the_flag(argv, environ, fragment) -> None:
    with pytest.raises(ConfigError) as info:
        config(argv, environ)
    assert str(info.value).startswith(fragment.split(":")[0]) and fragment in str(info.value)


@pytest.mark.parametrize("text, size", [
    ("1048576", 1 << 20), ("2MiB", 2 << 20), ("2MB", 2_000_000), ("8GiB", 8 << 30), ("1.5 KiB", 1536), ("3k", 3000),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_refuses_nonsense() -> None:
    for text in ("", "MiB", "2 parsecs", "-1GiB"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(text)


def test_missing_gpu_is_a_start_up_error(start_server) -> None:
    with pytest.raises(ConfigError, match="--device: cuda:99 does not exist"):
        start_server(devices=("cuda:99",))


@pytest.mark.parametrize("field, flag", [
    ("port", "--host/--port"), ("health_port", "--health-port"), ("metrics_port", "--metrics-port"),
])
def test_a_port_in_use_is_a_start_up_error_naming_the_flag(start_server, field, flag) -> None:
    before = threading.active_count()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            start_server(**{field: port})
    assert str(info.value).startswith(f"{flag}: cannot listen on 127.0.0.1:{port}"), str(info.value)
    wait_for(lambda: threading.active_count() <= before)
