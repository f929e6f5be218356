"""Server configuration: flags, their NVFP4_PREP_* environment variables, and validation.

Every flag ``--foo-bar`` may also come from ``NVFP4_PREP_FOO_BAR``; a flag on
the command line wins. Bad values stop the server at start-up with a message
that names the flag (and the variable when the value came from there).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from nvfp4_prep.wire import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from nvfp4_prep.wire.framing import MAX_DIMS

ENV_PREFIX = "NVFP4_PREP_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_DEVICE = re.compile(r"^(cpu|cuda:\d+)$")


class ConfigError(ValueError):
    """A flag or environment variable with a value the server cannot use."""


def parse_size(text: str) -> int:
    """Bytes from ``"8GiB"``, ``"512MiB"``, ``"2MB"`` or ``"1048576"``."""
    match = _SIZE.match(text)
    if not match or match[2].lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (expected e.g. 8GiB, 512MiB, 2MB or a byte count)")
    return int(float(match[1]) * _UNITS[match[2].lower()])


@dataclass(frozen=True)
class _Flag:
    name: str
    default: str | None
    help: str
    repeatable: bool = False
    boolean: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


# Every flag of `nvfp4-prep serve`, in --help order.
FLAGS = (
    _Flag("host", "0.0.0.0", "address to listen on"),
    _Flag("port", "50051", "port to listen on (0 picks a free one)"),
    _Flag("device", None, "comma-separated devices, one worker each: cuda:N or cpu (default: cuda:0 if a GPU "
                          "is visible, else cpu)"),
    _Flag("memory-budget", "auto", "bytes of tensors each device's worker may hold at once, e.g. 8GiB; requests "
                                   "beyond it wait, a request larger than it gets RESOURCE_EXHAUSTED (default "
                                   "auto: 85%% of the GPU's memory, or 50%% of host memory for cpu)"),
    _Flag("chunk-size", "2MiB", f"bytes per response chunk, {MIN_CHUNK_SIZE >> 10}KiB to {MAX_CHUNK_SIZE >> 20}MiB; "
                                "message size limits follow it"),
    _Flag("log-level", "INFO", "one of " + ", ".join(LOG_LEVELS)),
    _Flag("log-format", "text", "one of " + ", ".join(LOG_FORMATS)),
    _Flag("metrics-port", "9400", "Prometheus metrics port (0 disables)"),
    _Flag("allowed-root", None, "directory under which checkpoint references may be read; repeat the flag, or "
                                "separate with ':' in the variable (default: none, references refused)",
          repeatable=True),
    _Flag("cache-bytes", "0", "size of the prepared-layer cache in host memory, e.g. 16GiB (0 disables)"),
    _Flag("drain-timeout", "30", "seconds in-flight requests may take to finish after SIGTERM"),
    _Flag("tls-cert", None, "PEM certificate chain of the server; with --tls-key the gRPC port speaks TLS only "
                            "(default: plaintext)"),
    _Flag("tls-key", None, "PEM private key (unencrypted) of --tls-cert"),
    _Flag("tls-client-ca", None, "PEM CA certificates that client certificates must chain to: mutual TLS, a "
                                 "client without such a certificate cannot connect (needs --tls-cert)"),
    _Flag("auth-token-file", None, "file of bearer tokens, one per line (at least 16 characters each); calls "
                                   "without 'authorization: Bearer <token>' get UNAUTHENTICATED (default: no token "
                                   "needed)"),
    _Flag("health-without-auth", "true", "answer grpc.health.v1 on the gRPC port without a token (probes carry "
                                         "none; TLS still applies there)", boolean=True),
    _Flag("health-port", "0", "second, plaintext port that serves only grpc.health.v1, for Kubernetes probes "
                              "when the gRPC port speaks TLS (0 disables)"),
    _Flag("max-request-bytes", "0", "largest sum of tensor bytes one Prepare call may announce, e.g. 16GiB; "
                                    "more is RESOURCE_EXHAUSTED (0: bounded by the memory budget only)"),
    _Flag("max-tensors", "16384", "most tensors one Prepare call may announce; more is INVALID_ARGUMENT"),
    _Flag("max-tensor-rank", "4", f"most dimensions of one tensor, 1 to {MAX_DIMS}; more is INVALID_ARGUMENT"),
    _Flag("max-tensor-bytes", "0", "largest single tensor, e.g. 8GiB; more is RESOURCE_EXHAUSTED (0: no limit "
                                   "of its own)"),
    _Flag("max-concurrent", "32", "Prepare calls running at once; more are refused with RESOURCE_EXHAUSTED, "
                                  "which the SDK retries with backoff"),
    _Flag("max-concurrent-per-client", "0", "Prepare calls one client (its certificate under mutual TLS, else its "
                                            "address) may run at once (0: no limit of its own)"),
    _Flag("max-deadline", "600", "seconds any call may run, whatever deadline its client set; a call past it "
                                 "gets DEADLINE_EXCEEDED, one whose client stalls is cancelled"),
    _Flag("keepalive-time", "60", "seconds between the server's keepalive pings on an idle connection"),
    _Flag("keepalive-timeout", "20", "seconds the server waits for a ping's answer before closing the connection"),
    _Flag("keepalive-permit-time", "20", "shortest interval in seconds at which clients may ping; faster pingers "
                                         "are cut off with too_many_pings (the SDK pings every 30s)"),
    _Flag("max-connection-age", "300", "seconds after which the server asks a client to reconnect, so that "
                                       "round_robin clients spread over new replicas; running calls get "
                                       "--max-deadline to finish (0 disables)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the server's flags to ``parser`` (values stay strings until ``ServeConfig.from_args``)."""
    for flag in FLAGS:
        default = f" (default: {flag.default})" if flag.default is not None else ""
        action = argparse.BooleanOptionalAction if flag.boolean else "append" if flag.repeatable else "store"
        parser.add_argument(
            f"--{flag.name}", dest=flag.dest, default=None, action=action,
            help=f"{flag.help}{default} [env {flag.env}]",
        )


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``nvfp4-prep serve`` needs, validated."""

    host: str = "0.0.0.0"
    port: int = 50051
    devices: tuple[str, ...] = ()  # empty: cuda:0 when a GPU is visible, else cpu
    memory_budget: int | None = None  # None: derived from the device's memory
    chunk_size: int = 2 << 20
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int = 9400
    allowed_roots: tuple[Path, ...] = ()
    cache_bytes: int = 0
    drain_timeout: float = 30.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None
    health_without_auth: bool = True
    health_port: int = 0
    max_request_bytes: int = 0
    max_tensors: int = 16384
    max_tensor_rank: int = 4
    max_tensor_bytes: int = 0
    max_concurrent: int = 32
    max_concurrent_per_client: int = 0
    max_deadline: float = 600.0
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    keepalive_permit_time: float = 20.0
    max_connection_age: float = 300.0

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> "ServeConfig":
        """Builds the config from parsed flags, falling back to ``environ`` (default ``os.environ``)."""
        environ = os.environ if environ is None else environ
        raw: dict[str, tuple[object, str]] = {}
        for flag in FLAGS:
            value = getattr(args, flag.dest, None)
            source = f"--{flag.name}"
            if value is None and flag.env in environ:
                value = environ[flag.env]
                if flag.repeatable:
                    value = [part for part in str(value).split(":") if part]
                source = f"--{flag.name} (from {flag.env})"
            if value is None:
                value = flag.default
            raw[flag.dest] = (value, source)
        return cls._validated(raw)

    @classmethod
    def _validated(cls, raw: dict[str, tuple[object, str]]) -> "ServeConfig":
        def convert(dest: str, parse, expected: str):
            value, source = raw[dest]
            try:
                return parse(value)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{source}: {value!r} is not valid ({expected}; {err})") from None

        def host(text: str) -> str:
            if not str(text).strip():
                raise ValueError("empty")
            return str(text).strip()

        def port(text: str) -> int:
            number = int(text)
            if not 0 <= number <= 65535:
                raise ValueError("out of range")
            return number

        def devices(text: str | None) -> tuple[str, ...]:
            if text is None:
                return ()
            names = tuple(part.strip() for part in text.split(",") if part.strip())
            bad = [name for name in names if not _DEVICE.match(name)]
            if bad or not names or len(set(names)) != len(names):
                raise ValueError(f"bad or repeated devices {bad or list(names)}")
            if "cpu" in names and len(names) > 1:
                raise ValueError("cpu cannot be combined with GPUs")
            return names

        def budget(text: str) -> int | None:
            if text.strip().lower() == "auto":
                return None
            size = parse_size(text)
            if size <= 0:
                raise ValueError("must be positive")
            return size

        def chunk(text: str) -> int:
            size = parse_size(text)
            if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
                raise ValueError("out of range")
            return size

        def choice(options: tuple[str, ...], upper: bool):
            def parse(text: str) -> str:
                value = text.upper() if upper else text.lower()
                if value not in options:
                    raise ValueError("unknown value")
                return value
            return parse

        def roots(values) -> tuple[Path, ...]:
            paths = tuple(Path(value).expanduser().resolve() for value in (values or ()))
            missing = [str(path) for path in paths if not path.is_dir()]
            if missing:
                raise ValueError(f"not directories: {missing}")
            return paths

        def seconds(text: str) -> float:
            value = float(text)
            if not value >= 0:
                raise ValueError("must be >= 0")
            return value

        def size(text: str) -> int:
            value = parse_size(text)
            if value < 0:
                raise ValueError("must be >= 0")
            return value

        def file(text: str | None) -> Path | None:
            if text is None or not str(text).strip():
                return None
            path = Path(str(text).strip()).expanduser()
            if not path.is_file():
                raise ValueError("no such file")
            return path

        def flag(value) -> bool:
            if isinstance(value, bool):
                return value
            if str(value).strip().lower() not in _BOOLEANS:
                raise ValueError("not a boolean")
            return _BOOLEANS[str(value).strip().lower()]

        def count(low: int, high: int | None = None):
            def parse(text: str) -> int:
                value = int(text)
                if value < low or (high is not None and value > high):
                    raise ValueError("out of range")
                return value
            return parse

        def positive_seconds(text: str) -> float:
            value = float(text)
            if not value > 0:
                raise ValueError("must be > 0")
            return value

        return cls._checked(cls(
            host=convert("host", host, "a host name or address"),
            port=convert("port", port, "0 to 65535"),
            devices=convert("device", devices, "cpu, or cuda:N[,cuda:M...]"),
            memory_budget=convert("memory_budget", budget, "auto or a size such as 8GiB"),
            chunk_size=convert("chunk_size", chunk, f"{MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes, e.g. 2MiB"),
            log_level=convert("log_level", choice(LOG_LEVELS, True), "one of " + ", ".join(LOG_LEVELS)),
            log_format=convert("log_format", choice(LOG_FORMATS, False), "one of " + ", ".join(LOG_FORMATS)),
            metrics_port=convert("metrics_port", port, "0 to 65535, 0 disables"),
            allowed_roots=convert("allowed_root", roots, "existing directories"),
            cache_bytes=convert("cache_bytes", size, "a size such as 16GiB, or 0"),
            drain_timeout=convert("drain_timeout", seconds, "seconds >= 0"),
            tls_cert=convert("tls_cert", file, "a readable PEM file"),
            tls_key=convert("tls_key", file, "a readable PEM file"),
            tls_client_ca=convert("tls_client_ca", file, "a readable PEM file"),
            auth_token_file=convert("auth_token_file", file, "a readable file of tokens"),
            health_without_auth=convert("health_without_auth", flag, "true or false"),
            health_port=convert("health_port", port, "0 to 65535, 0 disables"),
            max_request_bytes=convert("max_request_bytes", size, "a size such as 16GiB, or 0"),
            max_tensors=convert("max_tensors", count(1), "a count >= 1"),
            max_tensor_rank=convert("max_tensor_rank", count(1, MAX_DIMS), f"1 to {MAX_DIMS}"),
            max_tensor_bytes=convert("max_tensor_bytes", size, "a size such as 8GiB, or 0"),
            max_concurrent=convert("max_concurrent", count(1), "a count >= 1"),
            max_concurrent_per_client=convert("max_concurrent_per_client", count(0), "a count >= 0"),
            max_deadline=convert("max_deadline", positive_seconds, "seconds > 0"),
            keepalive_time=convert("keepalive_time", positive_seconds, "seconds > 0"),
            keepalive_timeout=convert("keepalive_timeout", positive_seconds, "seconds > 0"),
            keepalive_permit_time=convert("keepalive_permit_time", seconds, "seconds >= 0"),
            max_connection_age=convert("max_connection_age", seconds, "seconds >= 0, 0 disables"),
        ))

    def _checked(self) -> "ServeConfig":
        """Checks the flags that only make sense together."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key: give both (TLS) or neither (plaintext)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca: needs --tls-cert and --tls-key (mutual TLS is TLS that also checks "
                              "client certificates)")
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError(f"--port and --metrics-port: both are {self.port} (expected two different ports, or "
                              "--metrics-port 0)")
        if self.health_port and self.health_port in (self.port, self.metrics_port):
            raise ConfigError(f"--health-port: {self.health_port} is already the gRPC or the metrics port "
                              "(expected a port of its own, or 0)")
        return self
