"""verify: a prepared checkpoint checked against its source, tensor by tensor.

Each prepared layer is unprepared with its stored layout and compared with the
source's stacked form byte for byte (weights, block scales, global weight
scales); input scales and derived scalars are compared with an independent
formulation of SPEC sections 4 and 6 applied to the source (``reference_scales``);
every other tensor must equal the source's bytes; every tensor must match its
manifest checksum; the shard metadata must carry the manifest's layout record.
Checked first, because it is what loaders read: the ``"nvfp4_prep"`` marker in
config.json must be exactly the one ``prepared_config`` derives from the
manifest's layout record (each differing field is reported on its own), and its
quantization config the guard that record implies, carrying the source's. The
directory must hold nothing the manifest does not account for: its shards, the
manifest, the index and the source's config, tokenizer and other small files.

What this proves, and what it does not: a clean verify shows that the output is
exactly the prepared form of *this* source that inverts back to it, so it catches
corruption, truncation, a wrong source and layers mixed from different runs. It
does not show that the layout itself is the one the kernels expect: ``unprepare``
inverts the same index maps ``prepare`` used, so a wrong map would round-trip
cleanly. The layout's correctness is established by the test suite, which checks
``prepare`` against independent formulations of the SPEC.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nvfp4_prep.checkpoint.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from nvfp4_prep.checkpoint.errors import CheckpointError, CheckpointInvalid
from nvfp4_prep.checkpoint.reference_scales import PolicyViolation, expected_derived, expected_input_scales

from .checksum import crc32c_hex
from .manifest import LAYOUT_METADATA_KEY, MANIFEST_NAME, Manifest
from .output_checkpoint import open_output
from .prepared_config import (
    CONFIG_MARKER_KEY,
    HF_QUANT_CONFIG_NAME,
    ORIGINAL_HF_QUANT_KEY,
    ORIGINAL_QUANTIZATION_KEY,
    QUANTIZATION_KEY,
    layout_guard,
    marker,
    original_config,
    prepared_file_name,
)


@dataclass(frozen=True)
class Difference:
    """One way the prepared checkpoint differs from what its source says it must be."""

    tensor: str
    problem: str

    def __str__(self) -> str:
        return f"{self.tensor}: {self.problem}"


_BYTE_EXACT = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")


def _expected_dtype(name: str) -> str:
    if name.endswith("_weight"):
        return "U8"
    return "F8_E4M3" if name.endswith("_weight_scale") else "F32"


def _byte_difference(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None when equal in dtype, shape and bytes, else what differs."""
    if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
        return f"{got.dtype} {list(got.shape)}, expected {want.dtype} {list(want.shape)}"
    a = got.contiguous().reshape(-1).view(torch.uint8)
    b = want.contiguous().reshape(-1).view(torch.uint8)
    unequal = (a != b).nonzero()
    if unequal.numel():
        return f"{unequal.numel()} of {a.numel()} bytes differ from the source, the first at byte {int(unequal[0])}"
    return None


def _float_difference(got: torch.Tensor, want: np.ndarray) -> str | None:
    values = got.detach().cpu().to(torch.float32).reshape(-1).numpy()
    if values.shape != want.shape or not np.array_equal(values.view(np.uint32), want.view(np.uint32)):
        return f"{values.tolist()[:8]}, expected {want.tolist()[:8]} (float32, bit for bit)"
    return None


