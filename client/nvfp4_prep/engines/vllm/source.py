"""Where the loader takes prepared layers from: a prepared folder, or a server that prepares them on request.

Two routes. vLLM's model is a prepared folder (its quantization config names ``nvfp4_prep``): the layers come
from that folder, or from this rank's folder of the set it belongs to, and ``--model-loader-extra-config``
stays empty. vLLM's model is the source checkpoint: ``--model-loader-extra-config`` picks one of
``{"prepared": "/path/folder"}`` (the folder also carries every other tensor unchanged, so the model is loaded
from it alone) or ``{"server": "host:port", "tls_ca": PATH, "token_file": PATH, "location": PATH, "timeout":
SECONDS}`` (the server reads each MoE layer from ``location``, the source checkpoint as the server sees it,
default the model path; the other tensors come from the model path the usual way).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from nvfp4_prep.prepared.prepared_config import QUANT_METHOD

from .checks import BACKEND, PROFILE, Expectation, PreparedLoadRefused

_FOLDER_KEYS = {"prepared"}
_SERVER_KEYS = {"server", "tls_ca", "token_file", "location", "timeout"}


class FolderSource:
    """Prepared layers from a prepared folder (or the rank's folder of a set), through the prepared-folder reader."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._folder = None

    def open(self, expected: Expectation) -> None:
        """Open the folder made for this rank (of the set ``path`` is, or is one folder of); the reader refuses a
        layout record that differs (backend, profile, FlashInfer release, activation, shard) before any tensor
        is read."""
        from nvfp4_prep.prepared.reader import PreparedLayoutMismatch, open_prepared, rank_folders

        wanted = {"backend": BACKEND, "profile": PROFILE, "activation": expected.activation,
                  "flashinfer_release": expected.record()["flashinfer_release"], **expected.shard()}
        ranks = rank_folders(self.path) or _set_of(self.path)
        for folder in ranks:
            with contextlib.suppress(PreparedLayoutMismatch):
                self._folder = open_prepared(folder, **wanted)
                return
        if ranks:
            raise PreparedLoadRefused("model_loader_extra_config.prepared",
                                      f"the rank set of {self.path} holds no rank folder for {expected.shard()}")
        self._folder = open_prepared(self.path, **wanted)

    def close(self) -> None:
        if self._folder is not None:
            self._folder.close()

    def prefixes(self) -> set[str]:
        return set(self._folder.layers())

    def layout(self, prefix: str) -> dict:
        return self._folder.layout(prefix)

    def layer(self, expected: Expectation, device: str) -> tuple[dict[str, torch.Tensor], dict]:
        return self._folder.layer_tensors(expected.prefix, device=device), self.layout(expected.prefix)

    def other_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor carried over unchanged (not a prepared expert tensor), memory-mapped, shard by shard."""
        for filename, entry in sorted(self._folder.manifest.shards.items()):
            names = entry.get("other_tensors", [])
            if names:
                with safe_open(self._folder.directory / filename, framework="pt") as handle:
                    for name in names:
                        yield name, handle.get_tensor(name)


def _set_of(folder: Path) -> list[Path]:
    """Every rank folder of the set ``folder`` is one of (vLLM pointed at one rank's folder); empty when none."""
    from nvfp4_prep.prepared.reader import rank_folders

    ranks = rank_folders(folder.parent)
    return ranks if folder.resolve() in {rank.resolve() for rank in ranks} else []


class ServerSource:
    """Prepared layers streamed from an nvfp4-prep server, which reads them from the source checkpoint."""

    def __init__(self, target: str, location: str, *, tls_ca: str | None = None, token_file: str | None = None,
                 timeout: float | None = None) -> None:
        from nvfp4_prep.client import PrepClient
        from nvfp4_prep.client.credentials import read_token_file

        token = read_token_file(token_file, "token_file") if token_file is not None else None
        self.location = location
        self.timeout = timeout
        self._client = PrepClient(target, tls_ca=tls_ca, token=token)

    def open(self, expected: Expectation) -> None:
        """Nothing to open: each layer's request names the backend, profile and shard."""

    def layer(self, expected: Expectation, device: str) -> tuple[dict[str, torch.Tensor], dict]:
        remote = self._client.prepare_reference(self.location, expected.prefix, BACKEND, expected.activation,
                                                timeout=self.timeout, profile=PROFILE, **expected.shard())
        return {name: t.to(device) for name, t in remote.tensors.items()}, remote.layout

    def close(self) -> None:
        self._client.close()


def _text(config: Mapping, key: str, required: bool = False) -> str | None:
    value = config.get(key)
    if (value is not None or required) and (not isinstance(value, str) or not value):
        raise PreparedLoadRefused(f"model_loader_extra_config.{key}", f"expected a non-empty string, got {value!r}")
    return value


def source_from_config(config: object, model_path: str, quantization: str | None) -> FolderSource | ServerSource:
    """The source of the route vLLM's model and ``--model-loader-extra-config`` name (see the module docstring);
    ``quantization`` is the method vLLM resolved for the model (``ModelConfig.quantization``)."""
    if not isinstance(config, Mapping):
        raise PreparedLoadRefused("model_loader_extra_config", f"expected a JSON object, got {config!r}")
    keys = set(config)
    if quantization == QUANT_METHOD:
        if keys:
            raise PreparedLoadRefused("model_loader_extra_config", f"vLLM's model {model_path} is a prepared folder "
                                      f"(quantization {QUANT_METHOD}) and the layers come from it; expected no "
                                      f"keys, got {sorted(keys)} (they name the source for a source checkpoint)")
        return FolderSource(model_path)
    if ("prepared" in keys) == ("server" in keys):
        raise PreparedLoadRefused(
            "model_loader_extra_config", f'expected exactly one of "prepared" (a folder) and "server" (host:port) '
            f"for the source checkpoint {model_path}, which vLLM reads as quantization {quantization!r}; or point "
            f"vLLM at a prepared folder, whose quantization config names {QUANT_METHOD}")
    allowed = _FOLDER_KEYS if "prepared" in keys else _SERVER_KEYS
    if keys - allowed:
        raise PreparedLoadRefused("model_loader_extra_config",
                                  f"unexpected keys {sorted(keys - allowed)}; expected some of {sorted(allowed)}")
    if "prepared" in keys:
        path = _text(config, "prepared", required=True)
        if not os.path.isdir(path):
            raise PreparedLoadRefused("model_loader_extra_config.prepared", f"expected a folder, {path} is none")
        return FolderSource(path)
    timeout = config.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise PreparedLoadRefused("model_loader_extra_config.timeout", f"expected seconds > 0, got {timeout!r}")
    return ServerSource(_text(config, "server", required=True), _text(config, "location") or model_path,
                        tls_ca=_text(config, "tls_ca"), token_file=_text(config, "token_file"), timeout=timeout)


def without_layers(weights: Iterator[tuple[str, torch.Tensor]],
                   prefixes: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The source checkpoint's tensors but those of the layers the server prepares."""
    starts = tuple(f"{prefix}." for prefix in prefixes)
    return ((name, tensor) for name, tensor in weights if not name.startswith(starts))
