"""Reading a layer straight into its stacked tensors (``stacked_read``): the bytes of stacking the per-expert
tensors that the safetensors library reads, the experts handed to ``ready`` in order once their rows are in
place, the layer checked before any byte is read, and a layer read by several threads stopping them all on an
error. ``BYTES_PER_THREAD`` is lowered where a test needs the threaded read of a small layer."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from nvfp4_prep.checkpoint import CheckpointInvalid, open_checkpoint, stacked_read
from nvfp4_prep.pipeline import assemble_layer
from tests.helpers.checkpoint_factory import FORMATS, load_all, moe_layer_tensors, write_checkpoint
from tests.helpers.pipeline_reference import as_bytes

EXPERTS, HIDDEN, INTER = 5, 256, 128
ROWS = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")
GATE_NAMES = (".gate_proj.", ".w1.")


def prefix_of(naming: str) -> str:
    return f"model.layers.0.{'mlp' if naming == 'qwen' else 'block_sparse_moe'}.experts"


def library_stacked(directory: Path, prefix: str, activation: str) -> dict[str, torch.Tensor]:
    """The layer as the safetensors library reads its files, stacked by ``assemble_layer``."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_all(file))
    start = len(prefix) + 1
    return assemble_layer({name[start:]: t for name, t in tensors.items() if name.startswith(prefix + ".")},
                          activation)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(as_bytes(got[name]), as_bytes(tensor)), name


def write_layer(directory: Path, fmt: str, naming: str, activation: str, files: int, experts: int = EXPERTS,
                hidden: int = HIDDEN, inter: int = INTER) -> Path:
    tensors = moe_layer_tensors(0, experts, hidden, inter, fmt=fmt, naming=naming, seed=3)
    if activation == "relu2":  # a non-gated layer: no gate projection
        tensors = {name: t for name, t in tensors.items() if not any(gate in name for gate in GATE_NAMES)}
    return write_checkpoint(directory, tensors, fmt=fmt, shards=files)


@pytest.fixture(params=["one thread", "threads"])
def threads(request, monkeypatch) -> str:
    if request.param == "threads":
        monkeypatch.setattr(stacked_read, "BYTES_PER_THREAD", 1)
    return request.param


@pytest.mark.parametrize("activation", ["swiglu", "swigluoai", "relu2"])
@pytest.mark.parametrize(("fmt", "naming", "files"),
                         [(fmt, naming, files) for fmt in FORMATS for naming, files in (("qwen", 1), ("mixtral", 3))])
def test_the_read_is_the_stack_of_the_expert_tensors(tmp_path, threads, fmt, naming, files, activation):
    directory = write_layer(tmp_path / "ckpt", fmt, naming, activation, files)
    prefix = prefix_of(naming)
    readers: set[int] = set()

    def interrupt() -> None:  # who reads; a little latency, so that no thread takes every read before the others start
        readers.add(threading.get_ident())
        time.sleep(0.002)

    with open_checkpoint(directory) as checkpoint:
        got = checkpoint.read_layer(prefix, activation, interrupt=interrupt)
    assert_same(got, library_stacked(directory, prefix, activation))
    assert all(tensor.is_contiguous() for tensor in got.values())
    assert (len(readers) > 1) == (threads == "threads")  # the threaded read really ran on several threads
    assert (threading.get_ident() in readers) == (threads == "one thread")


