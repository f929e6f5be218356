"""``nvfp4-prep prepare`` / ``verify`` end to end: embedded server, separate servers, exit codes, kill and resume."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint_factory import CT_CHECKPOINT, MODELOPT_CHECKPOINT, moe_layer_tensors, write_checkpoint
from nvfp4_prep import pipeline
from nvfp4_prep.checkpoint.manifest import MANIFEST_NAME
from nvfp4_prep.checkpoint.verify import verify_prepared
from nvfp4_prep.client import checkpoint_commands
from nvfp4_prep.server.server import PrepServer

SHARED = {"compressed-tensors": CT_CHECKPOINT, "modelopt": MODELOPT_CHECKPOINT}
INDEX = "model.safetensors.index.json"

# Builds the CLI's parser with the checkpoint subcommands and runs one command, like `nvfp4-prep ARGS`.
_CLI = """
import argparse, sys
from nvfp4_prep.client.checkpoint_commands import register
parser = argparse.ArgumentParser(prog="nvfp4-prep")
register(parser.add_subparsers(required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.run(args))
"""


def cli(*argv: object) -> int:
    parser = argparse.ArgumentParser(prog="nvfp4-prep")
    checkpoint_commands.register(parser.add_subparsers(required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.run(args)


@pytest.fixture
def servers(start_server) -> list[PrepServer]:
    """Two real servers on loopback, each with a cache so the test can count the layers it prepared."""
    return [start_server(cache_bytes=64 << 20) for _ in range(2)]


def test_cli_choices_are_the_pipeline_names() -> None:
    assert checkpoint_commands.BACKENDS == pipeline.BACKENDS
    assert checkpoint_commands.ACTIVATIONS == pipeline.ACTIVATIONS
    assert checkpoint_commands.INPUT_SCALE_POLICIES == pipeline.INPUT_SCALE_POLICIES


@pytest.mark.parametrize("fmt", sorted(SHARED))
@pytest.mark.parametrize("backend", pipeline.BACKENDS)
def test_prepare_embedded_then_verify(tmp_path: Path, fmt: str, backend: str, capsys) -> None:
    out = tmp_path / "out"
    assert cli("prepare", SHARED[fmt], "--backend", backend, "--out", out, "--quiet") == 0
    assert cli("verify", out, "--against", SHARED[fmt]) == 0
    assert "verified" in capsys.readouterr().out
    assert json.loads((out / MANIFEST_NAME).read_text())["layout"]["backend"] == backend


@pytest.mark.parametrize("fmt", sorted(SHARED))
@pytest.mark.parametrize("backend", pipeline.BACKENDS)
def test_prepare_through_a_separate_server_then_verify(tmp_path: Path, servers, fmt: str, backend: str) -> None:
    out = tmp_path / "out"
    assert cli("prepare", SHARED[fmt], "--backend", backend, "--out", out, "--server", servers[0].address,
               "--verify", "--quiet") == 0
    assert servers[0].cache.misses == 2 and servers[1].cache.misses == 0


def test_layers_spread_across_servers_and_match_the_embedded_output(tmp_path: Path, servers) -> None:
    tensors = {}
    for layer in range(8):
        tensors.update(moe_layer_tensors(layer, 4, 256, 128, fmt="compressed-tensors", seed=2))
    source = write_checkpoint(tmp_path / "src", tensors, fmt="compressed-tensors")
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


def test_prepare_defaults_to_the_bundled_sample(tmp_path: Path, monkeypatch, capsys) -> None:
    sample = checkpoint_commands.sample_checkpoint()
    assert (sample / "model.safetensors").read_bytes() == (CT_CHECKPOINT / "model.safetensors").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert cli("prepare", "--verify", "--quiet") == 0
    assert (tmp_path / "prepared" / INDEX).is_file()
    assert "2 layers prepared" in capsys.readouterr().out
    assert verify_prepared(tmp_path / "prepared", CT_CHECKPOINT) == []


def test_flags_come_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NVFP4_PREP_BACKEND", "vllm_cutlass")
    monkeypatch.setenv("NVFP4_PREP_OUT", str(tmp_path / "env-out"))
    assert cli("prepare", MODELOPT_CHECKPOINT, "--quiet") == 0
    assert json.loads((tmp_path / "env-out" / MANIFEST_NAME).read_text())["request"]["backend"] == "vllm_cutlass"


def test_verify_exits_one_naming_the_flipped_tensor(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert cli("prepare", CT_CHECKPOINT, "--out", out, "--quiet") == 0
    name = "model.layers.0.mlp.experts.w13_weight"
    shard = out / json.loads((out / INDEX).read_text())["weight_map"][name]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the shard: the last tensor in it
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli("verify", out, "--against", CT_CHECKPOINT) == 1
    printed = capsys.readouterr().out
    assert printed.startswith("DIFFERENCE model.layers.0.")


def test_bad_checkpoint_and_bad_server_exit_two_with_a_message(tmp_path: Path, capsys) -> None:
    assert cli("prepare", tmp_path / "missing", "--out", tmp_path / "out", "--quiet") == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli("prepare", CT_CHECKPOINT, "--out", tmp_path / "out", "--input-scale-policy", "strict",
               "--quiet") == 2
    assert "w2_input_scale" in capsys.readouterr().err
    assert cli("verify", tmp_path / "nothing", "--against", CT_CHECKPOINT) == 1
    assert MANIFEST_NAME in capsys.readouterr().out


def test_killed_prepare_is_completed_by_rerunning_it(tmp_path: Path) -> None:
    tensors = {}
    for layer in range(24):
        tensors.update(moe_layer_tensors(layer, 8, 512, 256, seed=3))
    source = write_checkpoint(tmp_path / "src", tensors)
    out = tmp_path / "out"
    command = [sys.executable, "-c", _CLI, "prepare", str(source), "--backend", "flashinfer_cutedsl",
               "--out", str(out), "--quiet"]
    child = subprocess.Popen(command, env=os.environ.copy(), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        try:
            if len(json.loads((out / MANIFEST_NAME).read_text())["shards"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert child.poll() is None, "prepare finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out / INDEX).exists()

    rerun = subprocess.run(command, env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    kept = int(rerun.stdout.split(" kept from")[0].rsplit(" ", 1)[1])
    assert kept >= 2
    assert verify_prepared(out, source) == []