def _check_layer(prefix: str, prepared: Checkpoint, source: Checkpoint, manifest: Manifest) -> list[Difference]:
    from nvfp4_prep.contract.layout import GATED_ACTIVATIONS, PREPARED_NAMES
    from nvfp4_prep.pipeline import PrepError, unprepare

    if prefix not in manifest.layers:
        return [Difference(prefix, f"no layout record for this layer in {MANIFEST_NAME}")]
    layout = manifest.layer_layout(prefix)
    names = {name: f"{prefix}.{name}" for name in PREPARED_NAMES}
    present = set(prepared.tensor_names())
    if any(full not in present for full in names.values()):
        return []  # reported by the tensor-set check
    diffs = []
    for name, full in names.items():
        dtype = prepared.entry(full).dtype
        if dtype != _expected_dtype(name):
            diffs.append(Difference(full, f"dtype {dtype}, expected {_expected_dtype(name)} (SPEC section 7)"))
    if diffs:
        return diffs
    from .rank_verify import check_rank_layer, is_shard_layout

    if is_shard_layout(layout):  # a rank folder: its bytes are not a slice of the whole layer's (SPEC section 11)
        return check_rank_layer(prefix, prepared, source, layout)
    tensors = {name: prepared.read_tensor(full) for name, full in names.items()}
    try:
        back = unprepare(tensors, layout)
    except PrepError as exc:
        return [Difference(f"{prefix}.{exc.field}", f"cannot be unprepared: {exc}")]
    src = source.read_layer(prefix, activation=layout["activation"])

    for name in _BYTE_EXACT:
        problem = _byte_difference(back[name], src[name])
        if problem:
            diffs.append(Difference(names[name], problem))
    ws13 = src["w13_weight_scale_2"]
    ws13 = ws13[:, 0] if ws13.dim() == 2 else ws13
    fused = layout.get("profile") == "vllm-0.33"  # the weight scales end fused: checked as g1/g2_alphas below
    for name, want in (("w13_weight_scale_2", ws13), ("w2_weight_scale_2", src["w2_weight_scale_2"])):
        problem = None if fused else _byte_difference(back[name], want.contiguous())
        if problem:
            diffs.append(Difference(names[name], problem))

    try:
        a13p, a2p = expected_input_scales(src["w13_input_scale"].numpy(), src["w2_input_scale"].numpy(),
                                          layout["backend"], layout["input_scale_policy"])
    except PolicyViolation as exc:
        return [*diffs, Difference(f"{prefix}.{exc.tensor}", f"the source does not allow this layout: {exc}")]
    expected = {"w13_input_scale": a13p, "w2_input_scale": a2p}
    expected.update(expected_derived(ws13.numpy(), a13p, src["w2_weight_scale_2"].numpy(), a2p,
                                     layout["activation"] in GATED_ACTIVATIONS))
    if fused:
        expected["w13_weight_scale_2"], expected["w2_weight_scale_2"] = expected["g1_alphas"], expected["g2_alphas"]
    for name, want in expected.items():
        problem = _float_difference(tensors[name], want)
        if problem:
            diffs.append(Difference(names[name], problem))
    return diffs


def _check_tensor_set(prepared: Checkpoint, source: Checkpoint) -> list[Difference]:
    from nvfp4_prep.contract.layout import PREPARED_NAMES

    want = {f"{prefix}.{name}" for prefix in source.moe_layers() for name in PREPARED_NAMES}
    want.update(source.other_tensor_names())
    have = set(prepared.tensor_names())
    return ([Difference(name, "missing from the prepared checkpoint") for name in sorted(want - have)]
            + [Difference(name, "not expected in the prepared checkpoint") for name in sorted(have - want)])


def _check_carried(prepared: Checkpoint, source: Checkpoint) -> list[Difference]:
    diffs = []
    have = set(prepared.tensor_names())
    for name in source.other_tensor_names():
        if name not in have:
            continue
        got, want = prepared.entry(name), source.entry(name)
        if (got.dtype, got.shape) != (want.dtype, want.shape):
            diffs.append(Difference(name, f"{got.dtype} {list(got.shape)}, expected {want.dtype} {list(want.shape)}"))
            continue
        problem = _byte_difference(prepared.read_raw(name), source.read_raw(name))
        if problem:
            diffs.append(Difference(name, problem))
    return diffs


