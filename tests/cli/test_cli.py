"""The nvfp4-prep command line: serve (as a real process), info, layer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors import safe_open
from safetensors.torch import save_file

from nvfp4_prep import pipeline
from nvfp4_prep.cli.main import main
from nvfp4_prep.contract import layout
from nvfp4_prep.server.config import FLAGS

PREFIX = "model.layers.3.mlp.experts"


def _write_layer(path: Path, layers: dict[str, dict[str, torch.Tensor]],
                 extra: dict[str, torch.Tensor] | None = None) -> None:
    tensors = {f"{prefix}.{name}": t for prefix, layer in layers.items() for name, t in layer.items()}
    save_file({**tensors, **(extra or {})}, str(path))


def test_layer_command_writes_the_prepared_layer(prep_address, make_layer, same_tensors, tmp_path: Path, capsys):
    layer = make_layer(experts=3)
    source, target = tmp_path / "in.safetensors", tmp_path / "out" / "prepared.safetensors"
    _write_layer(source, {PREFIX: layer}, {"model.embed_tokens.weight": torch.zeros(4, 4)})
    code = main(["layer", str(source), str(target), "--server", prep_address, "--backend", "flashinfer_trtllm",
                 "--activation", "swiglu", "--chunk-size", "64KiB"])
    assert code == 0
    assert "download" in capsys.readouterr().err
    want = pipeline.prepare(layer, "flashinfer_trtllm")
    with safe_open(str(target), framework="pt") as handle:
        got = {name.removeprefix(PREFIX + "."): handle.get_tensor(name) for name in handle.keys()}
        record = json.loads(handle.metadata()["nvfp4_prep_layout"])
    same_tensors({name: got[name] for name in want.tensors}, want.tensors)
    assert set(got) == set(want.tensors)
    # As in a prepared checkpoint's shards: fields shared by all layers, then each layer's sizes.
    assert set(record["layers"]) == {PREFIX}
    assert {**{k: v for k, v in record.items() if k != "layers"}, **record["layers"][PREFIX]} == want.layout
    assert record["layers"][PREFIX]["hidden_dim_unpadded"] == want.layout["hidden_dim_unpadded"]
    assert [p.name for p in target.parent.iterdir()] == ["prepared.safetensors"]


def test_layer_command_needs_a_prefix_for_several_layers(prep_address, make_layer, tmp_path: Path, capsys):
    source = tmp_path / "two.safetensors"
    _write_layer(source, {"a.experts": make_layer(), "b.experts": make_layer(seed=1)})
    code = main(["layer", str(source), str(tmp_path / "out.safetensors"), "--server", prep_address,
                 "--backend", "vllm_cutlass", "--quiet"])
    assert code == 2 and "['a.experts', 'b.experts']" in capsys.readouterr().err
    code = main(["layer", str(source), str(tmp_path / "out.safetensors"), "--server", prep_address,
                 "--backend", "vllm_cutlass", "--quiet", "--prefix", "b.experts"])
    assert code == 0


def test_layer_command_reports_bad_input_and_writes_nothing(prep_address, make_layer, tmp_path: Path, capsys):
    layer = make_layer()
    layer["w2_input_scale"] = -layer["w2_input_scale"]
    source, target = tmp_path / "bad.safetensors", tmp_path / "out.safetensors"
    _write_layer(source, {PREFIX: layer})
    code = main(["layer", str(source), str(target), "--server", prep_address, "--backend", "flashinfer_cutlass",
                 "--quiet"])
    assert code == 1
    assert "INVALID_ARGUMENT: w2_input_scale" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [source]


def test_layer_command_refuses_a_chunk_size_out_of_range(prep_address, make_layer, tmp_path: Path, capsys):
    source = tmp_path / "in.safetensors"
    _write_layer(source, {PREFIX: make_layer()})
    with pytest.raises(SystemExit) as info:
        main(["layer", str(source), str(tmp_path / "out.safetensors"), "--server", prep_address,
              "--backend", "flashinfer_cutlass", "--chunk-size", "1KiB"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--chunk-size" in err and "'1KiB' is 1024 bytes" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [source]


def test_layer_command_reports_a_corrupt_input_file(prep_address, tmp_path: Path, capsys):
    source = tmp_path / "corrupt.safetensors"
    source.write_bytes(b"\xff" * 64)
    code = main(["layer", str(source), str(tmp_path / "out.safetensors"), "--server", prep_address,
                 "--backend", "flashinfer_cutlass", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{source}: cannot read the stacked layer" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [source]


def test_layer_command_reports_an_output_it_cannot_write(prep_address, make_layer, tmp_path: Path, capsys):
    source, blocker = tmp_path / "in.safetensors", tmp_path / "a-file"
    _write_layer(source, {PREFIX: make_layer()})
    blocker.write_text("not a directory")
    target = blocker / "out.safetensors"
    code = main(["layer", str(source), str(target), "--server", prep_address, "--backend", "flashinfer_cutlass"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{target}: cannot write the prepared layer" in err and "Traceback" not in err
    assert "download" in err  # the progress bar ran, and was closed before the message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "in.safetensors"]


def test_info_prints_capabilities_and_health(prep_address, capsys):
    assert main(["info", "--server", prep_address]) == 0
    text = capsys.readouterr().out
    assert "nvfp4_prep.v1" in text and "SERVING" in text and layout.layout_id("flashinfer_cutedsl") in text
    assert main(["info", "--server", prep_address, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["health"] == "SERVING" and record["devices"][0]["device"] == "cpu"


def test_info_on_a_dead_address_fails_cleanly(capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["info", "--server", f"127.0.0.1:{port}", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_serve_help_documents_every_flag_and_variable(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in FLAGS:
        assert f"--{flag.name}" in text and flag.env in text, flag.name


def test_serve_refuses_a_bad_flag(capsys):
    assert main(["serve", "--chunk-size", "1KiB"]) == 2
    assert "--chunk-size: '1KiB'" in capsys.readouterr().err


def test_serve_process_answers_and_drains_on_sigterm(tmp_path: Path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, NVFP4_PREP_HOST="127.0.0.1", NVFP4_PREP_LOG_FORMAT="json")
    process = subprocess.Popen(
        [sys.executable, "-m", "nvfp4_prep.cli.main", "serve", "--port", str(port), "--device", "cpu",
         "--memory-budget", "256MiB", "--metrics-port", "0"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            response = health.Check(health_pb2.HealthCheckRequest(service="nvfp4_prep.v1.Prep"),
                                    wait_for_ready=True, timeout=60)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        # communicate() drains stderr while waiting, so a chatty server never blocks on a full pipe.
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert any(m.startswith("serving nvfp4_prep.v1.Prep") for m in messages)
    assert any(m.startswith("draining") for m in messages)
    assert all(line["level"] in ("INFO", "WARNING") for line in lines)
