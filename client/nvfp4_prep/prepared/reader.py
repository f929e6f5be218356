"""Reading a prepared folder for a loader: its layout checked against what the caller expects, then layer by layer.

``open_prepared`` reads only the manifest: a folder made for another backend, profile, FlashInfer release
or shard is refused with ``PreparedLayoutMismatch`` naming the field before any tensor is touched, and an
unfinished run is refused outright. ``layer_tensors`` then maps that layer's shard with safetensors
(``safe_open``: a loader's own local files, so mapping is fine here, unlike on the server), checks the
shard's layout record and each tensor's dtype, shape and CRC32C against the manifest, and returns the SPEC
section 7 tensors without the prefix. Other layers' bytes are never read.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nvfp4_prep.checkpoint.errors import CheckpointInvalid, CheckpointNotFound
from nvfp4_prep.checkpoint.safetensors_file import TORCH_DTYPES
from nvfp4_prep.contract.layout import PREPARED_NAMES
from nvfp4_prep.contract.tensor_bytes import byte_view

from .checksum import crc32c_hex
from .manifest import LAYOUT_METADATA_KEY, MANIFEST_NAME, SHARED_LAYOUT_KEYS, Manifest
from .prepared_config import original_config
from .rank_set import RANKS_NAME, RankSet

# The layout fields a caller may require, in the order they are checked.
EXPECTED_FIELDS = ("layout_id", "backend", "profile", "flashinfer_release", "activation",
                   "tp_rank", "tp_size", "ep_rank", "ep_size", "expert_placement")


class PreparedLayoutMismatch(CheckpointInvalid):
    """The folder's layout record differs from what the caller expects in ``field``."""

    def __init__(self, folder: Path, field: str, found: object, expected: object) -> None:
        super().__init__(f"{folder}: layout {field} is {json.dumps(found)}, expected {json.dumps(expected)} "
                         f"(prepare the checkpoint again with that {field}, or open the folder made for it)")
        self.field, self.found, self.expected = field, found, expected


def rank_folders(directory: Path) -> list[Path]:
    """The rank folders a set of rank folders lists (``RANKS_NAME`` in ``directory``); empty when it is not one."""
    rank_set = RankSet.load(directory)
    return [directory / rank.folder for rank in rank_set.ranks] if rank_set is not None else []


def _load_manifest(directory: Path) -> Manifest:
    manifest = Manifest.load(directory)
    if manifest is None:
        ranks = rank_folders(directory)
        if ranks:
            raise CheckpointNotFound(
                f"{directory} is a set of rank folders ({RANKS_NAME}); open the folder of one rank: "
                + ", ".join(path.name for path in ranks))
        raise CheckpointNotFound(f"{directory}: no {MANIFEST_NAME}; expected a folder written by nvfp4-prep prepare")
    if not manifest.complete:
        raise CheckpointInvalid(f"{directory}: the prepare run that wrote it did not finish ({MANIFEST_NAME} says "
                                "complete: false); run prepare again to finish it")
    missing = [key for key in SHARED_LAYOUT_KEYS if key not in manifest.layout]
    if missing:
        raise CheckpointInvalid(f"{directory / MANIFEST_NAME}: layout lacks {', '.join(missing)}; expected the "
                                "full layout record (written by another nvfp4-prep version?)")
    for filename, shard in manifest.shards.items():
        layer = shard.get("layer")
        if layer is not None and layer not in manifest.layers:
            raise CheckpointInvalid(f"{directory / MANIFEST_NAME}: shards.{filename} holds layer {layer!r}, which "
                                    "layout.layers does not list")
    return manifest


def open_prepared(path: str | os.PathLike, *, backend: str | None = None, profile: str | None = None,
                  flashinfer_release: str | None = None, tp_rank: int | None = None, tp_size: int | None = None,
                  ep_rank: int | None = None, ep_size: int | None = None, expert_placement: str | None = None,
                  layout_id: str | None = None, activation: str | None = None) -> PreparedFolder:
    """The prepared folder at ``path``, once its layout matches every expectation given (None: any)."""
    directory = Path(path)
    manifest = _load_manifest(directory)
    given = {"backend": backend, "profile": profile, "flashinfer_release": flashinfer_release, "tp_rank": tp_rank,
             "tp_size": tp_size, "ep_rank": ep_rank, "ep_size": ep_size, "expert_placement": expert_placement,
             "layout_id": layout_id, "activation": activation}
    for field in EXPECTED_FIELDS:
        want, have = given[field], manifest.layout.get(field)
        if want is not None and json.dumps(have) != json.dumps(want):  # 1 is not True, "0" is not 0
            raise PreparedLayoutMismatch(directory, field, have, want)
    return PreparedFolder(directory, manifest)


