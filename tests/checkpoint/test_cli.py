"""``nvfp4-prep prepare`` / ``verify`` end to end: embedded server, separate servers, exit codes, kill and resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nvfp4_prep.cli import checkpoint_commands
from nvfp4_prep.contract import layout
from nvfp4_prep.prepared.manifest import MANIFEST_NAME
from nvfp4_prep.prepared.verify import verify_prepared
from nvfp4_prep.server.server import PrepServer
from tests.helpers.checkpoint_cli import cli
from tests.helpers.checkpoint_factory import (
    FORMATS,
    kill_after_shards,
    load_all,
    moe_checkpoint,
    moe_layer_tensors,
    write_checkpoint,
)

INDEX = "model.safetensors.index.json"

# Builds the CLI's parser with the checkpoint subcommands and runs one command, like `nvfp4-prep ARGS`.
_CLI = """
import argparse, sys
from nvfp4_prep.cli.checkpoint_commands import register
parser = argparse.ArgumentParser(prog="nvfp4-prep")
register(parser.add_subparsers(required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.run(args))
"""


@pytest.fixture
def servers(start_server) -> list[PrepServer]:
    """Two real servers on loopback, each with a cache so the test can count the layers it prepared."""
    return [start_server(cache_bytes=64 << 20) for _ in range(2)]


def test_cli_choices_are_the_pipeline_names() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    checkpoint_commands.register(parser.add_subparsers())
    prepare = parser._subparsers._group_actions[0].choices["prepare"]
    choices = {action.dest: tuple(action.choices) for action in prepare._actions if action.choices}
    assert choices["backend"] == layout.BACKENDS and choices["activation"] == layout.ALL_ACTIVATIONS
    assert choices["input_scale_policy"] == layout.INPUT_SCALE_POLICIES and choices["profile"] == layout.PROFILES
    assert choices["gated_group_size"] == layout.GATED_GROUP_SIZES


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", layout.BACKENDS)
def test_prepare_embedded_then_verify(tmp_path: Path, fmt: str, backend: str, capsys, shared: dict[str, Path]) -> None:
    out = tmp_path / "out"
    assert cli("prepare", shared[fmt], "--backend", backend, "--out", out, "--quiet") == 0
    assert cli("verify", out, "--against", shared[fmt]) == 0
    assert "verified" in capsys.readouterr().out
    assert json.loads((out / MANIFEST_NAME).read_text())["layout"]["backend"] == backend


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", layout.BACKENDS)
def test_prepare_through_a_separate_server_then_verify(tmp_path: Path, servers, fmt: str, backend: str,
                                                       shared: dict[str, Path]) -> None:
    out = tmp_path / "out"
    assert cli("prepare", shared[fmt], "--backend", backend, "--out", out, "--server", servers[0].address,
               "--verify", "--quiet") == 0
    assert servers[0].cache.misses == 2 and servers[1].cache.misses == 0


def test_layers_spread_across_servers_and_match_the_embedded_output(tmp_path: Path, servers) -> None:
    source = moe_checkpoint(tmp_path / "src", 8, 4, 256, 128, fmt="compressed-tensors", seed=2)
    addresses = ",".join(server.address for server in servers)
    assert cli("prepare", source, "--backend", "flashinfer_trtllm", "--out", tmp_path / "spread",
               "--server", addresses, "--quiet") == 0
    assert [server.cache.misses >= 1 for server in servers] == [True, True]
    assert sum(server.cache.misses for server in servers) == 8
    assert cli("prepare", source, "--backend", "flashinfer_trtllm", "--out", tmp_path / "embedded",
               "--quiet") == 0
    for path in sorted((tmp_path / "embedded").glob("model-*.safetensors")):
        assert path.read_bytes() == (tmp_path / "spread" / path.name).read_bytes(), path.name
    assert verify_prepared(tmp_path / "spread", source) == []


def test_prepare_defaults_to_the_bundled_sample(tmp_path: Path, monkeypatch, capsys, ct_checkpoint: Path) -> None:
    """The sample is the shared llm-compressor checkpoint less its embedding and lm_head (PROVENANCE.md): every
    tensor it holds is the tool's, byte for byte."""
    sample = checkpoint_commands.sample_checkpoint()
    bundled, shared = load_all(sample / "model.safetensors"), load_all(ct_checkpoint / "model.safetensors")
    assert set(shared) - set(bundled) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert set(bundled) <= set(shared)
    for name, tensor in bundled.items():
        assert tensor.dtype == shared[name].dtype
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), shared[name].reshape(-1).view(torch.uint8)), name
    for name in ("config.json", "recipe.yaml", "tokenizer.json"):
        assert (sample / name).read_bytes() == (ct_checkpoint / name).read_bytes(), name
    monkeypatch.chdir(tmp_path)
    assert cli("prepare", "--verify", "--quiet") == 0
    assert (tmp_path / "prepared" / INDEX).is_file()
    assert "2 layers prepared" in capsys.readouterr().out
    assert verify_prepared(tmp_path / "prepared", sample) == []


