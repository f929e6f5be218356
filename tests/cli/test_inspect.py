"""``nvfp4-prep inspect`` through the real console script, checked against the manifest read with json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nvfp4_prep.checkpoint import open_checkpoint
from nvfp4_prep.pipeline import prepare
from nvfp4_prep.prepared.prepare_job import prepare_checkpoint

SCRIPT = Path(sys.executable).with_name("nvfp4-prep")
LIMIT_S = 120  # a loaded 2-core machine; generous on purpose


def inspect(*argv: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), "inspect", *map(str, argv)], capture_output=True, text=True, timeout=LIMIT_S)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "prepared"
    with open_checkpoint(testdata / "qwen3moe_modelopt_nvfp4") as source:
        prepare_checkpoint(source, out, [prepare], "flashinfer_trtllm", profile="vllm-0.33")
    return out


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "nvfp4_prep_manifest.json").read_text())


def test_json_gives_the_manifest_record_and_exact_sizes(written: Path) -> None:
    result = inspect(written, "--json")
    assert result.returncode == 0, result.stderr
    record, manifest = json.loads(result.stdout), _manifest(written)
    layers = manifest["layout"].pop("layers")
    assert record["layout"] == manifest["layout"] and record["source"] == manifest["source"]
    assert record["engine_versions"] == {"vllm": "0.33.0", "flashinfer": manifest["layout"]["flashinfer_release"]}
    assert record["shard"] == {"tp_rank": 0, "tp_size": 1, "ep_rank": 0, "ep_size": 1, "expert_placement": "linear"}
    assert [layer["prefix"] for layer in record["layers"]] == sorted(layers)
    for layer in record["layers"]:
        assert {key: layer[key] for key in layers[layer["prefix"]]} == layers[layer["prefix"]]
        assert manifest["shards"][layer["shard"]]["layer"] == layer["prefix"]
    assert {s["file"]: s["bytes"] for s in record["shards"]} == {name: (written / name).stat().st_size
                                                                 for name in manifest["shards"]}
    assert all(type(s["bytes"]) is int for s in record["shards"])
    assert record["total_bytes"] == sum(path.stat().st_size for path in written.iterdir())


def test_text_names_the_layout_layers_shards_source_and_sizes(written: Path) -> None:
    result = inspect(written)
    assert result.returncode == 0, result.stderr
    manifest, out = _manifest(written), result.stdout
    assert f"layout      {manifest['layout']['layout_id']}\n" in out
    assert f"source      {manifest['source']['path']} (modelopt)\n" in out
    assert manifest["source"]["identity"] in out
    assert "engines     vllm 0.33.0, flashinfer 0.7.2.post1\n" in out
    for filename, shard in manifest["shards"].items():
        size = (written / filename).stat().st_size
        assert f"  {filename}: {size / 1e6:.1f} MB, {len(shard['tensors'])} tensors" in out, out
        if shard["layer"]:
            sizes = manifest["layout"]["layers"][shard["layer"]]
            assert (f"  {shard['layer']}: {sizes['num_experts']} of {sizes['global_num_experts']} experts, "
                    f"hidden {sizes['hidden_dim']} ({sizes['hidden_dim_unpadded']} unpadded)") in out, out


def test_a_rank_set_is_shown_rank_by_rank(tmp_path: Path, testdata: Path) -> None:
    out = tmp_path / "ranks"
    with open_checkpoint(testdata / "qwen3moe_ct_nvfp4") as source:
        prepare_checkpoint(source, out, [prepare], "flashinfer_cutlass", tp_size=2)
    listed = json.loads((out / "nvfp4_prep_ranks.json").read_text())["ranks"]
    record = json.loads(inspect(out, "--json").stdout)
    assert [Path(rank["path"]).name for rank in record["ranks"]] == [rank["folder"] for rank in listed]
    assert [rank["shard"]["tp_rank"] for rank in record["ranks"]] == [0, 1]
    assert [rank["layout"]["layout_id"] for rank in record["ranks"]] == [rank["layout_id"] for rank in listed]
    text = inspect(out).stdout
    assert text.startswith(f"rank set    {out}: 2 rank folders")
    for rank in listed:
        assert f"  layout      {rank['layout_id']}\n" in text


def test_a_folder_that_is_not_prepared_exits_2_naming_it(tmp_path: Path) -> None:
    result = inspect(tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"nvfp4-prep inspect: {tmp_path}: no nvfp4_prep_manifest.json")