class PreparedFolder:
    """An opened prepared folder; use ``open_prepared``. Close it (or use it as a context manager)."""

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self.directory = directory
        self.manifest = manifest
        self._shard_of = {entry["layer"]: filename for filename, entry in sorted(manifest.shards.items())
                          if entry.get("layer") is not None}
        self._opened = contextlib.ExitStack()
        self._files: dict[str, object] = {}
        self._closed = False

    def layers(self) -> list[str]:
        """Experts prefixes of the prepared MoE layers, in shard order (the source's layer order)."""
        return list(self._shard_of)

    def layout(self, prefix: str) -> dict:
        """The full layout record of one layer (shared fields and its sizes), as ``unprepare`` takes it."""
        self._shard(prefix)
        return json.loads(json.dumps(self.manifest.layer_layout(prefix)))  # a copy the caller may change

    def other_tensor_names(self) -> list[str]:
        """Every tensor carried over unchanged from the source (not a prepared expert tensor), sorted."""
        return sorted(name for entry in self.manifest.shards.values() for name in entry.get("other_tensors", []))

    def original_config(self) -> dict:
        """config.json as the source had it: its quantization config back in place, the marker removed."""
        path = self.directory / "config.json"
        if not path.is_file():
            raise CheckpointNotFound(f"{path} is missing; the source had no config.json")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointInvalid(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointInvalid(f"{path}: expected a JSON object")
        try:
            return original_config(config)
        except CheckpointInvalid as exc:
            raise CheckpointInvalid(f"{path}: {exc}") from None

    def _shard(self, prefix: str) -> str:
        try:
            return self._shard_of[prefix]
        except KeyError:
            raise CheckpointNotFound(f"{self.directory}: no prepared layer {prefix!r} (layers: "
                                     f"{', '.join(self._shard_of) or 'none'})") from None

    def _open(self, filename: str):
        if self._closed:
            raise ValueError(f"{self.directory}: read after close()")
        if filename not in self._files:
            path = self.directory / filename
            try:
                self._files[filename] = self._opened.enter_context(safe_open(path, framework="pt", device="cpu"))
            except (OSError, SafetensorError) as exc:
                raise CheckpointInvalid(f"{path}: cannot be read as safetensors ({exc})") from None
        return self._files[filename]

    def layer_tensors(self, prefix: str, device: str | torch.device = "cpu", *,
                      check: bool = True) -> dict[str, torch.Tensor]:
        """One layer's SPEC section 7 tensors (names without the prefix) on ``device``.

        With ``check`` (the default) each tensor's CRC32C must equal the manifest's; any difference in the
        shard's layout record, a tensor's presence, dtype or shape is refused either way.
        """
        filename = self._shard(prefix)
        path = self.directory / filename
        listed = self.manifest.shards[filename]["tensors"]
        handle = self._open(filename)
        record = (handle.metadata() or {}).get(LAYOUT_METADATA_KEY)
        want = self.manifest.layout_record([prefix])
        if record is None or json.loads(record) != want:
            raise CheckpointInvalid(f"{path}: metadata {LAYOUT_METADATA_KEY} differs from the layout record in "
                                    f"{MANIFEST_NAME}; the folder was edited or mixed from several runs")
        present = set(handle.keys())
        out = {}
        for name in PREPARED_NAMES:
            full = f"{prefix}.{name}"
            info = listed.get(full)
            if info is None or full not in present:
                where = MANIFEST_NAME if info is None else "the shard's header"
                raise CheckpointInvalid(f"{path}: tensor {full} is missing from {where}")
            try:
                tensor = handle.get_tensor(full)
            except SafetensorError as exc:
                raise CheckpointInvalid(f"{path}: tensor {full} cannot be read ({exc})") from None
            if tensor.dtype != TORCH_DTYPES.get(info.get("dtype")) or list(tensor.shape) != info.get("shape"):
                raise CheckpointInvalid(f"{path}: tensor {full} is {tensor.dtype} {list(tensor.shape)}, "
                                        f"{MANIFEST_NAME} says {info.get('dtype')} {info.get('shape')}")
            if check:
                crc = crc32c_hex(byte_view(tensor))
                if crc != info.get("crc32c"):
                    raise CheckpointInvalid(f"{path}: tensor {full} has crc32c {crc}, {MANIFEST_NAME} says "
                                            f"{info.get('crc32c')}; the shard is corrupt (prepare it again)")
            out[name] = tensor if torch.device(device).type == "cpu" else tensor.to(device)
        return out

    def close(self) -> None:
        """Drops the shards' handles; tensors already returned keep their mapping and stay valid (as long as
        nobody truncates the file under them: a mapped page that is gone is a SIGBUS)."""
        self._closed = True
        self._files.clear()
        self._opened.close()

    def __enter__(self) -> PreparedFolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