def test_flags_come_from_the_environment(tmp_path: Path, monkeypatch, modelopt_checkpoint: Path) -> None:
    monkeypatch.setenv("NVFP4_PREP_BACKEND", "vllm_cutlass")
    monkeypatch.setenv("NVFP4_PREP_OUT", str(tmp_path / "env-out"))
    assert cli("prepare", modelopt_checkpoint, "--quiet") == 0
    assert json.loads((tmp_path / "env-out" / MANIFEST_NAME).read_text())["request"]["backend"] == "vllm_cutlass"


def test_verify_exits_one_naming_the_flipped_tensor(tmp_path: Path, capsys, ct_checkpoint: Path) -> None:
    out = tmp_path / "out"
    assert cli("prepare", ct_checkpoint, "--out", out, "--quiet") == 0
    name = "model.layers.1.mlp.experts.w2_weight"
    shard = out / json.loads((out / INDEX).read_text())["weight_map"][name]
    data = bytearray(shard.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + header_size])[name]["data_offsets"]  # read with the format's own rules
    data[8 + header_size + (begin + end) // 2] ^= 0x01  # one bit in the middle of that tensor only
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli("verify", out, "--against", ct_checkpoint) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith(f"DIFFERENCE {name}: ") for line in lines), lines


def test_bad_checkpoint_and_bad_server_exit_two_with_a_message(tmp_path: Path, capsys, ct_checkpoint: Path) -> None:
    assert cli("prepare", tmp_path / "missing", "--out", tmp_path / "out", "--quiet") == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli("prepare", ct_checkpoint, "--out", tmp_path / "out", "--input-scale-policy", "strict",
               "--quiet") == 2
    assert "w2_input_scale" in capsys.readouterr().err
    assert cli("verify", tmp_path / "nothing", "--against", ct_checkpoint) == 1
    assert MANIFEST_NAME in capsys.readouterr().out

    with socket.socket() as probe:  # a loopback port that was free a moment ago: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    assert cli("prepare", ct_checkpoint, "--out", tmp_path / "out2", "--server", nowhere, "--timeout", "2",
               "--quiet") == 2
    assert time.monotonic() - started < 60  # the flag bounds the retries; no hang
    error = capsys.readouterr().err
    assert error.startswith("nvfp4-prep prepare: ") and ("UNAVAILABLE" in error or "DEADLINE_EXCEEDED" in error), error


def test_out_holding_another_model_is_refused_and_left_untouched(tmp_path: Path, capsys, ct_checkpoint: Path) -> None:
    other = write_checkpoint(tmp_path / "OtherModel", moe_layer_tensors(0, 2, 64, 64, seed=9), shards=2)
    (other / "model.safetensors").write_bytes((ct_checkpoint / "model.safetensors").read_bytes())
    before = {path.name: path.read_bytes() for path in other.iterdir()}
    assert cli("prepare", ct_checkpoint, "--out", other, "--quiet") == 2
    error = capsys.readouterr().err
    assert str(other) in error and MANIFEST_NAME in error, error
    assert {path.name: path.read_bytes() for path in other.iterdir()} == before

    (tmp_path / "empty").mkdir()  # an existing empty directory is fine, and so is a rerun into our own output
    assert cli("prepare", ct_checkpoint, "--out", tmp_path / "empty", "--quiet") == 0
    assert cli("prepare", ct_checkpoint, "--out", tmp_path / "empty", "--quiet") == 0
    assert "2 kept from an earlier run" in capsys.readouterr().out


def test_killed_prepare_is_completed_by_rerunning_it(tmp_path: Path) -> None:
    source = moe_checkpoint(tmp_path / "src", 24, 8, 512, 256, seed=3)
    out = tmp_path / "out"
    command = [sys.executable, "-c", _CLI, "prepare", str(source), "--backend", "flashinfer_cutedsl",
               "--out", str(out), "--quiet"]
    child = subprocess.Popen(command, env=os.environ.copy(), stderr=subprocess.DEVNULL)
    kill_after_shards(child, out, 2, timeout=120, what="prepare")
    assert not (out / INDEX).exists()

    rerun = subprocess.run(command, env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    kept = int(rerun.stdout.split(" kept from")[0].rsplit(" ", 1)[1])
    assert kept >= 2
    assert verify_prepared(out, source) == []


def test_verify_help_says_what_a_pass_proves_and_what_it_does_not(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli("verify", "--help")
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for claim in ("inverts back to it", "corruption, truncation, a wrong source, mixed layers",
                  "does not prove the layout itself", "same index maps prepare used", "test suite"):
        assert claim in text, claim
    from nvfp4_prep.prepared import verify
    assert "established by the test suite" in " ".join(verify.__doc__.split())
