"""``Checkpoint.source_identity``, the reference cache's key: any replacement of a file it reads changes it.

``cp -p`` and ``rsync -t`` keep a replaced shard's size and mtime; the identity also holds the inode
and ctime (taken from the open descriptors), and the config and index files that decide how the
shards read.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nvfp4_prep.checkpoint import open_checkpoint
from tests.helpers.checkpoint_factory import moe_layer_tensors, sharded_copy, write_checkpoint

PREFIX = "model.layers.0.mlp.experts"


def identity(ckpt: Path, prefix: str | None = PREFIX) -> str:
    with open_checkpoint(ckpt) as checkpoint:
        return checkpoint.source_identity(prefix)


def _other_bytes_same_size(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[-1] ^= 0xFF  # the last byte of the last tensor
    return bytes(changed)


def _after_a_clock_tick() -> None:
    """Lets the file-system clock (updated once a jiffy, a few ms) move past the files just written."""
    time.sleep(0.05)


def test_shard_rewritten_in_place_with_its_old_size_and_mtime_changes_the_identity(tmp_path: Path) -> None:
    """As ``cp -p new old``: the same inode rewritten, then its mtime set back."""
    ckpt = write_checkpoint(tmp_path / "ckpt", moe_layer_tensors(0, 2, 64, 64))
    shard = ckpt / "model.safetensors"
    before, stat = identity(ckpt), shard.stat()
    _after_a_clock_tick()
    with open(shard, "r+b") as handle:
        handle.write(_other_bytes_same_size(shard.read_bytes()))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    assert identity(ckpt) != before


def test_shard_replaced_by_rename_with_its_old_size_and_mtime_changes_the_identity(tmp_path: Path) -> None:
    """As ``rsync -t``: a new file renamed over the old one, its mtime set to the old one's."""
    ckpt = sharded_copy(write_checkpoint(tmp_path / "single", moe_layer_tensors(0, 2, 64, 64)), tmp_path / "ckpt", 2)
    shard = ckpt / "model-00001-of-00002.safetensors"
    before, stat = identity(ckpt), shard.stat()
    fresh = ckpt / ".model-00001-of-00002.safetensors.tmp"
    fresh.write_bytes(_other_bytes_same_size(shard.read_bytes()))
    os.utime(fresh, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(fresh, shard)
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert identity(ckpt) != before


def test_config_change_changes_the_identity_and_an_untouched_checkpoint_keeps_it(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", moe_layer_tensors(0, 2, 64, 64))
    before = identity(ckpt)
    assert identity(ckpt) == before  # reopening alone changes nothing
    config = ckpt / "config.json"
    value = json.loads(config.read_text())
    value["quantization_config"]["ignore"] = ["lm_head"]
    _after_a_clock_tick()
    config.write_text(json.dumps(value))
    assert identity(ckpt) != before
    assert "config.json" in identity(ckpt, None) and "model.safetensors" in identity(ckpt, None)