def _check_manifest(prepared: Checkpoint, manifest: Manifest) -> list[Difference]:
    diffs = []
    listed = {}
    present = set(prepared.tensor_names())
    for filename, shard in manifest.shards.items():
        for name, info in shard["tensors"].items():
            listed[name] = (filename, info)
    for name in sorted(present - set(listed)):
        diffs.append(Difference(name, f"not listed in {MANIFEST_NAME}"))
    for name, (filename, info) in sorted(listed.items()):
        if name not in present:
            diffs.append(Difference(name, f"listed in {MANIFEST_NAME} under {filename} but not in the checkpoint"))
            continue
        entry = prepared.entry(name)
        if [entry.dtype, list(entry.shape)] != [info.get("dtype"), info.get("shape")]:
            diffs.append(Difference(
                name, f"{entry.dtype} {list(entry.shape)}, manifest says {info.get('dtype')} {info.get('shape')}"))
            continue
        crc = crc32c_hex(prepared.read_raw(name))
        if crc != info.get("crc32c"):
            diffs.append(Difference(name, f"crc32c {crc}, manifest says {info.get('crc32c')}"))
    for shard in prepared.shard_files():
        planned = manifest.shards.get(shard.path.name)
        if planned is None:
            diffs.append(Difference(shard.path.name, f"shard not listed in {MANIFEST_NAME}"))
            continue
        want = manifest.layout_record([planned["layer"]] if planned.get("layer") else [])
        try:
            have = json.loads(shard.metadata.get(LAYOUT_METADATA_KEY, "null"))
        except json.JSONDecodeError:
            have = None
        if have != want:
            diffs.append(Difference(shard.path.name, f"metadata {LAYOUT_METADATA_KEY} {have}, expected {want}"))
    return diffs


def _json_text(value: object) -> str:
    """``value`` as JSON: equal texts are equal JSON values, so ``true`` differs from ``1`` and 128 from 128.0."""
    return json.dumps(value, sort_keys=True)


