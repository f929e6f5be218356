"""Writing prepared checkpoints through the real pipeline, verifying them, and resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvfp4_prep.checkpoint import CheckpointError, open_checkpoint
from nvfp4_prep.contract.layout import BACKENDS, PREPARED_NAMES
from nvfp4_prep.pipeline import PrepError, prepare
from nvfp4_prep.prepared.manifest import MANIFEST_NAME
from nvfp4_prep.prepared.output_checkpoint import open_output
from nvfp4_prep.prepared.prepare_job import prepare_checkpoint
from nvfp4_prep.prepared.prepared_config import original_config, prepared_file_name
from nvfp4_prep.prepared.verify import verify_prepared
from tests.helpers.checkpoint_factory import (
    FORMATS,
    kill_after_shards,
    load_all,
    moe_checkpoint,
    moe_layer_tensors,
    sharded_copy,
    write_checkpoint,
)

INDEX = "model.safetensors.index.json"


def run(source: Path, out: Path, backend: str = "flashinfer_cutedsl", **options: object):
    return prepare_checkpoint(open_checkpoint(source), out, [prepare], backend, **options)


def flip_byte(shard: Path, tensor: str) -> None:
    """Flips one bit in the middle of ``tensor``'s bytes in place."""
    header = load_header(shard)
    begin, end = header[tensor]["data_offsets"]
    at = 8 + header_length(shard) + (begin + end) // 2
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x10
    shard.write_bytes(bytes(data))


def header_length(shard: Path) -> int:
    return int.from_bytes(shard.read_bytes()[:8], "little")


def load_header(shard: Path) -> dict:
    return json.loads(shard.read_bytes()[8:8 + header_length(shard)])


def shard_of(out: Path, tensor: str) -> Path:
    return out / json.loads((out / INDEX).read_text())["weight_map"][tensor]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_prepare_then_verify_round_trips(tmp_path: Path, fmt: str, backend: str, shared: dict[str, Path]) -> None:
    source = shared[fmt]
    summary = run(source, tmp_path / "out", backend)
    assert (summary.layers_prepared, summary.layers_skipped) == (2, 0)
    assert verify_prepared(tmp_path / "out", source) == []

    # The output is an ordinary sharded safetensors checkpoint: read it with the library itself.
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_all(tmp_path / "out" / shard))
    assert set(tensors) == set(index["weight_map"])
    reference = open_checkpoint(source)
    for prefix in reference.moe_layers():
        expected = prepare(reference.read_layer(prefix), backend)
        for name in PREPARED_NAMES:
            got, want = tensors[f"{prefix}.{name}"], expected.tensors[name]
            assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
        metadata_layout = json.loads(_metadata(shard_of(tmp_path / "out", f"{prefix}.w13_weight"))["nvfp4_prep_layout"])
        assert metadata_layout["layers"][prefix]["hidden_dim_unpadded"] == 512
        assert metadata_layout["layout_id"] == expected.layout["layout_id"]
    source_tensors = load_all(source / "model.safetensors")
    for name in reference.other_tensor_names():
        assert torch.equal(tensors[name].reshape(-1).view(torch.uint8),
                           source_tensors[name].reshape(-1).view(torch.uint8))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["nvfp4_prep"]["backend"] == backend and config["nvfp4_prep"]["prepared"] is True
    assert config["quantization_config"]["quant_method"] == "nvfp4_prep"
    assert original_config(config) == json.loads((source / "config.json").read_text())


def _metadata(shard: Path) -> dict:
    return load_header(shard)["__metadata__"]


def test_strict_policy_round_trips_where_the_source_allows_it(tmp_path: Path, modelopt_checkpoint: Path) -> None:
    run(modelopt_checkpoint, tmp_path / "out", "flashinfer_trtllm", input_scale_policy="strict")
    assert verify_prepared(tmp_path / "out", modelopt_checkpoint) == []


def test_strict_policy_failure_leaves_no_complete_looking_output(tmp_path: Path, ct_checkpoint: Path) -> None:
    with pytest.raises(PrepError, match="w2_input_scale"):
        run(ct_checkpoint, tmp_path / "out", "flashinfer_cutlass", input_scale_policy="strict")
    assert not (tmp_path / "out" / INDEX).exists()
    assert json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["complete"] is False
    assert not list((tmp_path / "out").glob(".*.partial"))
    assert verify_prepared(tmp_path / "out", ct_checkpoint)[0].tensor == MANIFEST_NAME


