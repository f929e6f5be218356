"""``prepare --tp-size/--ep-size``: one prepared folder per rank, verified rank by rank and as a whole.

Each rank folder is read back with the safetensors library itself and compared with
``pipeline.prepare(whole layer, shard)``; the set verifies; a flipped byte, a missing rank folder and a
stray folder are each named; a set interrupted half-way is finished by a rerun that prepares only what is
missing; another source is said first, then the differences, capped with a count (issue 15).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from nvfp4_prep.checkpoint import open_checkpoint
from nvfp4_prep.contract import layout
from nvfp4_prep.contract.layout import PREPARED_NAMES
from nvfp4_prep.pipeline import prepare
from nvfp4_prep.prepared.manifest import MANIFEST_NAME, Manifest
from nvfp4_prep.prepared.prepare_job import prepare_checkpoint
from nvfp4_prep.prepared.rank_set import RANKS_NAME
from nvfp4_prep.prepared.verify_output import verify_output
from tests.helpers.checkpoint_cli import cli
from tests.helpers.checkpoint_factory import load_all, moe_checkpoint

INDEX = "model.safetensors.index.json"
SCRIPT = Path(sys.executable).with_name("nvfp4-prep")


def folder_name(tp: int, tp_size: int, ep: int, ep_size: int) -> str:
    """The README's naming, written out here independently of the job's own helper."""
    return f"tp{tp}of{tp_size}-ep{ep}of{ep_size}"


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a prepared folder, read with the safetensors library through its index."""
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_all(folder / shard))
    assert set(tensors) == set(weight_map)
    return tensors


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)) and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def flip_middle_byte(folder: Path, tensor: str) -> None:
    shard = folder / json.loads((folder / INDEX).read_text())["weight_map"][tensor]
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + header])[tensor]["data_offsets"]
    data[8 + header + (begin + end) // 2] ^= 0x04
    shard.write_bytes(bytes(data))


def verify_lines(capsys, out: Path, source: Path, *extra: object) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = cli("verify", out, "--against", source, *extra)
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Two MoE layers of 5 experts (an uneven linear split) with dense tensors, ModelOpt."""
    return moe_checkpoint(tmp_path / "src", 2, 5, 256, 128, seed=4, dense=True)


@pytest.mark.parametrize("backend", layout.BACKENDS)
@pytest.mark.parametrize(("tp_size", "ep_size", "placement"), [(2, 2, "linear"), (1, 3, "round_robin")])
def test_each_rank_folder_is_prepare_of_its_shard_and_the_set_verifies(
        tmp_path: Path, capsys, source: Path, backend: str, tp_size: int, ep_size: int, placement: str) -> None:
    out = tmp_path / "out"
    assert cli("prepare", source, "--backend", backend, "--out", out, "--tp-size", tp_size, "--ep-size", ep_size,
               "--expert-placement", placement, "--quiet") == 0
    wanted = [folder_name(tp, tp_size, ep, ep_size) for tp in range(tp_size) for ep in range(ep_size)]
    assert sorted(path.name for path in out.iterdir()) == sorted([RANKS_NAME, *wanted])
    ranks = json.loads((out / RANKS_NAME).read_text())
    assert (ranks["tp_size"], ranks["ep_size"], ranks["expert_placement"], ranks["complete"]) == (
        tp_size, ep_size, placement, True)
    assert [entry["folder"] for entry in ranks["ranks"]] == wanted

    checkpoint = open_checkpoint(source)
    for tp in range(tp_size):
        for ep in range(ep_size):
            folder = out / folder_name(tp, tp_size, ep, ep_size)
            tensors = read_folder(folder)
            shard = {"tp_rank": tp, "tp_size": tp_size, "ep_rank": ep, "ep_size": ep_size,
                     "expert_placement": placement}
            for prefix in checkpoint.moe_layers():
                expected = prepare(checkpoint.read_layer(prefix), backend, **shard)
                for name in PREPARED_NAMES:
                    assert same_bytes(tensors[f"{prefix}.{name}"], expected.tensors[name]), (folder.name, name)
                record = Manifest.load(folder).layer_layout(prefix)
                assert {key: record[key] for key in shard} == shard
                assert record["expert_ids"] == expected.layout["expert_ids"]
            for name in checkpoint.other_tensor_names():  # carried: the source's bytes, in every rank folder
                assert same_bytes(tensors[name], checkpoint.read_tensor(name)), name
            assert (folder / "tokenizer_config.json").read_bytes() == (source / "tokenizer_config.json").read_bytes()
            marker = json.loads((folder / "config.json").read_text())["nvfp4_prep"]
            assert (marker["tp_rank"], marker["ep_rank"], marker["tp_size"], marker["ep_size"]) == (
                tp, ep, tp_size, ep_size)
            assert marker["layout_id"].endswith(f"/tp{tp}of{tp_size}/ep{ep}of{ep_size}-{placement}")

    code, lines, _ = verify_lines(capsys, out, source)
    assert (code, lines) == (0, [f"{out}: verified, identical to its source"])
    one = out / wanted[-1]  # a single rank folder verifies on its own too
    code, lines, _ = verify_lines(capsys, one, source)
    assert (code, lines) == (0, [f"{one}: verified, identical to its source"])


def test_shared_checkpoint_through_the_console_script(tmp_path: Path, ct_checkpoint: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run([str(SCRIPT), "prepare", str(ct_checkpoint), "--backend", "flashinfer_trtllm", "--out",
                             str(out), "--tp-size", "2", "--ep-size", "2", "--verify"],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("prepare: ")]
    # Off a terminal: one whole line per layer x rank, counting up.
    assert [line.split(" done (")[1].split(" ")[0] for line in lines] == [f"{k}/8" for k in range(1, 9)], lines
    shown = sorted(tuple(line.split(" ")[1:3]) for line in lines)
    assert shown == sorted((f"model.layers.{layer}.mlp.experts", folder_name(tp, 2, ep, 2))
                           for layer in range(2) for tp in range(2) for ep in range(2)), lines
    assert f"{out}: verified, identical to its source" in result.stdout.splitlines()
    assert "4 rank folders" in result.stdout


def test_flipped_byte_in_one_rank_is_named_with_its_folder(tmp_path: Path, capsys, source: Path) -> None:
    out = tmp_path / "out"
    assert cli("prepare", source, "--out", out, "--tp-size", 2, "--ep-size", 2, "--quiet") == 0
    name = "model.layers.1.mlp.experts.w2_weight"
    flip_middle_byte(out / folder_name(1, 2, 0, 2), name)
    code, lines, _ = verify_lines(capsys, out, source)
    assert code == 1
    rank_lines = [line for line in lines if line.startswith(f"DIFFERENCE {folder_name(1, 2, 0, 2)}/{name}: ")]
    assert any("crc32c" in line for line in rank_lines) and any("against preparing" in line for line in rank_lines)
    others = [line for line in lines if not line.startswith(f"DIFFERENCE {folder_name(1, 2, 0, 2)}/")]
    # The only other line: the layer put back together from the ranks no longer equals the source.
    assert others and all(line.startswith(f"DIFFERENCE {name}: the rank folders merged") for line in others), lines


def test_without_against_each_rank_folder_is_checked_against_its_manifest(tmp_path: Path, capsys,
                                                                           source: Path) -> None:
    out = tmp_path / "out"
    assert cli("prepare", source, "--out", out, "--ep-size", 2, "--quiet") == 0
    capsys.readouterr()
    assert cli("verify", out) == 0
    assert capsys.readouterr().out.startswith(f"{out}: verified, consistent with its manifest")
    name = "model.layers.0.mlp.experts.w13_weight"
    flip_middle_byte(out / folder_name(0, 1, 1, 2), name)
    assert cli("verify", out) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith(f"DIFFERENCE {folder_name(0, 1, 1, 2)}/{name}: ") for line in lines), lines


def test_missing_rank_and_stray_folder_are_named(tmp_path: Path, capsys, source: Path) -> None:
    out = tmp_path / "out"
    assert cli("prepare", source, "--out", out, "--tp-size", 2, "--quiet") == 0
    shutil.rmtree(out / folder_name(1, 2, 0, 1))
    (out / "tp7of8-ep0of1").mkdir()
    code, lines, _ = verify_lines(capsys, out, source, "--max-differences", 0)
    assert code == 1
    assert any(line.startswith(f"DIFFERENCE {folder_name(1, 2, 0, 1)}: rank folder missing") for line in lines), lines
    assert any(line.startswith("DIFFERENCE tp7of8-ep0of1: a folder that is not a rank") for line in lines), lines
    assert all(f"{folder_name(0, 2, 0, 1)}/" not in line for line in lines), lines  # the rank still there is exact


def test_half_written_set_is_finished_by_a_rerun(tmp_path: Path, source: Path) -> None:
    """A run whose preparer fails after 3 layer x rank shards; the rerun prepares exactly the missing ones."""
    out = tmp_path / "out"
    calls, lock = [], threading.Lock()

    def failing_after_three(*args: object, **options: object):
        with lock:
            if len(calls) >= 3:
                raise RuntimeError("the preparer went away")
            calls.append(options)
        return prepare(*args, **options)

    with pytest.raises(RuntimeError, match="went away"), open_checkpoint(source) as checkpoint:
        prepare_checkpoint(checkpoint, out, [failing_after_three], "flashinfer_cutlass", tp_size=2, ep_size=2)
    assert not json.loads((out / RANKS_NAME).read_text())["complete"]
    written = {(folder.name, prefix) for folder in out.iterdir() if (folder / MANIFEST_NAME).is_file()
               for prefix in Manifest.load(folder).layers}
    assert len(written) == 3  # every shard prepared before the failure was written
    before = {path: path.read_bytes() for path in out.rglob("model-*.safetensors")}

    again = []

    def counting(*args: object, **options: object):
        with lock:
            again.append(folder_name(options["tp_rank"], 2, options["ep_rank"], 2))
        return prepare(*args, **options)

    with open_checkpoint(source) as checkpoint:
        summary = prepare_checkpoint(checkpoint, out, [counting], "flashinfer_cutlass", tp_size=2, ep_size=2)
    assert sorted(again) == sorted(folder for folder in summary.ranks for prefix in checkpoint.moe_layers()
                                   if (folder, prefix) not in written)
    assert summary.ranks == tuple(folder_name(tp, 2, ep, 2) for tp in range(2) for ep in range(2))
    assert json.loads((out / RANKS_NAME).read_text())["complete"]
    for path, data in before.items():  # what the first run wrote was kept as it was
        assert path.read_bytes() == data, path
    outcome = verify_output(out, source)
    assert (outcome.note, outcome.differences) == (None, [])


def test_other_sizes_are_refused_then_replaced_with_overwrite(tmp_path: Path, capsys, source: Path) -> None:
    out = tmp_path / "out"
    assert cli("prepare", source, "--out", out, "--tp-size", 2, "--quiet") == 0
    capsys.readouterr()
    assert cli("prepare", source, "--out", out, "--ep-size", 2, "--quiet") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / folder_name(0, 2, 0, 1)).is_dir()

    assert cli("prepare", source, "--out", out, "--ep-size", 2, "--overwrite", "--quiet") == 0
    assert sorted(path.name for path in out.iterdir()) == [RANKS_NAME, folder_name(0, 1, 0, 2),
                                                           folder_name(0, 1, 1, 2)]
    assert verify_output(out, source).differences == []

    capsys.readouterr()  # a rank set into a single prepared folder, and back: refused, then replaced cleanly
    assert cli("prepare", source, "--out", out, "--quiet") == 2
    assert RANKS_NAME in capsys.readouterr().err
    assert cli("prepare", source, "--out", out, "--overwrite", "--quiet") == 0
    assert not (out / RANKS_NAME).exists() and not any(path.is_dir() for path in out.iterdir())
    assert verify_output(out, source).differences == []
    assert cli("prepare", source, "--out", out, "--tp-size", 2, "--quiet") == 2
    assert cli("prepare", source, "--out", out, "--tp-size", 2, "--overwrite", "--quiet") == 0
    assert sorted(path.name for path in out.iterdir()) == [RANKS_NAME, folder_name(0, 2, 0, 1),
                                                           folder_name(1, 2, 0, 1)]


def test_bad_rank_sizes_exit_two_naming_the_flag_and_write_nothing(tmp_path: Path, capsys, source: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        cli("prepare", source, "--out", tmp_path / "a", "--tp-size", 0)
    assert exited.value.code == 2 and "--tp-size" in capsys.readouterr().err
    assert cli("prepare", source, "--out", tmp_path / "b", "--ep-size", 6, "--quiet") == 2
    error = capsys.readouterr().err
    assert "ep_size" in error and "5 experts" in error, error
    assert not (tmp_path / "b").exists()
    assert cli("prepare", source, "--out", tmp_path / "c", "--tp-size", 3, "--quiet") == 2
    assert "tp_size" in capsys.readouterr().err


@pytest.mark.parametrize("ranks", [(), ("--tp-size", "2", "--ep-size", "2")])
def test_wrong_source_is_said_first_then_differences_capped(tmp_path: Path, capsys, source: Path,
                                                            ranks: tuple[str, ...]) -> None:
    out = tmp_path / "out"
    assert cli("prepare", source, "--out", out, *ranks, "--quiet") == 0
    other = moe_checkpoint(tmp_path / "other", 2, 5, 256, 128, seed=5, dense=True)
    recorded = json.loads((out / (RANKS_NAME if ranks else MANIFEST_NAME)).read_text())["source"]
    given = open_checkpoint(other).source_identity()

    code, lines, err = verify_lines(capsys, out, other)
    total = len(verify_output(out, other).differences)
    assert code == 1 and total > 20
    assert lines[0].startswith(f"NOTE {out}: ") and "names another source" in lines[0]
    assert recorded["path"] in lines[0] and recorded["identity"] in lines[0]
    assert str(other) in lines[0] and given in lines[0]
    assert all(line.startswith("DIFFERENCE ") for line in lines[1:21])
    assert lines[21:] == [f"... and {total - 20} more differences (--max-differences 0 prints all)"]
    assert f"{total} differences" in err

    code, lines, _ = verify_lines(capsys, out, other, "--max-differences", 0)
    assert code == 1 and len(lines) == 1 + total and lines[0].startswith("NOTE ")


def test_a_copy_of_the_source_is_noted_but_verifies(tmp_path: Path, capsys, source: Path) -> None:
    """Identity is a note, not a difference: the same bytes elsewhere (another machine, a backup) verify."""
    out = tmp_path / "out"
    assert cli("prepare", source, "--out", out, "--quiet") == 0
    copy = shutil.copytree(source, tmp_path / "copy")
    code, lines, _ = verify_lines(capsys, out, copy)
    assert code == 0
    assert lines[0].startswith(f"NOTE {out}: {MANIFEST_NAME} names another source: {source} ")
    assert lines[1:] == [f"{out}: verified, identical to its source"]
    code, lines, _ = verify_lines(capsys, out, source)
    assert (code, lines) == (0, [f"{out}: verified, identical to its source"])
