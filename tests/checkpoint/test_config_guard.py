"""A prepared folder's config.json names a quantization method stock loaders refuse, and gives the source's back."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from nvfp4_prep.checkpoint import open_checkpoint
from nvfp4_prep.pipeline import prepare
from nvfp4_prep.prepared.prepare_job import prepare_checkpoint
from nvfp4_prep.prepared.reader import open_prepared
from nvfp4_prep.prepared.verify import verify_prepared
from tests.helpers.checkpoint_factory import FORMATS, SHARED_NAMES
from tests.helpers.vllm_reference import VENV

RENAMED = "nvfp4_prep_original_hf_quant_config.json"
VLLM_S = 900  # importing vLLM on a loaded 2-core machine takes minutes


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> dict[str, Path]:
    """Format -> the shared checkpoint of that format prepared for the vllm-0.33 profile."""
    out = {}
    for fmt in FORMATS:
        out[fmt] = tmp_path_factory.mktemp("guard") / fmt
        with open_checkpoint(testdata / SHARED_NAMES[fmt]) as source:
            prepare_checkpoint(source, out[fmt], [prepare], "flashinfer_trtllm", profile="vllm-0.33")
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_quantization_config_names_nvfp4_prep_and_keeps_the_original(folders: dict[str, Path], fmt: str,
                                                                         testdata: Path) -> None:
    source = json.loads((testdata / SHARED_NAMES[fmt] / "config.json").read_text())
    config = json.loads((folders[fmt] / "config.json").read_text())
    guard = config["quantization_config"]
    assert guard["quant_method"] == "nvfp4_prep" and guard["manifest"] == "nvfp4_prep_manifest.json"
    assert guard["layout_id"] == config["nvfp4_prep"]["layout_id"]
    # inside the guard: vLLM hands a registered quantization method only the quantization_config object
    assert guard["original_quantization_config"] == source["quantization_config"]
    assert "original_hf_quant_config" not in guard and "original_quantization_config" not in config["nvfp4_prep"]
    assert config["nvfp4_prep"]["engine_versions"] == {"vllm": "0.33.0", "flashinfer": "0.7.2.post1"}
    assert config["nvfp4_prep"]["profile"] == "vllm-0.33"


@pytest.mark.parametrize("fmt", FORMATS)
def test_original_config_restores_the_source_config_exactly(folders: dict[str, Path], fmt: str,
                                                           testdata: Path) -> None:
    source = json.loads((testdata / SHARED_NAMES[fmt] / "config.json").read_text())
    with open_prepared(folders[fmt]) as prepared:
        restored = prepared.original_config()
    assert restored == source and list(restored) == list(source)  # the same keys in the same order


def test_hf_quant_config_is_kept_under_another_name_and_the_folder_still_verifies(folders: dict[str, Path],
                                                                                testdata: Path) -> None:
    folder, source = folders["modelopt"], testdata / SHARED_NAMES["modelopt"]
    assert not (folder / "hf_quant_config.json").exists()
    assert (folder / RENAMED).read_bytes() == (source / "hf_quant_config.json").read_bytes()
    assert verify_prepared(folder, source) == []


def test_a_source_without_quantization_config_gets_none_back(tmp_path: Path, testdata: Path) -> None:
    from nvfp4_prep.prepared.prepared_config import original_config, original_quantization, prepared_config_bytes

    source = {"model_type": "qwen3_moe", "hidden_size": 512}
    config = json.loads(prepared_config_bytes(json.dumps(source).encode(), {"layout_id": "x", "profile": "seed"}))
    assert config["quantization_config"] == {"quant_method": "nvfp4_prep", "layout_id": "x",
                                             "manifest": "nvfp4_prep_manifest.json"}
    assert original_quantization(config["quantization_config"]) is None
    assert original_config(config) == source and list(original_config(config)) == list(source)


def test_an_older_modelopt_source_keeps_its_hf_quant_config_in_the_guard(testdata: Path) -> None:
    """ModelOpt exports whose config.json has no quantization config: vLLM read hf_quant_config.json instead."""
    from nvfp4_prep.prepared.prepared_config import original_config, original_quantization, prepared_config_bytes

    source_dir = testdata / SHARED_NAMES["modelopt"]
    source = json.loads((source_dir / "config.json").read_text())
    del source["quantization_config"]
    hf_quant = (source_dir / "hf_quant_config.json").read_bytes()
    config = json.loads(prepared_config_bytes(json.dumps(source).encode(), {"layout_id": "x"}, hf_quant))
    guard = config["quantization_config"]
    assert guard["original_hf_quant_config"] == json.loads(hf_quant) and "original_quantization_config" not in guard
    assert original_quantization(guard) == json.loads(hf_quant)
    assert original_config(config) == source and list(original_config(config)) == list(source)


def test_a_source_with_both_keeps_config_json_s_own(testdata: Path) -> None:
    from nvfp4_prep.prepared.prepared_config import original_quantization, prepared_config_bytes

    source_dir = testdata / SHARED_NAMES["modelopt"]
    source = json.loads((source_dir / "config.json").read_text())
    config = json.loads(prepared_config_bytes(json.dumps(source).encode(), {"layout_id": "x"},
                                              (source_dir / "hf_quant_config.json").read_bytes()))
    assert "original_hf_quant_config" not in config["quantization_config"]
    assert original_quantization(config["quantization_config"]) == source["quantization_config"]


def test_an_unreadable_hf_quant_config_is_refused_naming_the_file() -> None:
    from nvfp4_prep.checkpoint.errors import CheckpointInvalid
    from nvfp4_prep.prepared.prepared_config import prepared_config_bytes

    with pytest.raises(CheckpointInvalid, match=r"hf_quant_config\.json: not valid JSON"):
        prepared_config_bytes(b"{}", {"layout_id": "x"}, b"{not json")


def test_a_config_whose_guard_is_not_ours_is_refused_naming_the_field() -> None:
    from nvfp4_prep.checkpoint.errors import CheckpointInvalid
    from nvfp4_prep.prepared.prepared_config import original_config

    with pytest.raises(CheckpointInvalid, match=r"config\.json quantization_config: expected a prepared checkpoint's"):
        original_config({"nvfp4_prep": {"prepared": True}, "quantization_config": {"quant_method": "modelopt"}})


def test_verify_catches_an_hf_quant_config_the_guard_disagrees_with(tmp_path: Path, folders: dict[str, Path]) -> None:
    import shutil

    from nvfp4_prep.prepared.integrity import verify_integrity

    folder = tmp_path / "folder"
    shutil.copytree(folders["modelopt"], folder)
    config = json.loads((folder / "config.json").read_text())
    guard = config["quantization_config"]
    hf_quant = json.loads((folder / RENAMED).read_text())
    del guard["original_quantization_config"]
    guard["original_hf_quant_config"] = hf_quant
    (folder / "config.json").write_text(json.dumps(config))
    assert verify_integrity(folder) == []  # consistent: the guard holds what the renamed copy holds
    hf_quant["quantization"]["group_size"] = 32
    (folder / RENAMED).write_text(json.dumps(hf_quant))
    diffs = [str(d) for d in verify_integrity(folder)]
    assert diffs == [f"config.json: quantization_config.original_hf_quant_config differs from {RENAMED}, the "
                     "source's hf_quant_config.json"], diffs


STOCK_READERS = r"""
import json, sys
folder = sys.argv[1]
config = json.load(open(folder + "/config.json"))
from transformers.quantizers.auto import AutoQuantizationConfig
try:
    AutoQuantizationConfig.from_dict(config["quantization_config"])
    print("transformers: ACCEPTED")
