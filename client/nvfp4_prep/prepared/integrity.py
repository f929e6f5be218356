"""verify without a source: is a prepared folder exactly what its manifest says, byte for byte?

A loader with no access to the source checkpoint can still trust a folder this passes: every shard the
manifest lists is there with the recorded size; its header is the canonical one ``prepare`` writes,
listing exactly the manifest's tensors with their dtypes and shapes, laid end to end, and its metadata
carries the manifest's layout record; every tensor's CRC32C is the manifest's; the index maps every tensor
to the manifest's shard; config.json carries the guard and marker the layout record implies; and no weight
file the manifest does not list (nor ModelOpt's ``hf_quant_config.json`` under its own name) sits beside
them. Size, canonical header and per-tensor CRC32C together catch any single changed byte of a shard.
What it cannot catch is a manifest rewritten to match altered shards: ``verify --against`` compares with
the source for that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nvfp4_prep.checkpoint.checkpoint import INDEX_NAME, WEIGHT_SUFFIXES
from nvfp4_prep.checkpoint.errors import CheckpointError, CheckpointInvalid
from nvfp4_prep.checkpoint.safetensors_file import SafetensorsFile, expected_nbytes

from .checksum import crc32c_hex
from .manifest import LAYOUT_METADATA_KEY, MANIFEST_NAME, Manifest
from .prepared_config import RENAMED_FILES
from .reader import rank_folders
from .verify import Difference, _check_config_marker


def _canonical_header(path: Path) -> bool:
    """True when the header is compact JSON padded with spaces to 8 bytes, as ``write_safetensors`` writes it."""
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        raw = handle.read(length)
    text = json.dumps(json.loads(raw), separators=(",", ":")).encode("utf-8")
    return raw == text + b" " * (-len(text) % 8)


def _check_header(shard: SafetensorsFile, filename: str, listed: dict, record: dict) -> list[Difference]:
    diffs = []
    want_metadata = {"format": "pt", LAYOUT_METADATA_KEY: json.dumps(record, sort_keys=True)}
    if shard.metadata != want_metadata:
        have = shard.metadata.get(LAYOUT_METADATA_KEY)
        diffs.append(Difference(filename, f"metadata {LAYOUT_METADATA_KEY} {have}, expected the layout record in "
                                          f"{MANIFEST_NAME}: {want_metadata[LAYOUT_METADATA_KEY]}"
                                if have != want_metadata[LAYOUT_METADATA_KEY] else
                                f"metadata {shard.metadata}, expected {want_metadata}"))
    for name in sorted(set(shard.entries) - set(listed)):
        diffs.append(Difference(name, f"in {filename} but not listed there by {MANIFEST_NAME}"))
    for name in sorted(set(listed) - set(shard.entries)):
        diffs.append(Difference(name, f"listed in {MANIFEST_NAME} under {filename} but not in its header"))
    entries = sorted(shard.entries.values(), key=lambda entry: entry.start)
    at = entries[0].start if entries else shard.size
    for entry in entries:
        if entry.start != at:
            diffs.append(Difference(entry.name, f"starts at byte {entry.start} of {filename}, expected {at} "
                                                "(tensors laid end to end)"))
        at = entry.end
    if at != shard.size:
        diffs.append(Difference(filename, f"tensor data ends at byte {at}, the file at {shard.size}"))
    if not diffs and not _canonical_header(shard.path):
        diffs.append(Difference(filename, "header is not the canonical JSON prepare writes (edited?)"))
    return diffs


def _check_tensors(shard: SafetensorsFile, listed: dict) -> list[Difference]:
    diffs = []
    for name, info in sorted(listed.items()):
        entry = shard.entries.get(name)
        if entry is None:
            continue  # reported by _check_header
        if [entry.dtype, list(entry.shape)] != [info.get("dtype"), info.get("shape")]:
            diffs.append(Difference(name, f"{entry.dtype} {list(entry.shape)}, {MANIFEST_NAME} says "
                                          f"{info.get('dtype')} {info.get('shape')}"))
            continue
        crc = crc32c_hex(shard.raw(name))
        if crc != info.get("crc32c"):
            diffs.append(Difference(name, f"crc32c {crc}, {MANIFEST_NAME} says {info.get('crc32c')}"))
    return diffs


def _check_shard(out_dir: Path, filename: str, entry: dict, manifest: Manifest) -> list[Difference]:
    path = out_dir / filename
    if Path(filename).name != filename or not path.is_file():
        return [Difference(filename, f"listed in {MANIFEST_NAME} but missing from {out_dir}")]
    size = path.stat().st_size
    if size != entry.get("size"):
        return [Difference(filename, f"{size} bytes, {MANIFEST_NAME} says {entry.get('size')}")]
    layer = entry.get("layer")
    if layer is not None and layer not in manifest.layers:
        return [Difference(filename, f"holds layer {layer!r}, which {MANIFEST_NAME} layout.layers does not list")]
    try:
        shard = SafetensorsFile(path)
    except CheckpointError as exc:
        return [Difference(filename, str(exc))]
    try:
        record = manifest.layout_record([layer] if layer is not None else [])
        diffs = _check_header(shard, filename, entry["tensors"], record)
        return diffs + _check_tensors(shard, entry["tensors"])
    except CheckpointError as exc:
        return [Difference(filename, str(exc))]
    finally:
        shard.close()


def _check_index(out_dir: Path, manifest: Manifest) -> list[Difference]:
    """The index loaders read must map every tensor to the manifest's shard, and add up its bytes."""
    path = out_dir / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [Difference(INDEX_NAME, f"missing from {out_dir}; loaders read it to find each tensor")]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [Difference(INDEX_NAME, f"not valid JSON ({exc})")]
    want = {name: filename for filename, entry in manifest.shards.items() for name in entry["tensors"]}
    have = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(have, dict):
        return [Difference(INDEX_NAME, "has no weight_map object")]
    diffs = [Difference(name, f"{INDEX_NAME} puts it in {have.get(name)}, {MANIFEST_NAME} in {want.get(name)}")
             for name in sorted(set(want) | set(have)) if have.get(name) != want.get(name)]
    total = sum(expected_nbytes(info["dtype"], tuple(info["shape"])) or 0
                for entry in manifest.shards.values() for info in entry["tensors"].values())
    metadata = index.get("metadata")
    if not isinstance(metadata, dict) or metadata.get("total_size") != total:
        found = metadata.get("total_size") if isinstance(metadata, dict) else None
        diffs.append(Difference(INDEX_NAME, f"metadata.total_size {found}, the manifest's tensors add up to {total}"))
    return diffs