def test_sharded_copy_gives_the_same_output(tmp_path: Path, ct_checkpoint: Path) -> None:
    sharded = sharded_copy(ct_checkpoint, tmp_path / "sharded", 3)
    run(ct_checkpoint, tmp_path / "a", "flashinfer_trtllm")
    run(sharded, tmp_path / "b", "flashinfer_trtllm")
    assert verify_prepared(tmp_path / "b", sharded) == []
    for path in (tmp_path / "a").glob("model-*.safetensors"):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name
    assert (tmp_path / "a" / INDEX).read_bytes() == (tmp_path / "b" / INDEX).read_bytes()


def test_verify_names_a_flipped_byte_in_a_prepared_tensor(tmp_path: Path, ct_checkpoint: Path) -> None:
    run(ct_checkpoint, tmp_path / "out", "flashinfer_cutedsl")
    name = "model.layers.1.mlp.experts.w2_weight"
    flip_byte(shard_of(tmp_path / "out", name), name)
    differences = verify_prepared(tmp_path / "out", ct_checkpoint)
    assert {d.tensor for d in differences} == {name}
    assert any("crc32c" in d.problem for d in differences)
    assert any("differ from the source" in d.problem for d in differences)


def test_verify_catches_a_flip_even_when_the_manifest_agrees(tmp_path: Path, modelopt_checkpoint: Path) -> None:
    """The manifest is not trusted alone: unprepare + compare with the source catches it too."""
    run(modelopt_checkpoint, tmp_path / "out", "vllm_cutlass")
    for name in ("model.layers.0.mlp.experts.w13_weight_scale", "model.layers.0.self_attn.o_proj.weight",
                 "model.layers.1.mlp.experts.g1_alphas"):
        flip_byte(shard_of(tmp_path / "out", name), name)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    checkpoint = open_output(tmp_path / "out", "modelopt")
    from nvfp4_prep.prepared.checksum import crc32c_hex
    for shard in manifest["shards"].values():
        for tensor, info in shard["tensors"].items():
            info["crc32c"] = crc32c_hex(checkpoint.read_raw(tensor))
    (tmp_path / "out" / MANIFEST_NAME).write_text(json.dumps(manifest))
    differences = verify_prepared(tmp_path / "out", modelopt_checkpoint)
    assert {d.tensor for d in differences} == {"model.layers.0.mlp.experts.w13_weight_scale",
                                               "model.layers.0.self_attn.o_proj.weight",
                                               "model.layers.1.mlp.experts.g1_alphas"}


def test_verify_against_another_source_fails(tmp_path: Path, ct_checkpoint: Path, modelopt_checkpoint: Path) -> None:
    run(ct_checkpoint, tmp_path / "out")
    differences = verify_prepared(tmp_path / "out", modelopt_checkpoint)
    assert any(d.tensor == "model.layers.0.mlp.experts.w13_weight" for d in differences)


def test_rerun_after_a_crash_keeps_intact_layers_and_redoes_the_rest(tmp_path: Path, ct_checkpoint: Path) -> None:
    out = tmp_path / "out"
    run(ct_checkpoint, out, "flashinfer_trtllm")
    # What a crash while writing layer 1 leaves: its shard half-written under a temporary name, the
    # manifest without it, no index yet.
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    layer1 = shard_of(out, "model.layers.1.mlp.experts.w13_weight")
    del manifest["shards"][layer1.name]
    manifest["complete"] = False
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    (out / INDEX).unlink()
    partial = out / f".{layer1.name}.partial"
    partial.write_bytes(layer1.read_bytes()[:1000])
    layer1.unlink()

    summary = run(ct_checkpoint, out, "flashinfer_trtllm")
    assert (summary.layers_prepared, summary.layers_skipped) == (1, 1)
    assert not partial.exists()
    assert verify_prepared(out, ct_checkpoint) == []


def test_rerun_redoes_a_layer_whose_bytes_no_longer_match(tmp_path: Path, modelopt_checkpoint: Path) -> None:
    out = tmp_path / "out"
    run(modelopt_checkpoint, out)
    name = "model.layers.0.mlp.experts.w13_weight"
    flip_byte(shard_of(out, name), name)
    summary = run(modelopt_checkpoint, out)
    assert (summary.layers_prepared, summary.layers_skipped) == (1, 1)
    assert verify_prepared(out, modelopt_checkpoint) == []