except ValueError as exc:
    print("transformers:", exc)
from vllm.config import ModelConfig
for forced in (None, "modelopt"):
    try:
        ModelConfig(model=folder, tokenizer=folder, quantization=forced)
        print(f"vllm {forced}: ACCEPTED")
    except Exception as exc:
        print(f"vllm {forced}:", " ".join(str(exc).split())[:400])
"""


def test_stock_transformers_and_vllm_refuse_the_folder(folders: dict[str, Path]) -> None:
    python = VENV / "bin" / "python"
    if not python.is_file():
        message = f"{VENV} is missing (vLLM 0.33.0 environment with transformers); build it with `.ci/env-vllm true`"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    folder = folders["modelopt"]  # the harder case: ModelOpt's hf_quant_config.json is what vLLM would read
    result = subprocess.run([str(python), "-c", STOCK_READERS, str(folder)], capture_output=True, text=True,
                            timeout=VLLM_S, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = {line.split(":", 1)[0]: line for line in result.stdout.splitlines() if ":" in line}
    assert "Unknown quantization type, got nvfp4_prep" in lines.get("transformers", ""), result.stdout + result.stderr
    assert "Unknown quantization method: nvfp4_prep" in lines.get("vllm None", ""), result.stdout + result.stderr
    assert "(nvfp4_prep) does not match" in lines.get("vllm modelopt", ""), result.stdout + result.stderr


def test_a_modelopt_export_whose_config_lacks_the_quantization_config_keeps_hf_quant_config_in_the_guard(
        tmp_path: Path, testdata: Path) -> None:
    """Older ModelOpt exports say NVFP4 only in hf_quant_config.json: the guard then carries that file's content, so
    that a quantization method registered for the folder still learns what the source was."""
    import shutil

    source = shutil.copytree(testdata / SHARED_NAMES["modelopt"], tmp_path / "source")
    config = json.loads((source / "config.json").read_text())
    del config["quantization_config"]
    (source / "config.json").write_text(json.dumps(config, indent=2))
    out = tmp_path / "prepared"
    with open_checkpoint(source) as checkpoint:
        assert checkpoint.format == "modelopt"
        prepare_checkpoint(checkpoint, out, [prepare], "flashinfer_trtllm", profile="vllm-0.33")
    guard = json.loads((out / "config.json").read_text())["quantization_config"]
    assert guard["original_hf_quant_config"] == json.loads((source / "hf_quant_config.json").read_text())
    assert "original_quantization_config" not in guard
    with open_prepared(out) as prepared:
        assert prepared.original_config() == config
    assert verify_prepared(out, source) == []