def _check_guard(out_dir: Path, have: object, manifest: Manifest) -> list[Difference]:
    """config.json's quantization config: the layout guard stock loaders refuse, carrying at most one of the
    source's quantization configs; ``hf_quant_config.json``'s as the renamed copy beside it holds it."""
    want = layout_guard(manifest.layout)
    originals = [key for key in (ORIGINAL_QUANTIZATION_KEY, ORIGINAL_HF_QUANT_KEY) if isinstance(have, dict)
                 and key in have]
    rest = {key: value for key, value in have.items() if key not in originals} if isinstance(have, dict) else have
    if _json_text(rest) != _json_text(want) or len(originals) > 1:
        return [Difference("config.json", f"{QUANTIZATION_KEY} is {_json_text(have)}; expected {_json_text(want)}, "
                                          f"which stock loaders refuse, with at most one of {ORIGINAL_QUANTIZATION_KEY}"
                                          f" and {ORIGINAL_HF_QUANT_KEY} (the source's)")]
    if originals != [ORIGINAL_HF_QUANT_KEY]:
        return []
    copy_path = out_dir / prepared_file_name(HF_QUANT_CONFIG_NAME)
    try:
        kept = json.loads(copy_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [Difference("config.json", f"{QUANTIZATION_KEY}.{ORIGINAL_HF_QUANT_KEY} is set but {copy_path.name} "
                                          f"cannot be read as JSON ({exc})")]
    if _json_text(kept) != _json_text(have[ORIGINAL_HF_QUANT_KEY]):
        return [Difference("config.json", f"{QUANTIZATION_KEY}.{ORIGINAL_HF_QUANT_KEY} differs from {copy_path.name}, "
                                          f"the source's {HF_QUANT_CONFIG_NAME}")]
    return []


def _check_config_marker(out_dir: Path, manifest: Manifest) -> list[Difference]:
    """config.json's layout marker, field by field, against the one the manifest's layout record implies."""
    path = out_dir / "config.json"
    if not path.is_file():
        return []  # a source without config.json gets none; one that had it: reported by _check_small_files
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [Difference(path.name, f"not valid JSON ({exc})")]
    have = config.get(CONFIG_MARKER_KEY) if isinstance(config, dict) else None
    if not isinstance(have, dict):
        return [Difference(path.name, f"has no {CONFIG_MARKER_KEY!r} marker of the prepared layout "
                                      f"(found {_json_text(have)})")]
    diffs = _check_guard(out_dir, config.get(QUANTIZATION_KEY), manifest)
    want = marker(manifest.layout)
    for key in [*want, *(key for key in have if key not in want)]:
        field_name = f"{CONFIG_MARKER_KEY}.{key}"
        if key not in have:
            diffs.append(Difference(path.name, f"{field_name} is missing; the layout record in {MANIFEST_NAME} "
                                               f"gives {_json_text(want[key])}"))
        elif key not in want:
            diffs.append(Difference(path.name, f"{field_name} is {_json_text(have[key])}, a field the prepared "
                                               "layout marker does not have"))
        elif _json_text(have[key]) != _json_text(want[key]):
            diffs.append(Difference(path.name, f"{field_name} is {_json_text(have[key])}; the layout record in "
                                               f"{MANIFEST_NAME} and the shards gives {_json_text(want[key])}"))
    return diffs


def _check_unaccounted(out_dir: Path, manifest: Manifest, source: Checkpoint) -> list[Difference]:
    """Entries of ``out_dir`` that are neither the manifest's shards, the manifest, the index nor a small file."""
    expected = {MANIFEST_NAME, INDEX_NAME, *manifest.shards,
                *(prepared_file_name(path.name) for path in source.auxiliary_files())}
    return [Difference(path.name, f"{'directory' if path.is_dir() else 'file'} in {out_dir} not accounted for "
                                  f"by {MANIFEST_NAME}")
            for path in sorted(out_dir.iterdir()) if path.name not in expected]


def _check_small_files(out_dir: Path, source: Checkpoint) -> list[Difference]:
    diffs = []
    for path in source.auxiliary_files():
        target = out_dir / prepared_file_name(path.name)
        if not target.is_file():
            diffs.append(Difference(path.name, "not copied from the source checkpoint"))
            continue
        if path.name == "config.json":
            try:
                config = json.loads(target.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                diffs.append(Difference(path.name, f"not valid JSON ({exc})"))
                continue
            source_config = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(config, dict) and isinstance(config.get(CONFIG_MARKER_KEY), dict):
                try:
                    config = original_config(config)  # the marker and guard themselves: _check_config_marker
                except CheckpointInvalid:  # no guard of ours to restore from (reported there): compare the rest
                    config = {key: value for key, value in config.items()
                              if key not in (CONFIG_MARKER_KEY, QUANTIZATION_KEY)}
                    source_config = {key: value for key, value in source_config.items() if key != QUANTIZATION_KEY}
            if config != source_config:
                diffs.append(Difference(path.name, "differs from the source's config.json beyond the marker"))
        elif target.read_bytes() != path.read_bytes():
            diffs.append(Difference(path.name, "differs from the source's copy"))
    return diffs


def verify_prepared(out_dir: str | os.PathLike, against: str | os.PathLike | Checkpoint) -> list[Difference]:
    """Every difference between the prepared checkpoint ``out_dir`` and its source; empty when it is exact."""
    out_dir = Path(out_dir)
    try:
        manifest = Manifest.load(out_dir)
    except CheckpointInvalid as exc:
        return [Difference(MANIFEST_NAME, str(exc))]
    if manifest is None:
        return [Difference(MANIFEST_NAME, f"missing from {out_dir}; expected the manifest written by prepare")]
    diffs = _check_config_marker(out_dir, manifest)  # first: it is what loaders read
    if not manifest.complete:
        diffs.append(Difference(MANIFEST_NAME, "the prepare run that wrote it did not finish"))
    with contextlib.ExitStack() as opened:  # a source passed in open stays open; those opened here are closed
        source = against if isinstance(against, Checkpoint) else opened.enter_context(open_checkpoint(against))
        try:
            prepared = opened.enter_context(open_output(out_dir, source.format))  # config.json names nvfp4_prep
        except CheckpointError as exc:
            return [*diffs, Difference(str(out_dir), str(exc))]
        diffs += _check_manifest(prepared, manifest)
        diffs += _check_tensor_set(prepared, source)
        for prefix in source.moe_layers():
            diffs += _check_layer(prefix, prepared, source, manifest)
        diffs += _check_carried(prepared, source)
        diffs += _check_small_files(out_dir, source)
        diffs += _check_unaccounted(out_dir, manifest, source)
    return diffs
