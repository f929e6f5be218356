"""Writes a prepared checkpoint directory, layer by layer, resumably.

Layout of the output: ``model-NNNNN-of-MMMMM.safetensors`` shards (see
``shard_plan``), ``model.safetensors.index.json``, the source's config, tokenizer
and other small files (config.json guarded and marked by ``prepared_config``), and
``nvfp4_prep_manifest.json``. Every file is written under a temporary name and
renamed when complete; the index is removed when a run starts and written only
once every shard is done, so an interrupted run never looks like a finished
checkpoint. On a rerun with the same source and options, shards the manifest
lists and whose bytes still match their checksums are kept; everything else is
written again. Resuming deletes and overwrites files, so a directory is only
written into when it is empty (or missing) or holds our manifest: ``--out``
naming another model's directory is refused, never cleaned.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from nvfp4_prep.checkpoint.checkpoint import INDEX_NAME, Checkpoint
from nvfp4_prep.checkpoint.errors import CheckpointError, CheckpointInvalid
from nvfp4_prep.checkpoint.safetensors_file import SafetensorsFile, expected_nbytes
from nvfp4_prep.contract.dtypes import dtype_by_torch
from nvfp4_prep.contract.tensor_bytes import byte_view

from .atomic_file import PartialFile, partial_path, remove_partials, write_bytes_atomic
from .checksum import crc32c_hex
from .manifest import LAYOUT_METADATA_KEY, MANIFEST_NAME, Manifest, split_layout
from .prepared_config import HF_QUANT_CONFIG_NAME, prepared_config_bytes, prepared_file_name
from .safetensors_writer import OutputTensor, StagedFile, stage_safetensors, write_staged
from .shard_plan import DEFAULT_MAX_SHARD_BYTES, PlannedShard, plan_shards

log = logging.getLogger(__name__)

_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def source_record(checkpoint: Checkpoint) -> dict:
    """What a manifest (or a rank set's file) records of the source: path, format and file identity."""
    return {"path": str(checkpoint.directory), "format": checkpoint.format,
            "identity": checkpoint.source_identity()}


@dataclass(frozen=True)
class StagedShard:
    """A shard checked, its carried tensors read, its header built and its bytes checksummed: ready to write."""

    shard: PlannedShard
    layer_sizes: dict | None  # the layer's own layout fields (padded and unpadded sizes); None without a layer
    file: StagedFile


@dataclass(frozen=True)
class WrittenShard:
    """A shard's bytes in its partial file, not yet durable nor in the manifest; holds no tensor."""

    shard: PlannedShard
    layer_sizes: dict | None
    file: PartialFile
    entry: dict  # what the manifest lists for it


def prepared_tensor_names() -> tuple[str, ...]:
    from nvfp4_prep.contract.layout import PREPARED_NAMES

    return PREPARED_NAMES


class PreparedCheckpointWriter:
    """Owns an output directory for one run (an exclusive flock on it); use as a context manager."""

    def __init__(self, checkpoint: Checkpoint, out_dir: str | os.PathLike, backend: str,
                 activation: str = "swiglu", input_scale_policy: str = "max",
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                 options: dict | None = None) -> None:
        self.checkpoint = checkpoint
        self._overwrite = overwrite
        self.out_dir = Path(out_dir).absolute()
        if os.path.realpath(self.out_dir) == os.path.realpath(checkpoint.directory):
            raise CheckpointInvalid(
                f"output directory {self.out_dir} is the source checkpoint; expected another directory")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.out_dir, os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise CheckpointError(f"{self.out_dir} is being written by another prepare run") from None
        try:
            self._mutex = threading.Lock()
            self.plan = plan_shards(checkpoint, max_shard_bytes)
            self._layer_shard = {shard.layer: shard for shard in self.plan if shard.layer is not None}
            self._request = {"backend": backend, "activation": activation, "input_scale_policy": input_scale_policy,
                             **(options or {})}
            self.manifest = self._resumed_manifest()
        except BaseException:
            self.close()
            raise

    # -- resuming ---------------------------------------------------------------------------

    def _previous_manifest(self) -> Manifest | None:
        """Our earlier manifest in the output directory; refuses a directory it does not mark as ours.

        Resuming unlinks shards, the index and partial files and overwrites config.json, so a
        non-empty directory without a readable manifest of ours (another model, say) is left alone.
        """
        try:
            previous = Manifest.load(self.out_dir)
        except CheckpointInvalid as exc:
            raise CheckpointInvalid(
                f"output directory {self.out_dir} holds a {MANIFEST_NAME} that is not a prepare run's ({exc}); "
                "expected an empty directory or one written by nvfp4-prep prepare") from None
        if previous is not None:
            return previous
        # A run killed while saving its first manifest leaves only that manifest's partial file.
        first_save = partial_path(self.out_dir / MANIFEST_NAME).name
        present = sorted(path.name for path in self.out_dir.iterdir() if path.name != first_save)
        if present:
            shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
            raise CheckpointInvalid(
                f"output directory {self.out_dir} is not empty ({shown}) and has no {MANIFEST_NAME}; expected an "
                "empty or missing directory, or one written by nvfp4-prep prepare (refusing to delete files in it)")
        return None

    def _resumed_manifest(self) -> Manifest:
        previous = self._previous_manifest()
        for path in remove_partials(self.out_dir):
            log.info("removed %s left by an interrupted run", path.name)
        source = self._request_source()
        fresh = Manifest(source, dict(self._request))
        if previous is not None and (previous.source, previous.request) == (source, self._request):
            fresh.layout = previous.layout
            for shard in self.plan:
                entry = previous.shards.get(shard.filename)
                if entry is not None and self._intact(shard, entry, previous):
                    fresh.shards[shard.filename] = entry
                    if shard.layer is not None:
                        fresh.layers[shard.layer] = previous.layers[shard.layer]
        elif previous is not None:
            self._replace(previous)
        if not fresh.layers:  # shards kept without any layer would carry a stale layout record
            fresh.layout, fresh.shards = {}, {}
        for path in self.out_dir.iterdir():
            if _SHARD_NAME.match(path.name) and path.name not in fresh.shards:
                path.unlink()
        (self.out_dir / INDEX_NAME).unlink(missing_ok=True)
        if fresh.shards:
            log.info("resuming: %d of %d shards already written and verified", len(fresh.shards), len(self.plan))
        fresh.save(self.out_dir)
        return fresh

    def _replace(self, previous: Manifest) -> None:
        """Empties a folder prepared from another source or with other options, once the caller said so.

        Without ``overwrite`` it is refused: replacing it silently would lose a good prepared checkpoint,
        and keeping its small files (tokenizer, recipe) would mix two models in one folder. The folder is
        ours (it holds our manifest), so every file at its top level goes; folders inside are left alone.
        """
        if not self._overwrite:
            what = "another source" if previous.source != self._request_source() else "other options"
            raise CheckpointInvalid(
                f"output directory {self.out_dir} holds a prepared checkpoint made from {what} "
                f"(source {previous.source.get('path')!r}, options {previous.request}); pass --overwrite to "
                "replace it, or choose another --out")
        log.info("%s was prepared from another source or with other options; replacing it", self.out_dir)
        for path in self.out_dir.iterdir():
            if path.is_file() or path.is_symlink():
                path.unlink()

    def _request_source(self) -> dict:
        return source_record(self.checkpoint)

    def _intact(self, shard: PlannedShard, entry: dict, previous: Manifest) -> bool:
        """True when a shard from an earlier run holds what the plan wants, byte for byte."""
        if entry.get("layer") != shard.layer or entry.get("other_tensors") != list(shard.other_tensors):
            return False
        if shard.layer is not None and shard.layer not in previous.layers:
            return False
        path = self.out_dir / shard.filename
        try:
            written = SafetensorsFile(path)
            if written.size != entry.get("size") or set(written.entries) != set(entry["tensors"]):
                return False
            for name, expected in entry["tensors"].items():
                got = written.entries[name]
                if [got.dtype, list(got.shape)] != [expected.get("dtype"), expected.get("shape")]:
                    return False
                if crc32c_hex(written.raw(name)) != expected.get("crc32c"):
                    log.warning("%s: %s does not match its checksum; writing the shard again", shard.filename, name)
                    return False
        except CheckpointError:
            return False
        return True

    def pending_layers(self) -> list[str]:
        """MoE layers whose shard still has to be written, in layer order."""
        return [shard.layer for shard in self.plan
                if shard.layer is not None and shard.filename not in self.manifest.shards]

    # -- writing ----------------------------------------------------------------------------
    #
    # A shard goes to disk in three steps, each of which may run on its own thread: ``stage_layer`` (or
    # ``stage_carried``) checks it, reads the tensors it carries over and builds and checksums the file;
    # ``write`` puts its bytes in a partial file; ``commit`` makes them durable under the shard's name and only
    # then lists the shard in the manifest, so the manifest never claims more than is on disk.

    def pending_carried(self) -> list[PlannedShard]:
        """The shards of tensors outside every MoE layer that still have to be written, in plan order."""
        return [shard for shard in self.plan if shard.layer is None and shard.filename not in self.manifest.shards]

    def _carried(self, names: tuple[str, ...]) -> list[OutputTensor]:
        out = []
        for name in names:
            entry = self.checkpoint.entry(name)
            out.append(OutputTensor(name, entry.dtype, entry.shape, self.checkpoint.read_raw(name)))
        return out

    def _accept_layout(self, prefix: str, layout: dict) -> dict:
        shared, own = split_layout(layout)
        for key, wanted in self._request.items():
            if shared.get(key) != wanted:
                raise CheckpointInvalid(
                    f"{prefix}: the preparer returned layout {key} {shared.get(key)!r}, expected {wanted!r}")
        with self._mutex:
            if not self.manifest.layout:
                self.manifest.layout = shared
            elif shared != self.manifest.layout:
                raise CheckpointInvalid(
                    f"{prefix}: layout {shared} differs from the layers already in {self.out_dir} "
                    f"({self.manifest.layout}); prepare into an empty directory")
        return own

    def _staged(self, shard: PlannedShard, tensors: list[OutputTensor], layer_sizes: dict | None) -> StagedShard:
        layers = {shard.layer: layer_sizes} if shard.layer is not None else {}
        record = {**self.manifest.layout, "layers": layers}
        metadata = {"format": "pt", LAYOUT_METADATA_KEY: json.dumps(record, sort_keys=True)}
        return StagedShard(shard, layer_sizes, stage_safetensors(tensors, metadata))

    def stage_layer(self, prefix: str, prepared: object) -> StagedShard:
        """The shard of one MoE layer from its prepared form (``.tensors``, ``.layout``), ready to ``write``."""
        shard = self._layer_shard.get(prefix)
        if shard is None:
            raise CheckpointInvalid(f"{prefix}: not a MoE layer of {self.checkpoint.directory}")
        tensors: dict[str, torch.Tensor] = dict(prepared.tensors)
        expected = prepared_tensor_names()
        if set(tensors) != set(expected):
            raise CheckpointInvalid(
                f"{prefix}: prepared tensors {sorted(tensors)}, expected exactly {sorted(expected)}")
        sizes = self._accept_layout(prefix, dict(prepared.layout))
        outputs = []
        for name in expected:
            tensor = tensors[name]
            dtype = dtype_by_torch(tensor.dtype)
            if dtype is None:
                raise CheckpointInvalid(f"{prefix}.{name}: dtype {tensor.dtype} cannot be stored in safetensors")
            outputs.append(OutputTensor(f"{prefix}.{name}", dtype.safetensors, tuple(tensor.shape), byte_view(tensor)))
        return self._staged(shard, outputs + self._carried(shard.other_tensors), sizes)

    def stage_carried(self, shard: PlannedShard) -> StagedShard:
        """A shard of tensors outside every MoE layer (see ``pending_carried``), read and ready to ``write``.
        Staged once the layers are, as their shared layout record goes into its metadata."""
        return self._staged(shard, self._carried(shard.other_tensors), None)

    def write(self, staged: StagedShard) -> WrittenShard:
        """Writes a staged shard's bytes to its partial file (not durable yet: ``commit``); on an error the
        partial file is removed."""
        file = PartialFile(self.out_dir / staged.shard.filename)
        try:
            write_staged(file, staged.file)
        except BaseException:
            file.discard()
            raise
        entry = {"layer": staged.shard.layer, "other_tensors": list(staged.shard.other_tensors),
                 "size": staged.file.size,
                 "tensors": {name: info.as_json() for name, info in sorted(staged.file.records.items())}}
        return WrittenShard(staged.shard, staged.layer_sizes, file, entry)

    def commit(self, written: WrittenShard) -> None:
        """Makes a written shard durable under its name, then lists it in the manifest (saved)."""
        written.file.commit()
        with self._mutex:
            if written.shard.layer is not None:
                self.manifest.layers[written.shard.layer] = written.layer_sizes
            self.manifest.shards[written.shard.filename] = written.entry
            self.manifest.save(self.out_dir)

    def finish(self) -> None:
        """Writes the index and the small files once every shard is; marks the manifest complete."""
        missing = self.pending_layers()
        if missing:
            raise CheckpointInvalid(f"cannot finish {self.out_dir}: layers {missing} are not written")
        unwritten = [shard.filename for shard in self.pending_carried()]
        if unwritten:
            raise CheckpointInvalid(f"cannot finish {self.out_dir}: shards {unwritten} are not written")
        self._copy_small_files()
        weight_map, total = {}, 0
        for filename, entry in self.manifest.shards.items():
            for name, info in entry["tensors"].items():
                weight_map[name] = filename
                total += expected_nbytes(info["dtype"], tuple(info["shape"]))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_bytes_atomic(self.out_dir / INDEX_NAME, json.dumps(index, indent=2).encode("utf-8"))
        self.manifest.complete = True
        self.manifest.save(self.out_dir)
        log.info("wrote prepared checkpoint %s (%d shards)", self.out_dir, len(self.plan))

    def _copy_small_files(self) -> None:
        files = {source.name: source for source in self.checkpoint.auxiliary_files()}
        for source in files.values():
            if source.name == MANIFEST_NAME:
                continue
            data = source.read_bytes()
            if source.name == "config.json":
                hf_quant = files.get(HF_QUANT_CONFIG_NAME)
                data = prepared_config_bytes(data, self.manifest.layout,
                                             hf_quant.read_bytes() if hf_quant is not None else None)
            write_bytes_atomic(self.out_dir / prepared_file_name(source.name), data)  # hf_quant_config renamed

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> PreparedCheckpointWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
