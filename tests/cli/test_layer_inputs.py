"""`nvfp4-prep layer` takes a per-expert file or one layer of a checkpoint (--layer-prefix) as well as a stacked
file; a checkpoint without a usable --layer-prefix gets one line naming its layers and pointing to prepare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nvfp4_prep import pipeline
from nvfp4_prep.cli.main import main
from tests.helpers.checkpoint_factory import dense_tensors, moe_layer_tensors, write_checkpoint

BACKEND = "flashinfer_cutlass"
EXPERTS = "model.layers.{}.mlp.experts"


def _prepared(path: Path, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name.removeprefix(prefix + "."): handle.get_tensor(name) for name in handle.keys()}
        record = json.loads(handle.metadata()["nvfp4_prep_layout"])
    return tensors, record


def _layer(*argv: object) -> int:
    return main(["layer", *map(str, argv), "--backend", BACKEND, "--quiet"])


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_a_per_expert_file_is_stacked_and_prepared(prep_address, make_layer, per_expert, same_tensors,
                                                   tmp_path: Path, fmt: str) -> None:
    stacked = make_layer(experts=3)
    prefix = EXPERTS.format(5)
    source, target = tmp_path / "experts.safetensors", tmp_path / "out.safetensors"
    tensors = {f"{prefix}.{key}": tensor for key, tensor in per_expert(stacked, fmt).items()}
    save_file({**tensors, "model.layers.5.mlp.gate.weight": torch.zeros(3, 256)}, str(source))
    assert _layer(source, target, "--server", prep_address) == 0
    want = pipeline.prepare(stacked, BACKEND)
    got, record = _prepared(target, prefix)
    same_tensors({name: got[name] for name in want.tensors}, want.tensors)
    assert set(record["layers"]) == {prefix}


def test_a_per_expert_file_of_several_layers_needs_the_prefix(prep_address, make_layer, per_expert,
                                                             tmp_path: Path, capsys) -> None:
    source = tmp_path / "experts.safetensors"
    save_file({f"{EXPERTS.format(layer)}.{key}": tensor for layer in (1, 2)
               for key, tensor in per_expert(make_layer(seed=layer)).items()}, str(source))
    assert _layer(source, tmp_path / "out.safetensors", "--server", prep_address) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and EXPERTS.format(1) in err and EXPERTS.format(2) in err and "--layer-prefix" in err
    assert _layer(source, tmp_path / "out.safetensors", "--server", prep_address,
                  "--layer-prefix", EXPERTS.format(2)) == 0


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A two-layer ModelOpt checkpoint and the per-expert tensors of its layer 1 (relative to the prefix)."""
    tensors = {**moe_layer_tensors(0, 2, 256, 128), **moe_layer_tensors(1, 2, 256, 128)}
    lead = EXPERTS.format(1) + "."
    layer1 = {name[len(lead):]: tensor for name, tensor in tensors.items() if name.startswith(lead)}
    return write_checkpoint(tmp_path / "ckpt", tensors), layer1


@pytest.mark.parametrize("given", ["directory", "model.safetensors"])
def test_a_checkpoint_layer_is_prepared_with_layer_prefix(prep_address, checkpoint, same_tensors, tmp_path: Path,
                                                          given: str) -> None:
    directory, layer1 = checkpoint
    source = directory if given == "directory" else directory / "model.safetensors"
    target = tmp_path / "out.safetensors"
    assert _layer(source, target, "--server", prep_address, "--layer-prefix", EXPERTS.format(1)) == 0
    want = pipeline.prepare(pipeline.assemble_layer(layer1), BACKEND)
    got, record = _prepared(target, EXPERTS.format(1))
    same_tensors({name: got[name] for name in want.tensors}, want.tensors)
    assert set(record["layers"]) == {EXPERTS.format(1)}


def test_a_checkpoint_without_layer_prefix_gets_one_helpful_line(prep_address, checkpoint, tmp_path: Path,
                                                                 capsys) -> None:
    directory, _ = checkpoint
    target = tmp_path / "out.safetensors"
    assert _layer(directory, target, "--server", prep_address) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert EXPERTS.format(0) in err and EXPERTS.format(1) in err
    assert "--layer-prefix" in err and f"nvfp4-prep prepare {directory}" in err
    assert not target.exists()


def test_a_checkpoint_without_that_layer_gets_one_helpful_line(prep_address, checkpoint, tmp_path: Path,
                                                               capsys) -> None:
    directory, _ = checkpoint
    assert _layer(directory, tmp_path / "out.safetensors", "--server", prep_address,
                  "--layer-prefix", EXPERTS.format(7)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--layer-prefix: '{EXPERTS.format(7)}'" in err
    assert EXPERTS.format(0) in err and "nvfp4-prep prepare" in err


def test_a_checkpoint_without_moe_layers_is_one_line(prep_address, tmp_path: Path, capsys) -> None:
    directory = write_checkpoint(tmp_path / "dense", dense_tensors(256))
    assert _layer(directory, tmp_path / "out.safetensors", "--server", prep_address,
                  "--layer-prefix", EXPERTS.format(0)) == 2
    err = capsys.readouterr().err
    assert err == f"nvfp4-prep layer: {directory}: a checkpoint without NVFP4 MoE layers (nothing to prepare)\n"
