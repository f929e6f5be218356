"""The server's table of open checkpoints (``OpenCheckpoints``): a checkpoint that reference calls name is opened
once and reused while its files stay the same; a file rewritten, replaced, touched or added makes the next call
open it again (and a real server then answers the new bytes); one moved out of the allowed roots behind a symlink
is refused as a fresh open would be; the least recently used beyond ``CAPACITY`` and one left unused for
``IDLE_SECONDS`` are closed once no call uses them."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from nvfp4_prep import pipeline
from nvfp4_prep.checkpoint import CheckpointInvalid, CheckpointPermissionDenied, open_checkpoint
from nvfp4_prep.client import PrepClient
from nvfp4_prep.server import open_checkpoints
from nvfp4_prep.server.open_checkpoints import OpenCheckpoints
from tests.helpers.checkpoint_factory import moe_checkpoint
from tests.helpers.server_state import wait_for

PREFIX = "model.layers.0.mlp.experts"
EXPERTS, HIDDEN, INTER = 4, 256, 128


def make(path: Path, seed: int = 3) -> Path:
    moe_checkpoint(path, 1, EXPERTS, HIDDEN, INTER, seed=seed)
    return path


def is_open(checkpoint) -> bool:
    try:
        checkpoint.read_tensor(checkpoint.layer(PREFIX).tensor_names[0])
    except ValueError:  # "read after close()"
        return False
    except CheckpointInvalid:  # its file was deleted under it: the descriptor still reads (and sees the change)
        return True
    return True


def test_a_checkpoint_is_reused_until_a_file_of_it_changes(tmp_path):
    location = str(make(tmp_path / "ckpt"))
    table = OpenCheckpoints((str(tmp_path),))
    first = table.acquire(location)
    again = table.acquire(location)
    assert again is first
    table.release(first)
    table.release(again)
    assert is_open(first)  # kept for the next call
    shard = next((tmp_path / "ckpt").glob("*.safetensors"))
    os.utime(shard)  # touched: its mtime and ctime move
    changed = table.acquire(location)
    assert changed is not first
    assert not is_open(first)  # pushed out and unused: closed at once
    table.release(changed)
    table.close()
    assert not is_open(changed)


def test_a_replaced_checkpoint_in_use_closes_when_its_last_call_lets_go(tmp_path):
    location = str(make(tmp_path / "ckpt"))
    table = OpenCheckpoints((str(tmp_path),))
    held = table.acquire(location)
    shutil.rmtree(tmp_path / "ckpt")
    make(tmp_path / "ckpt", seed=4)
    fresh = table.acquire(location)
    assert fresh is not held
    assert is_open(held)  # a call still reads it
    table.release(held)
    assert not is_open(held)
    with open_checkpoint(location) as checkpoint:
        name = checkpoint.layer(PREFIX).tensor_names[0]
        assert fresh.read_tensor(name).equal(checkpoint.read_tensor(name))
    table.release(fresh)


def test_the_least_recently_used_beyond_capacity_is_closed_once_unused(tmp_path, monkeypatch):
    monkeypatch.setattr(open_checkpoints, "CAPACITY", 2)
    locations = [str(make(tmp_path / f"ckpt{i}")) for i in range(3)]
    table = OpenCheckpoints((str(tmp_path),))
    held = table.acquire(locations[0])
    unused = table.acquire(locations[1])
    table.release(unused)
    table.acquire(locations[1])  # the most recently used again
    table.release(unused)
    newest = table.acquire(locations[2])  # pushes out the least recently used: locations[0], still in use
    assert is_open(held) and is_open(unused)
    table.release(held)
    assert not is_open(held)
    assert table.acquire(locations[1]) is unused
    table.release(unused)
    table.release(newest)
    table.close()
    assert not is_open(unused) and not is_open(newest)


def test_a_file_added_that_an_open_would_read_opens_the_checkpoint_again(tmp_path):
    location = str(make(tmp_path / "ckpt"))
    table = OpenCheckpoints((str(tmp_path),))
    first = table.acquire(location)
    table.release(first)
    names = first.tensor_names()
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(  # an open prefers the index to the file
        json.dumps({"weight_map": {name: "model.safetensors" for name in names}}))
    again = table.acquire(location)
    assert again is not first and not is_open(first)
    assert again.tensor_names() == names
    table.release(again)
    table.close()


def test_a_checkpoint_moved_out_of_the_roots_behind_a_symlink_is_refused_and_let_go(tmp_path):
    (tmp_path / "root").mkdir()
    location = str(make(tmp_path / "root" / "ckpt"))
    table = OpenCheckpoints((str(tmp_path / "root"),))
    first = table.acquire(location)
    table.release(first)
    (tmp_path / "root" / "ckpt").rename(tmp_path / "outside")
    (tmp_path / "root" / "ckpt").symlink_to(tmp_path / "outside")
    with pytest.raises(CheckpointPermissionDenied):
        table.acquire(location)
    assert not is_open(first)


def test_a_checkpoint_left_unused_is_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(open_checkpoints, "IDLE_SECONDS", 0.5)
    location = str(make(tmp_path / "ckpt"))
    table = OpenCheckpoints((str(tmp_path),))
    used = table.acquire(location)
    table.release(table.acquire(location))  # a second user comes and goes: the first still holds it
    time.sleep(1.0)
    assert is_open(used)
    table.release(used)
    wait_for(lambda: not is_open(used), 30)
    fresh = table.acquire(location)
    assert fresh is not used
    table.release(fresh)
    table.close()


def test_the_allowed_roots_hold(tmp_path):
    make(tmp_path / "outside")
    table = OpenCheckpoints((str(tmp_path / "root"),))
    (tmp_path / "root").mkdir()
    with pytest.raises(CheckpointPermissionDenied, match="is outside the allowed roots"):
        table.acquire(str(tmp_path / "outside"))


def test_a_server_answers_the_new_bytes_once_the_checkpoint_was_rewritten(start_server, tmp_path, same_tensors):
    make(tmp_path / "ckpt")
    server = start_server(allowed_roots=(tmp_path,))
    with PrepClient(server.address) as client:
        before = client.prepare_reference(str(tmp_path / "ckpt"), PREFIX, "flashinfer_cutlass")
        again = client.prepare_reference(str(tmp_path / "ckpt"), PREFIX, "flashinfer_cutlass")
        same_tensors(again.tensors, before.tensors)
        shutil.rmtree(tmp_path / "ckpt")
        make(tmp_path / "ckpt", seed=4)
        after = client.prepare_reference(str(tmp_path / "ckpt"), PREFIX, "flashinfer_cutlass")
    with open_checkpoint(tmp_path / "ckpt") as checkpoint:
        want = pipeline.prepare(checkpoint.read_layer(PREFIX), "flashinfer_cutlass")
    same_tensors(after.tensors, want.tensors)
    assert not all(after.tensors[name].equal(before.tensors[name]) for name in want.tensors)