def test_rerun_with_another_backend_is_refused_without_overwrite(tmp_path: Path, modelopt_checkpoint: Path) -> None:
    out = tmp_path / "out"
    run(modelopt_checkpoint, out, "flashinfer_cutedsl")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(CheckpointError, match=r"made from other options.*--overwrite"):
        run(modelopt_checkpoint, out, "flashinfer_trtllm")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_overwrite_from_another_source_leaves_no_stray_file(tmp_path: Path, modelopt_checkpoint: Path) -> None:
    other = write_checkpoint(tmp_path / "other", moe_layer_tensors(0, 2, 64, 64))
    (other / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    run(other, out)
    assert (out / "tokenizer.json").exists()
    with pytest.raises(CheckpointError, match="made from another source"):
        run(modelopt_checkpoint, out)
    run(modelopt_checkpoint, out, overwrite=True)
    assert verify_prepared(out, modelopt_checkpoint) == []
    expected = {prepared_file_name(path.name) for path in modelopt_checkpoint.iterdir()
                if path.suffix != ".safetensors"}
    stray = {path.name for path in out.iterdir() if not path.name.endswith(".safetensors")} - expected
    assert stray <= {MANIFEST_NAME, INDEX}, stray


def test_rerun_with_another_backend_and_overwrite_rewrites_everything(tmp_path: Path,
                                                                       modelopt_checkpoint: Path) -> None:
    out = tmp_path / "out"
    run(modelopt_checkpoint, out, "flashinfer_cutedsl")
    summary = run(modelopt_checkpoint, out, "flashinfer_trtllm", overwrite=True)
    assert (summary.layers_prepared, summary.layers_skipped) == (2, 0)
    assert verify_prepared(out, modelopt_checkpoint) == []
    assert json.loads((out / "config.json").read_text())["nvfp4_prep"]["backend"] == "flashinfer_trtllm"


def test_output_into_the_source_directory_is_refused(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", moe_layer_tensors(0, 2, 64, 64))
    with pytest.raises(CheckpointError, match="source checkpoint"):
        run(source, source)


def test_output_directory_must_be_empty_or_ours(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", moe_layer_tensors(0, 2, 64, 64))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / MANIFEST_NAME).write_text('{"format": "someone-elses"}')
    (foreign / "model-00001-of-00001.safetensors").write_bytes(b"not ours")
    with pytest.raises(CheckpointError, match=f"{foreign}.*not a prepare run's"):
        run(source, foreign)
    assert (foreign / "model-00001-of-00001.safetensors").read_bytes() == b"not ours"
    killed_at_first_save = tmp_path / "killed"  # only the first manifest's partial file: resumable
    killed_at_first_save.mkdir()
    (killed_at_first_save / f".{MANIFEST_NAME}.partial").write_bytes(b"{")
    run(source, killed_at_first_save)
    assert verify_prepared(killed_at_first_save, source) == []


_SLOW_PREPARE = """
import sys, time
from nvfp4_prep.checkpoint import open_checkpoint
from nvfp4_prep.prepared.prepare_job import prepare_checkpoint
from nvfp4_prep.pipeline import prepare

def slow(stacked, backend, activation, policy, **options):
    time.sleep(0.4)  # room for the parent to kill this run between layers or mid-write
    return prepare(stacked, backend, activation, policy, **options)

prepare_checkpoint(open_checkpoint(sys.argv[1]), sys.argv[2], [slow], "flashinfer_cutlass")
"""


def test_killed_run_is_completed_by_a_rerun(tmp_path: Path) -> None:
    source = moe_checkpoint(tmp_path / "src", 8, 4, 256, 128, seed=1)
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, str(source), str(out)], env=os.environ.copy())
    kill_after_shards(child, out, 3, timeout=60, what="the run")
    assert not (out / INDEX).exists()
    assert verify_prepared(out, source)  # an interrupted output never passes

    summary = run(source, out, "flashinfer_cutlass")
    assert summary.layers_skipped >= 3 and summary.layers_prepared + summary.layers_skipped == 8
    assert verify_prepared(out, source) == []
    assert not list(out.glob(".*.partial"))


def mapped_files_under(directory: Path) -> list[str]:
    """Files under ``directory`` that this process has memory-mapped, read from the kernel's own list."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return sorted({line.split(maxsplit=5)[5] for line in lines
                   if len(line.split(maxsplit=5)) == 6 and line.split(maxsplit=5)[5].startswith(f"{directory}/")})


def test_verify_unmaps_what_it_opened_and_leaves_a_passed_checkpoint_open(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", moe_layer_tensors(0, 2, 64, 64), shards=2)
    run(source, tmp_path / "out")
    assert verify_prepared(tmp_path / "out", source) == []
    assert mapped_files_under(tmp_path) == []
    with open_checkpoint(source) as checkpoint:
        assert verify_prepared(tmp_path / "out", checkpoint) == []
        assert checkpoint.read_layer("model.layers.0.mlp.experts")["w2_weight"].shape[0] == 2  # still readable
    assert mapped_files_under(tmp_path) == []
