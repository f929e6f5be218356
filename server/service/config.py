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

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


_FLAGS = (
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
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the server's flags to ``parser`` (values stay strings until ``ServeConfig.from_args``)."""
    for flag in _FLAGS:
        default = f" (default: {flag.default})" if flag.default is not None else ""
        parser.add_argument(
            f"--{flag.name}", dest=flag.dest, default=None,
            action="append" if flag.repeatable else "store",
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

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> "ServeConfig":
        """Builds the config from parsed flags, falling back to ``environ`` (default ``os.environ``)."""
        environ = os.environ if environ is None else environ
        raw: dict[str, tuple[object, str]] = {}
        for flag in _FLAGS:
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

        return cls(
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
        )
