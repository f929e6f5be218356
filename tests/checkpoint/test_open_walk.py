"""Opening locations under allowed roots by descriptor: renames racing the walk, symlinks, non-regular files."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from nvfp4_prep.checkpoint import (
    CheckpointError,
    CheckpointInvalid,
    CheckpointPermissionDenied,
    open_checkpoint,
)
from tests.helpers.checkpoint_factory import dense_tensors, moe_layer_tensors, write_checkpoint

PREFIX = "model.layers.0.mlp.experts"
PROBE = f"{PREFIX}.0.gate_proj.weight"
AT_FDCWD, RENAME_EXCHANGE = -100, 2


def run_bounded(call: Callable[[], object], timeout: float = 30) -> object:
    """``call()`` in a thread, joined with a timeout: a regression that blocks fails instead of hanging."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """(allowed root holding checkpoint 'ckpt', a directory outside it with checkpoint 'secret' of other bytes)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_checkpoint(root / "ckpt", {**dense_tensors(64), **moe_layer_tensors(0, 2, 64, 64, seed=1)})
    write_checkpoint(outside / "secret", {**dense_tensors(64), **moe_layer_tensors(0, 2, 64, 64, seed=2)})
    return root, outside


def _probe(location: Path, roots: list[Path]) -> torch.Tensor:
    with open_checkpoint(location, roots) as checkpoint:
        return checkpoint.read_expert_tensors(PREFIX)["0.gate_proj.weight"]


def _exchanger(a: Path, b: Path) -> Callable[[], None]:
    """Swaps two directory entries atomically (renameat2 RENAME_EXCHANGE), else with four plain renames."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None and renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)  # back as it was

        def exchange() -> None:
            if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
                raise OSError(ctypes.get_errno(), "renameat2")
        return exchange
    aside = a.with_name(a.name + ".aside")

    def swap() -> None:
        os.rename(a, aside)
        os.rename(b, a)
        os.rename(aside, b)
    return swap


def test_directory_exchanged_with_an_outside_symlink_never_yields_outside_bytes(roots: tuple[Path, Path]) -> None:
    """A thread swaps root/ckpt (real) with root/swap (symlink to the outside checkpoint) in a loop while
    checkpoints are opened and read: each read gives the inside bytes or a refusal, never the outside's."""
    root, outside = roots
    inside_bytes, outside_bytes = _probe(root / "ckpt", [root]), _probe(outside / "secret", None)
    assert not torch.equal(inside_bytes, outside_bytes)
    (root / "swap").symlink_to(outside / "secret", target_is_directory=True)
    exchange = _exchanger(root / "ckpt", root / "swap")
    stop, swaps = threading.Event(), []

    def swapper() -> None:
        while not stop.is_set():
            exchange()
            swaps.append(1)

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    outcomes = {"inside": 0, "refused": 0}
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                got = _probe(root / "ckpt", [root])
            except CheckpointError:  # a symlink leaving the roots, or a name missing mid-swap
                outcomes["refused"] += 1
                continue
            assert not torch.equal(got, outside_bytes), "read the checkpoint outside the allowed roots"
            assert torch.equal(got, inside_bytes)
            outcomes["inside"] += 1
    finally:
        stop.set()
        thread.join(30)
    assert swaps and sum(outcomes.values()) > 0, outcomes


def test_symlinks_inside_the_root_are_followed_as_a_hugging_face_cache_lays_them_out(tmp_path: Path) -> None:
    """snapshots/<rev>/<file> -> ../../blobs/<hash>, and a directory link by absolute path, both in the root."""
    root = tmp_path / "hub"
    source = write_checkpoint(tmp_path / "plain", moe_layer_tensors(0, 2, 64, 64, seed=3))
    repo = root / "models--org--model"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for index, path in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"{index:040x}"
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (root / "latest").symlink_to(snapshot, target_is_directory=True)
    expected = _probe(source, None)
    linked_root = tmp_path / "hub-link"  # the root configured through a symlink of its own
    linked_root.symlink_to(root, target_is_directory=True)
    for location, allowed in ((snapshot, root), (root / "latest", root), (linked_root / "latest", linked_root),
                              (snapshot / "model.safetensors", root), (root / "latest" / "model.safetensors", root)):
        assert torch.equal(_probe(location, [allowed]), expected), location


def test_relative_symlink_climbing_out_of_the_root_is_denied(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    ckpt = root / "ckpt"
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(Path("../../outside/secret/model.safetensors"))
    with pytest.raises(CheckpointPermissionDenied) as info:
        open_checkpoint(ckpt, [root])
    assert "model.safetensors" in str(info.value) and "outside the allowed roots" in str(info.value)
    assert str(outside) not in str(info.value)
    assert torch.equal(_probe(ckpt, None), _probe(outside / "secret", None))  # without roots: followed


def test_symlink_loop_is_invalid(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    with pytest.raises(CheckpointInvalid, match="more than 40 symlinks"):
        open_checkpoint(root / "a", [root])


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
@pytest.mark.parametrize("restricted", [True, False])
def test_fifo_as_a_checkpoint_file_is_refused_without_blocking(roots: tuple[Path, Path], name: str,
                                                               restricted: bool) -> None:
    root, _ = roots
    target = root / "ckpt" / name
    target.unlink()
    os.mkfifo(target)
    try:
        with pytest.raises(CheckpointInvalid) as info:
            run_bounded(lambda: open_checkpoint(root / "ckpt", [root] if restricted else None))
    finally:
        _release(target)
    assert name in str(info.value) and "expected a regular file, found a FIFO" in str(info.value)


def _release(fifo: Path) -> None:
    """Opens the FIFO for writing (non-blocking) so that a reader stuck on it, after a regression, goes on."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as exc:
        assert exc.errno == errno.ENXIO  # no reader: nothing was blocked


def test_fifo_named_as_the_location_and_directory_as_a_shard_are_refused(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    fifo = root / "pipe.safetensors"
    os.mkfifo(fifo)
    try:
        with pytest.raises(CheckpointInvalid, match="expected a regular file, found a FIFO"):
            run_bounded(lambda: open_checkpoint(fifo, [root]))
    finally:
        _release(fifo)
    shard = root / "ckpt" / "model.safetensors"
    shard.unlink()
    shard.mkdir()
    with pytest.raises(CheckpointInvalid, match=r"model\.safetensors: expected a regular file, found a directory"):
        open_checkpoint(root / "ckpt", [root])
