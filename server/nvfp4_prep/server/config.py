"""Server configuration: flags, their NVFP4_PREP_* environment variables, and validation.

Every flag ``--foo-bar`` may also come from ``NVFP4_PREP_FOO_BAR``; a flag on
the command line wins. Bad values stop the server at start-up with a message
that names the flag (and the variable when the value came from there).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from nvfp4_prep.contract.environment import ENV_PREFIX, env_name, env_value
from nvfp4_prep.wire import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from nvfp4_prep.wire.framing import MAX_DIMS

__all__ = ["ENV_PREFIX", "FLAGS", "ConfigError", "ServeConfig", "add_arguments", "parse_size"]

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


# -- value parsers: each takes the flag's text (or list, for a repeatable flag) and raises ValueError ----------


def _host(text: str) -> str:
    if not str(text).strip():
        raise ValueError("empty")
    return str(text).strip()


def _port(text: str) -> int:
    number = int(text)
    if not 0 <= number <= 65535:
        raise ValueError("out of range")
    return number


def _bulk_address(text: str | None) -> tuple[str, int] | None:
    if text is None or not str(text).strip():
        return None
    host, colon, port = str(text).strip().rpartition(":")
    if not colon or not host.strip("[]"):
        raise ValueError("expected HOST:PORT")
    return host, _port(port)


def _optional_host(text: str | None) -> str | None:
    return None if text is None else _host(text)


def _devices(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [name for name in names if not _DEVICE.match(name)]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"bad or repeated devices {bad or list(names)}")
    if "cpu" in names and len(names) > 1:
        raise ValueError("cpu cannot be combined with GPUs")
    return names


def _budget(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    size = parse_size(text)
    if size <= 0:
        raise ValueError("must be positive")
    return size


def _chunk(text: str) -> int:
    size = parse_size(text)
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise ValueError("out of range")
    return size


def _choice(options: tuple[str, ...], upper: bool) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.upper() if upper else text.lower()
        if value not in options:
            raise ValueError("unknown value")
        return value
    return parse


def _roots(values) -> tuple[Path, ...]:
    paths = tuple(Path(value).expanduser().resolve() for value in (values or ()))
    missing = [str(path) for path in paths if not path.is_dir()]
    if missing:
        raise ValueError(f"not directories: {missing}")
    return paths


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be >= 0")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be > 0")
    return value


def _size(text: str) -> int:
    value = parse_size(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _file(text: str | None) -> Path | None:
    if text is None or not str(text).strip():
        return None
    path = Path(str(text).strip()).expanduser()
    if not path.is_file():
        raise ValueError("no such file")
    return path


def _boolean(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() not in _BOOLEANS:
        raise ValueError("not a boolean")
    return _BOOLEANS[str(value).strip().lower()]


def _count(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise ValueError("out of range")
        return value
    return parse


@dataclass(frozen=True)
class _Flag:
    """One flag of ``serve``: its default (as text, parsed like any value), parser and help, in one place."""

    name: str
    default: str | None
    parse: Callable
    expected: str
    help: str
    field: str = ""  # the ServeConfig field, when it is not the flag's name
    repeatable: bool = False
    boolean: bool = False

    @property
    def env(self) -> str:
        return env_name(self.name)

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def attribute(self) -> str:
        return self.field or self.dest

    def value(self, raw, source: str):
        try:
            return self.parse(raw)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: {raw!r} is not valid ({self.expected}; {err})") from None


_SIZES = "a size such as 16GiB, or 0"
_LOG_CHOICES = "one of " + ", ".join(LOG_LEVELS)
_FORMAT_CHOICES = "one of " + ", ".join(LOG_FORMATS)

# Every flag of `nvfp4-prep serve`, in --help order.
FLAGS = (
    _Flag("host", "0.0.0.0", _host, "a host name or address", "address to listen on"),
    _Flag("port", "50051", _port, "0 to 65535", "port to listen on (0 picks a free one)"),
    _Flag("device", None, _devices, "cpu, or cuda:N[,cuda:M...]",
          "comma-separated devices, one worker each: cuda:N or cpu (default: cuda:0 if a GPU is visible, else cpu)",
          field="devices"),
    _Flag("memory-budget", "auto", _budget, "auto or a size such as 8GiB",
          "bytes of tensors each device's worker may hold at once, e.g. 8GiB; requests beyond it wait, a request "
          "larger than it gets RESOURCE_EXHAUSTED (auto: 85%% of the GPU's memory, or 50%% of host memory for cpu)"),
    _Flag("chunk-size", "2MiB", _chunk, f"{MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes, e.g. 2MiB",
          f"bytes per response chunk, {MIN_CHUNK_SIZE >> 10}KiB to {MAX_CHUNK_SIZE >> 20}MiB; message size limits "
          "follow it"),
    _Flag("log-level", "INFO", _choice(LOG_LEVELS, True), _LOG_CHOICES, _LOG_CHOICES),
    _Flag("log-format", "text", _choice(LOG_FORMATS, False), _FORMAT_CHOICES, _FORMAT_CHOICES),
    _Flag("metrics-port", "9400", _port, "0 to 65535, 0 disables", "Prometheus metrics port (0 disables)"),
    _Flag("metrics-address", None, _optional_host, "a host name or address",
          "address /metrics listens on, e.g. 127.0.0.1 for a scrape from inside the pod only (default: --host); "
          "without a token (--metrics-token-file or --auth-token-file) anyone who reaches it reads the metrics, "
          "so keep it on the pod network"),
    _Flag("metrics-tls", "true", _boolean, "true or false",
          "with --tls-cert, serve /metrics over HTTPS with the same certificate, and under --tls-client-ca want a "
          "client certificate too (--no-metrics-tls: plain HTTP, for a scraper that only speaks it)", boolean=True),
    _Flag("metrics-token-file", None, _file, "a readable file of tokens",
          "bearer tokens a scrape must send as 'Authorization: Bearer <token>', one per line, else 401 (default: "
          "the tokens of --auth-token-file, when set)"),
    _Flag("allowed-root", None, _roots, "existing directories",
          "directory under which checkpoint references may be read; repeat the flag, or separate with ':' in the "
          "variable (default: none, references refused)", field="allowed_roots", repeatable=True),
    _Flag("cache-bytes", "0", _size, _SIZES,
          "size of the prepared-layer cache in host memory, e.g. 16GiB (0 disables)"),
    _Flag("drain-timeout", "30", _seconds, "seconds >= 0",
          "seconds in-flight requests may take to finish after SIGTERM"),
    _Flag("tls-cert", None, _file, "a readable PEM file",
          "PEM certificate chain of the server; with --tls-key the gRPC port speaks TLS only (default: plaintext)"),
    _Flag("tls-key", None, _file, "a readable PEM file", "PEM private key (unencrypted) of --tls-cert"),
    _Flag("tls-client-ca", None, _file, "a readable PEM file",
          "PEM CA certificates that client certificates must chain to: mutual TLS, a client without such a "
          "certificate cannot connect (needs --tls-cert)"),
    _Flag("auth-token-file", None, _file, "a readable file of tokens",
          "file of bearer tokens, one per line (at least 16 characters each); calls without 'authorization: Bearer "
          "<token>' get UNAUTHENTICATED (default: no token needed)"),
    _Flag("health-without-auth", "true", _boolean, "true or false",
          "answer grpc.health.v1 on the gRPC port without a token (probes carry none; TLS still applies there)",
          boolean=True),
    _Flag("health-port", "0", _port, "0 to 65535, 0 disables",
          "second, plaintext port that serves only grpc.health.v1, for Kubernetes probes when the gRPC port speaks "
          "TLS (0 disables)"),
    _Flag("max-request-bytes", "0", _size, _SIZES,
          "largest sum of tensor bytes one Prepare call may announce, e.g. 16GiB; more is RESOURCE_EXHAUSTED (0: "
          "bounded by the memory budget only)"),
    _Flag("max-tensors", "16384", _count(1), "a count >= 1",
          "most tensors one Prepare call may announce; more is INVALID_ARGUMENT"),
    _Flag("max-tensor-rank", "4", _count(1, MAX_DIMS), f"1 to {MAX_DIMS}",
          f"most dimensions of one tensor, 1 to {MAX_DIMS}; more is INVALID_ARGUMENT"),
    _Flag("max-tensor-bytes", "0", _size, "a size such as 8GiB, or 0",
          "largest single tensor, e.g. 8GiB; more is RESOURCE_EXHAUSTED (0: no limit of its own)"),
    _Flag("max-concurrent", "32", _count(1), "a count >= 1",
          "Prepare calls running at once; more are refused with RESOURCE_EXHAUSTED, which the SDK retries with "
          "backoff"),
    _Flag("max-concurrent-per-client", "8", _count(0), "a count >= 0",
          "Prepare calls one client (its certificate under mutual TLS, else its address) may run at once, so that "
          "one client cannot take every --max-concurrent slot; 8 is twice the SDK's default concurrency and a "
          "quarter of the default --max-concurrent (0: no limit of its own, e.g. for one trusted loader)"),
    _Flag("max-deadline", "600", _positive_seconds, "seconds > 0",
          "seconds any call may run, whatever deadline its client set; a call past it gets DEADLINE_EXCEEDED, also "
          "one whose client stalls"),
    _Flag("header-timeout", "10", _positive_seconds, "seconds > 0",
          "seconds a Prepare stream may take to send its header; one that sends none by then gets "
          "DEADLINE_EXCEEDED naming request.header (a stream takes a --max-concurrent slot only once its header "
          "arrives)"),
    _Flag("idle-timeout", "30", _positive_seconds, "seconds > 0",
          "seconds a Prepare stream may go without sending its next message, or without reading the next one "
          "of its answer; a stalled stream gets DEADLINE_EXCEEDED and gives back its slot and memory, so a "
          "client that announces a large layer and stops cannot hold the budget until --max-deadline"),
    _Flag("keepalive-time", "60", _positive_seconds, "seconds > 0",
          "seconds between the server's keepalive pings on an idle connection"),
    _Flag("keepalive-timeout", "20", _positive_seconds, "seconds > 0",
          "seconds the server waits for a ping's answer before closing the connection"),
    _Flag("keepalive-permit-time", "20", _seconds, "seconds >= 0",
          "shortest interval in seconds at which clients may ping; faster pingers are cut off with too_many_pings "
          "(the SDK pings every 30s)"),
    _Flag("max-connection-age", "300", _seconds, "seconds >= 0, 0 disables",
          "seconds after which the server asks a client to reconnect, so that round_robin clients spread over new "
          "replicas; running calls get --max-deadline to finish (0 disables)"),
    _Flag("ipc-lease-timeout", "30", _seconds, "seconds >= 0, 0 disables",
          "seconds a client on this node that asked for CUDA IPC delivery may take to copy a layer out of the "
          "server's GPU memory and say so; the layer's memory (and budget) is freed then at the latest, and the "
          "call fails with DEADLINE_EXCEEDED (0: never hand out CUDA IPC handles, always stream)"),
    _Flag("bulk-address", None, _bulk_address, "HOST:PORT, e.g. 0.0.0.0:50052 (port 0 picks a free one)",
          "address of the bulk transport: calls that ask for it move their tensor chunks over TCP connections to "
          "this port instead of the gRPC stream, with TLS (and client certificates) as the gRPC port has them and "
          "a one-time ticket per call (default: off, every byte travels over gRPC)"),
    _Flag("bulk-advertise-host", None, _optional_host, "a host name or address",
          "address clients dial for the bulk port, e.g. the pod's IP, so that a bulk connection reaches the replica "
          "whose call handed out the ticket even behind a load-balanced Service (default: the host the client's "
          "channel targets)"),
    _Flag("bulk-ticket-timeout", "30", _positive_seconds, "seconds > 0",
          "seconds a bulk ticket admits connections after its call handed it out (and after the call ended, a "
          "refusal still says why)"),
)
_DEFAULTS = {flag.attribute: flag.parse(flag.default) for flag in FLAGS}


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
    """Everything ``nvfp4-prep serve`` needs, validated; the defaults are those of ``FLAGS``."""

    host: str = _DEFAULTS["host"]
    port: int = _DEFAULTS["port"]
    devices: tuple[str, ...] = _DEFAULTS["devices"]  # empty: cuda:0 when a GPU is visible, else cpu
    memory_budget: int | None = _DEFAULTS["memory_budget"]  # None: derived from the device's memory
    chunk_size: int = _DEFAULTS["chunk_size"]
    log_level: str = _DEFAULTS["log_level"]
    log_format: str = _DEFAULTS["log_format"]
    metrics_port: int = _DEFAULTS["metrics_port"]
    metrics_address: str | None = _DEFAULTS["metrics_address"]  # None: the --host address
    metrics_tls: bool = _DEFAULTS["metrics_tls"]
    metrics_token_file: Path | None = _DEFAULTS["metrics_token_file"]
    allowed_roots: tuple[Path, ...] = _DEFAULTS["allowed_roots"]
    cache_bytes: int = _DEFAULTS["cache_bytes"]
    drain_timeout: float = _DEFAULTS["drain_timeout"]
    tls_cert: Path | None = _DEFAULTS["tls_cert"]
    tls_key: Path | None = _DEFAULTS["tls_key"]
    tls_client_ca: Path | None = _DEFAULTS["tls_client_ca"]
    auth_token_file: Path | None = _DEFAULTS["auth_token_file"]
    health_without_auth: bool = _DEFAULTS["health_without_auth"]
    health_port: int = _DEFAULTS["health_port"]
    max_request_bytes: int = _DEFAULTS["max_request_bytes"]
    max_tensors: int = _DEFAULTS["max_tensors"]
    max_tensor_rank: int = _DEFAULTS["max_tensor_rank"]
    max_tensor_bytes: int = _DEFAULTS["max_tensor_bytes"]
    max_concurrent: int = _DEFAULTS["max_concurrent"]
    max_concurrent_per_client: int = _DEFAULTS["max_concurrent_per_client"]
    max_deadline: float = _DEFAULTS["max_deadline"]
    header_timeout: float = _DEFAULTS["header_timeout"]
    idle_timeout: float = _DEFAULTS["idle_timeout"]
    keepalive_time: float = _DEFAULTS["keepalive_time"]
    keepalive_timeout: float = _DEFAULTS["keepalive_timeout"]
    keepalive_permit_time: float = _DEFAULTS["keepalive_permit_time"]
    max_connection_age: float = _DEFAULTS["max_connection_age"]
    bulk_address: tuple[str, int] | None = _DEFAULTS["bulk_address"]  # None: no bulk transport
    bulk_advertise_host: str | None = _DEFAULTS["bulk_advertise_host"]
    bulk_ticket_timeout: float = _DEFAULTS["bulk_ticket_timeout"]
    ipc_lease_timeout: float = _DEFAULTS["ipc_lease_timeout"]  # 0: no CUDA IPC delivery

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServeConfig:
        """Builds the config from parsed flags, falling back to ``environ`` (default ``os.environ``)."""
        values = {}
        for flag in FLAGS:
            value = getattr(args, flag.dest, None)
            source = f"--{flag.name}"
            if value is None:
                value = env_value(flag.name, environ=environ)
                if value is not None:
                    source = f"--{flag.name} (from {flag.env})"
                    if flag.repeatable:
                        value = [part for part in value.split(":") if part]
            values[flag.attribute] = _DEFAULTS[flag.attribute] if value is None else flag.value(value, source)
        return cls(**values)._checked()

    def _checked(self) -> ServeConfig:
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
        if self.bulk_address is not None and self.bulk_address[1] and \
                self.bulk_address[1] in (self.port, self.metrics_port, self.health_port):
            raise ConfigError(f"--bulk-address: port {self.bulk_address[1]} is already the gRPC, metrics or health "
                              "port (expected a port of its own, or 0)")
        return self
