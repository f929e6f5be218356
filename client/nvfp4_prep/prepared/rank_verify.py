"""verify of rank folders: each rank's bytes against preparing that shard of the source, and the set as a whole.

A rank's prepared tensors are not a slice of the whole layer's (SPEC section 11), so a rank folder's layers
are compared with ``pipeline.prepare(source layer, shard)`` byte for byte, and its layout record with the
one that call returns. For a set (``nvfp4_prep_ranks.json``), every rank folder is verified that way (with
all of ``verify_prepared``'s folder checks), missing and extra rank folders are named, and then every source
layer must come back from the ranks together: each rank's shard unprepared, ``merge_shards``, compared with
the source's weights, block scales and global weight scales.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from nvfp4_prep.checkpoint.checkpoint import Checkpoint, open_checkpoint
from nvfp4_prep.checkpoint.errors import CheckpointError, CheckpointInvalid

from .manifest import MANIFEST_NAME, Manifest
from .output_checkpoint import open_output
from .rank_set import RANKS_NAME, Rank, RankSet
from .verify import Difference, _byte_difference, verify_prepared

# Compared after merging: what unprepare gives back as the source had it (input scales are reduced per
# layer, and are checked per rank against preparing the shard).
_MERGED_EXACT = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")


def is_shard_layout(layout: dict) -> bool:
    """True for the record of a rank shard (tp_size or ep_size above 1)."""
    return (layout.get("tp_size") or 1) > 1 or (layout.get("ep_size") or 1) > 1


def _shard_words(layout: dict) -> str:
    return (f"tp_rank {layout.get('tp_rank')} of {layout.get('tp_size')}, ep_rank {layout.get('ep_rank')} of "
            f"{layout.get('ep_size')} ({layout.get('expert_placement')})")


def check_rank_layer(prefix: str, prepared: Checkpoint, source: Checkpoint, layout: dict) -> list[Difference]:
    """One layer of a rank folder against preparing the shard its layout record names from the source."""
    from nvfp4_prep.contract.layout import PREPARED_NAMES
    from nvfp4_prep.pipeline import PrepError, prepare
    from nvfp4_prep.pipeline.unprepare import layout_options

    try:
        options = layout_options(layout)
        src = source.read_layer(prefix, activation=layout["activation"])
        want = prepare(src, layout["backend"], layout["activation"], layout["input_scale_policy"], **options)
    except PrepError as exc:
        return [Difference(f"{prefix}.{exc.field}", f"the source cannot be prepared as {_shard_words(layout)}: "
                                                    f"{exc}")]
    diffs = [Difference(prefix, f"layout record {key} is {layout.get(key)!r}; preparing {_shard_words(layout)} "
                                f"of the source gives {value!r}")
             for key, value in want.layout.items() if layout.get(key) != value]
    for name in PREPARED_NAMES:
        problem = _byte_difference(prepared.read_tensor(f"{prefix}.{name}"), want.tensors[name])
        if problem:
            diffs.append(Difference(f"{prefix}.{name}", f"against preparing {_shard_words(layout)}: {problem}"))
    return diffs


def _expected_folders(out_dir: Path, rank_set: RankSet) -> tuple[list[Rank], list[Difference]]:
    """The set's rank folders that exist, and a difference for each missing or extra entry of ``out_dir``."""
    diffs, present = [], []
    for rank in rank_set.ranks:
        if (out_dir / rank.folder).is_dir():
            present.append(rank)
        else:
            diffs.append(Difference(rank.folder, f"rank folder missing (tp_rank {rank.tp_rank} of "
                                                 f"{rank_set.tp_size}, ep_rank {rank.ep_rank} of {rank_set.ep_size})"))
    names = {RANKS_NAME, *(rank.folder for rank in rank_set.ranks)}
    for path in sorted(out_dir.iterdir()):
        if path.name not in names:
            what = "a folder that is not a rank" if path.is_dir() else "a file"
            diffs.append(Difference(path.name, f"{what} of this {rank_set.tp_size} x {rank_set.ep_size} set; not "
                                               f"accounted for by {RANKS_NAME}"))
    return present, diffs