@pytest.mark.parametrize("activation", ["swiglu", "swigluoai"])
@pytest.mark.parametrize("run", [1, 2, EXPERTS])  # experts that READY_BYTES asks for a run, at least
def test_ready_hears_of_each_expert_once_in_order_once_its_rows_are_in(tmp_path, threads, activation, run,
                                                                       monkeypatch):
    directory = write_layer(tmp_path / "ckpt", "modelopt", "qwen", activation, files=2)
    prefix = prefix_of("qwen")
    want = library_stacked(directory, prefix, activation)
    per_expert = sum(want[name][0].numel() * want[name].element_size() for name in ROWS)
    monkeypatch.setattr(stacked_read, "READY_BYTES", per_expert * (run - 1) + 1)
    heard: list[tuple[int, int]] = []

    def ready(stacked, start: int, end: int) -> None:
        assert threading.current_thread() is threading.main_thread()  # where a caller may launch its copies
        for name in ROWS:
            assert torch.equal(as_bytes(stacked[name][start:end]), as_bytes(want[name][start:end])), (name, start)
        heard.append((start, end))

    with open_checkpoint(directory) as checkpoint:
        got = checkpoint.read_layer(prefix, activation, ready=ready)
    assert_same(got, want)
    assert [expert for start, end in heard for expert in range(start, end)] == list(range(EXPERTS))
    assert all(end - start >= run for start, end in heard[:-1])  # runs of READY_BYTES, the last perhaps shorter
    if threads == "one thread":  # the experts come in order, so each run is exactly as long as asked
        assert [end - start for start, end in heard] == [run] * (EXPERTS // run) + [EXPERTS % run] * (EXPERTS % run > 0)


def test_the_scales_of_a_file_come_in_one_read(tmp_path, monkeypatch):
    directory = write_layer(tmp_path / "ckpt", "modelopt", "qwen", "swiglu", files=1)
    prefix = prefix_of("qwen")
    want = library_stacked(directory, prefix, "swiglu")
    reads: list[int] = []
    preadv = os.preadv

    def counted(fd, views, offset):
        reads.append(sum(len(view) for view in views))
        return preadv(fd, views, offset)

    monkeypatch.setattr(os, "preadv", counted)
    with open_checkpoint(directory) as checkpoint:
        assert_same(checkpoint.read_layer(prefix, "swiglu"), want)
    scales = EXPERTS * 3 * 2 * 4  # weight_scale_2 and input_scale of three projections, float32 each
    tensors = EXPERTS * 3 * 2  # a weight and a block scale per projection
    assert reads[0] == scales  # the writer keeps the float32 scales side by side: one read takes them all
    assert len(reads) == 1 + tensors


def test_a_layer_that_does_not_stack_is_refused_before_any_byte_is_read(tmp_path):
    prefix = prefix_of("qwen")
    tensors = moe_layer_tensors(0, 3, HIDDEN, INTER)
    tensors[f"{prefix}.2.up_proj.weight"] = torch.zeros(INTER, HIDDEN // 4, dtype=torch.uint8)  # half the columns
    with open_checkpoint(write_checkpoint(tmp_path / "ckpt", tensors)) as checkpoint:
        expected = (rf"{prefix}\.2\.up_proj\.weight: has shape \[{INTER}, {HIDDEN // 4}\] .*expected a 2-D tensor of "
                    rf"shape \[{INTER}, {HIDDEN // 2}\].*like {prefix}\.0\.gate_proj\.weight")
        with pytest.raises(CheckpointInvalid, match=expected):
            checkpoint.read_layer(prefix)
        assert checkpoint.bytes_read == 0


def test_a_file_cut_under_a_threaded_read_fails_naming_it_once_every_reader_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(stacked_read, "BYTES_PER_THREAD", 1)
    directory = write_layer(tmp_path / "ckpt", "modelopt", "qwen", "swiglu", files=1, experts=8)
    file = directory / "model.safetensors"
    calls = []
    lock = threading.Lock()

    def interrupt() -> None:
        with lock:
            calls.append(1)
            if len(calls) == 10:
                os.truncate(file, 64)

    with open_checkpoint(directory) as checkpoint:
        with pytest.raises(CheckpointInvalid) as caught:
            checkpoint.read_layer(prefix_of("qwen"), interrupt=interrupt)
        read = checkpoint.bytes_read
        time.sleep(0.2)
        assert checkpoint.bytes_read == read  # no reader goes on after the error was raised
    assert str(file) in str(caught.value) and "changed while being read" in str(caught.value)
    assert not any(thread.name == "nvfp4-prep-read-part" for thread in threading.enumerate())


def test_an_interrupt_stops_every_reader_and_the_checkpoint_stays_usable(tmp_path, monkeypatch):
    monkeypatch.setattr(stacked_read, "BYTES_PER_THREAD", 1)
    directory = write_layer(tmp_path / "ckpt", "modelopt", "qwen", "swiglu", files=1, experts=8)
    prefix = prefix_of("qwen")

    class Expired(Exception):
        pass

    calls = []

    def interrupt() -> None:
        calls.append(1)
        if len(calls) >= 6:
            raise Expired

    with open_checkpoint(directory) as checkpoint:
        with pytest.raises(Expired):
            checkpoint.read_layer(prefix, interrupt=interrupt)
        stopped_at = len(calls)
        assert stopped_at < 8 * 3 * 3  # far fewer than the reads of the whole layer
        time.sleep(0.2)
        assert len(calls) == stopped_at
        assert_same(checkpoint.read_layer(prefix), library_stacked(directory, prefix, "swiglu"))
