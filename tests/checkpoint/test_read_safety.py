"""Shards that shrink or change while a checkpoint is read: a clean CheckpointInvalid naming the file, never SIGBUS.

Tensor bytes used to be read through mmap, where a file truncated under the reader (``cp`` over a shard)
kills the whole process. These tests truncate and rewrite real files between the header and the data,
from another thread in the middle of a read, and under a running ``nvfp4-prep prepare`` process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nvfp4_prep.checkpoint import CheckpointInvalid, open_checkpoint
from nvfp4_prep.cli.checkpoint_commands import EXIT_ERROR
from nvfp4_prep.prepared.manifest import MANIFEST_NAME
from tests.helpers.checkpoint_factory import load_all, moe_checkpoint, moe_layer_tensors, write_checkpoint

PREFIX = "model.layers.0.mlp.experts"
_ENTRY = "from nvfp4_prep.cli.main import entry; entry()"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt", moe_layer_tensors(0, 4, 128, 64))


def expect_changed(shard: Path, read) -> str:
    with pytest.raises(CheckpointInvalid) as info:
        read()
    message = str(info.value)
    assert str(shard) in message and "changed while being read" in message, message
    return message


def test_shard_truncated_between_header_and_read_is_invalid_naming_it(ckpt: Path) -> None:
    shard = ckpt / "model.safetensors"
    with open_checkpoint(ckpt) as checkpoint:
        os.truncate(shard, shard.stat().st_size // 2)
        expect_changed(shard, lambda: checkpoint.read_layer(PREFIX))
        # Every later read of the file fails the same way; nothing else is disturbed.
        expect_changed(shard, lambda: checkpoint.read_raw(f"{PREFIX}.0.gate_proj.weight"))


def test_smaller_file_copied_over_the_shard_is_invalid(tmp_path: Path, ckpt: Path) -> None:
    small = write_checkpoint(tmp_path / "small", moe_layer_tensors(0, 1, 32, 32))
    shard = ckpt / "model.safetensors"
    with open_checkpoint(ckpt) as checkpoint:
        shutil.copyfile(small / "model.safetensors", shard)  # what `cp small old` does: same inode, rewritten
        expect_changed(shard, lambda: checkpoint.read_layer(PREFIX))


def test_shard_truncated_by_another_thread_during_a_read(ckpt: Path) -> None:
    """The read's own interrupt hook hands over to a thread that truncates the file, mid-layer."""
    shard = ckpt / "model.safetensors"
    turn, done = threading.Event(), threading.Event()
    calls = []

    def truncate() -> None:
        turn.wait(30)
        os.truncate(shard, 64)
        done.set()

    def interrupt() -> None:
        calls.append(1)
        if len(calls) == 5:  # a few tensors in: let the other thread cut the file, then go on reading
            turn.set()
            assert done.wait(30)

    thread = threading.Thread(target=truncate, daemon=True)
    thread.start()
    with open_checkpoint(ckpt) as checkpoint:
        expect_changed(shard, lambda: checkpoint.read_layer(PREFIX, interrupt=interrupt))
    thread.join(30)
    assert done.is_set() and len(calls) == 5


def test_interrupt_abandons_the_read_and_the_checkpoint_stays_usable(ckpt: Path) -> None:
    class Expired(Exception):
        pass

    def expired() -> None:
        raise Expired

    reference = load_all(ckpt / "model.safetensors")
    with open_checkpoint(ckpt) as checkpoint:
        with pytest.raises(Expired):
            checkpoint.read_layer(PREFIX, interrupt=expired)
        name = f"{PREFIX}.3.down_proj.weight"
        assert torch.equal(checkpoint.read_tensor(name, interrupt=lambda: None), reference[name])


def test_same_size_rewrite_between_header_and_read_is_invalid(ckpt: Path) -> None:
    shard = ckpt / "model.safetensors"
    data = bytearray(shard.read_bytes())
    with open_checkpoint(ckpt) as checkpoint:
        data[-1] ^= 0xFF
        with open(shard, "r+b") as handle:  # in place: same inode and size
            handle.write(data)
        os.utime(shard, ns=(1, 1))  # a distinct mtime, whatever the clock's granularity
        expect_changed(shard, lambda: checkpoint.read_layer(PREFIX))


def test_tensors_read_after_close_of_the_checkpoint_stay_valid(ckpt: Path) -> None:
    name = f"{PREFIX}.1.up_proj.weight_scale"
    reference = load_all(ckpt / "model.safetensors")[name].clone()  # the library's tensors may map the file
    with open_checkpoint(ckpt) as checkpoint:
        tensor = checkpoint.read_tensor(name)
    os.truncate(ckpt / "model.safetensors", 0)  # the tensor owns its memory: no view of the file
    assert torch.equal(tensor.view(torch.uint8), reference.view(torch.uint8))


def test_prepare_process_survives_its_source_truncated_mid_run(tmp_path: Path) -> None:
    """A real ``nvfp4-prep prepare`` is stopped once it has written a layer, its source shard is cut to a
    fraction, and it is continued: it exits with the checkpoint-error code and a line naming the shard,
    not killed by SIGBUS (exit -7) as with memory-mapped reads."""
    source = moe_checkpoint(tmp_path / "src", 16, 8, 512, 256, fmt="compressed-tensors", seed=4)
    shard, out = source / "model.safetensors", tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", _ENTRY, "prepare", str(source), "--out", str(out), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            try:
                if json.loads((out / MANIFEST_NAME).read_text())["shards"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.002)
        child.send_signal(signal.SIGSTOP)
        assert child.poll() is None, "prepare finished before its source could be truncated"
        os.truncate(shard, shard.stat().st_size // 8)
        child.send_signal(signal.SIGCONT)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == EXIT_ERROR, (child.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert str(shard) in stderr and "changed while being read" in stderr, stderr