def _rank_record_differences(rank: Rank, rank_set: RankSet, manifest: Manifest) -> list[Difference]:
    """A rank folder's manifest must ask for what the ranks file says, and for the shard its name says."""
    want = {**rank_set.request, **rank.shard_options(rank_set.tp_size, rank_set.ep_size, rank_set.expert_placement)}
    where = f"{rank.folder}/{MANIFEST_NAME}"
    return [Difference(where, f"request {key} is {manifest.request.get(key)!r}; {RANKS_NAME} and the folder name "
                              f"give {value!r}")
            for key, value in want.items() if manifest.request.get(key) != value]


def _merged_differences(prefix: str, folders: list[tuple[Rank, Manifest, Checkpoint]],
                        source: Checkpoint) -> list[Difference]:
    """The layer put back together from every rank's shard, against the source's bytes."""
    from nvfp4_prep.contract.layout import PREPARED_NAMES
    from nvfp4_prep.pipeline import PrepError, merge_shards, unprepare

    parts = []
    for rank, manifest, prepared in folders:
        layout = manifest.layer_layout(prefix)
        try:
            tensors = {name: prepared.read_tensor(f"{prefix}.{name}") for name in PREPARED_NAMES}
            parts.append((unprepare(tensors, layout), layout))
        except (PrepError, CheckpointError) as exc:
            return [Difference(f"{rank.folder}/{prefix}", f"cannot be unprepared to merge the ranks: {exc}")]
    try:
        merged = merge_shards(parts)
    except PrepError as exc:
        return [Difference(prefix, f"the rank folders do not merge into the layer: {exc}")]
    src = source.read_layer(prefix, activation=parts[0][1]["activation"])
    names = list(_MERGED_EXACT)
    if parts[0][1].get("profile") != "vllm-0.33":  # fused there: compared per rank against prepare instead
        names += ["w13_weight_scale_2", "w2_weight_scale_2"]
    diffs = []
    for name in names:
        want = src[name]
        if name == "w13_weight_scale_2" and want.dim() == 2:
            want = want[:, 0]  # gate's global scale (SPEC section 2)
        problem = _byte_difference(merged[name], want.contiguous())
        if problem:
            diffs.append(Difference(f"{prefix}.{name}", f"the rank folders merged: {problem}"))
    return diffs


def verify_rank_set(out_dir: str | os.PathLike, against: str | os.PathLike | Checkpoint) -> list[Difference]:
    """Every difference between the rank set ``out_dir`` and its source; empty when every rank is exact."""
    out_dir = Path(out_dir)
    try:
        rank_set = RankSet.load(out_dir)
    except CheckpointInvalid as exc:
        return [Difference(RANKS_NAME, str(exc))]
    if rank_set is None:
        return [Difference(RANKS_NAME, f"missing from {out_dir}; expected the rank list written by prepare")]
    diffs = [] if rank_set.complete else [Difference(RANKS_NAME, "the prepare run that wrote it did not finish")]
    present, missing = _expected_folders(out_dir, rank_set)
    diffs += missing
    with contextlib.ExitStack() as opened:
        source = against if isinstance(against, Checkpoint) else opened.enter_context(open_checkpoint(against))
        mergeable = not missing
        folders = []
        for rank in present:
            folder = out_dir / rank.folder
            found = verify_prepared(folder, source)
            diffs += [Difference(f"{rank.folder}/{d.tensor}", d.problem) for d in found]
            try:
                manifest = Manifest.load(folder)
                prepared = opened.enter_context(open_output(folder, source.format))
            except CheckpointError:
                mergeable = False  # reported by verify_prepared above
                continue
            if manifest is None:
                mergeable = False
                continue
            mismatch = _rank_record_differences(rank, rank_set, manifest)
            diffs += mismatch
            mergeable = mergeable and not mismatch
            folders.append((rank, manifest, prepared))
        for prefix in source.moe_layers():
            if not mergeable or any(prefix not in manifest.layers for _, manifest, _ in folders):
                diffs.append(Difference(prefix, "not checked against the source as a whole: a rank folder is "
                                                f"missing or has no record of the layer in {MANIFEST_NAME}"))
                continue
            diffs += _merged_differences(prefix, folders, source)
    return diffs