def _check_stray_files(out_dir: Path, manifest: Manifest) -> list[Difference]:
    diffs = []
    for path in sorted(out_dir.iterdir()):
        if path.name.endswith(WEIGHT_SUFFIXES) and path.name not in manifest.shards:
            diffs.append(Difference(path.name, f"weight file not listed in {MANIFEST_NAME}; a loader would read it"))
        elif path.name.endswith(".index.json") and path.name != INDEX_NAME:
            diffs.append(Difference(path.name, f"index not written by prepare (only {INDEX_NAME} is)"))
        elif path.name in RENAMED_FILES:
            diffs.append(Difference(path.name, f"present under its source name: stock loaders would read the folder "
                                               f"as its source; prepare keeps it as {RENAMED_FILES[path.name]}"))
    return diffs


def verify_integrity(out_dir: str | os.PathLike) -> list[Difference]:
    """Every way the prepared folder (or each folder of a rank set) differs from its manifest; empty when none."""
    out_dir = Path(out_dir)
    try:
        manifest = Manifest.load(out_dir)
        ranks = rank_folders(out_dir) if manifest is None else []
    except CheckpointInvalid as exc:
        return [Difference(MANIFEST_NAME, str(exc))]
    if ranks:
        return [Difference(f"{folder.name}/{diff.tensor}", diff.problem)
                for folder in ranks for diff in verify_integrity(folder)]
    if manifest is None:
        return [Difference(MANIFEST_NAME, f"missing from {out_dir}; expected the manifest written by prepare")]
    diffs = _check_config_marker(out_dir, manifest)
    if not manifest.complete:
        diffs.append(Difference(MANIFEST_NAME, "the prepare run that wrote it did not finish"))
    sharded = {entry.get("layer") for entry in manifest.shards.values()}
    diffs += [Difference(prefix, f"has a layout record in {MANIFEST_NAME} but no shard")
              for prefix in sorted(manifest.layers) if prefix not in sharded]
    for filename, entry in sorted(manifest.shards.items()):
        diffs += _check_shard(out_dir, filename, entry, manifest)
    diffs += _check_index(out_dir, manifest)
    diffs += _check_stray_files(out_dir, manifest)
    return diffs
