"""The vLLM 0.33.0 loader (``nvfp4_prep.engines.vllm``) against vLLM itself, on CPU, before any kernel runs.

``tests/reference/vllm_loader.py`` runs once under ``.venv-vllm`` (vLLM 0.33.0 with our package installed, as
``.ci/env-vllm`` builds it) and reports what it saw; skipped without that environment, failed under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nvfp4_prep.server.config import ServeConfig
from nvfp4_prep.server.server import PrepServer
from tests.helpers.vllm_reference import ROOT, STARTUP_S, _python

PLACED = ["w13_input_scale", "w13_weight", "w13_weight_scale", "w13_weight_scale_2",
          "w2_input_scale", "w2_weight", "w2_weight_scale", "w2_weight_scale_2"]


def _prepare(source: Path, out: Path, *flags: str) -> Path:
    made = subprocess.run([str(Path(sys.executable).parent / "nvfp4-prep"), "prepare", str(source), "--backend",
                           "flashinfer_trtllm", "--profile", "vllm-0.33", "--out", str(out), "--quiet", *flags],
                          capture_output=True, text=True, timeout=STARTUP_S)
    assert made.returncode == 0, made.stderr
    return out


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> dict:
    python = _python()
    scratch = tmp_path_factory.mktemp("vllm-loader")
    out, source = scratch / "seen.json", testdata / "qwen3moe_modelopt_nvfp4"
    folder = _prepare(source, scratch / "prepared")
    ct_folder = _prepare(testdata / "qwen3moe_ct_nvfp4", scratch / "prepared-ct")
    rank_set = _prepare(source, scratch / "ranks", "--ep-size", "2")
    # A real server on loopback, run here (main environment); the reference's ServerSource streams from it.
    server = PrepServer(ServeConfig(host="127.0.0.1", port=0, devices=("cpu",), memory_budget=1 << 30,
                                    metrics_port=0, allowed_roots=(testdata,))).start()
    try:
        run = subprocess.run([str(python), "-m", "tests.reference.vllm_loader", str(out), str(folder),
                              str(ct_folder), str(rank_set), server.address, str(source)], cwd=ROOT,
                             capture_output=True, text=True, timeout=STARTUP_S,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        server.stop(grace=0)
    assert run.returncode == 0, f"the vLLM loader reference failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return json.loads(out.read_text()) | {"paths": {"prepared": str(folder)}}


def test_the_entry_point_is_discovered_and_registers_the_load_format(seen: dict) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"]["vllm.general_plugins"]
    assert seen["entry_points"]["nvfp4_prep"] == declared["nvfp4_prep"] == "nvfp4_prep.engines.vllm:register"
    assert seen["loader_class"] == "nvfp4_prep.engines.vllm.loader.PreparedModelLoader"


@pytest.mark.parametrize("model", ["qwen3_moe", "mixtral"])
def test_our_names_are_the_parameters_vllm_creates(model: str, seen: dict) -> None:
    case = seen["models"][model]
    assert case["created"] == PLACED  # vLLM's create_weights, sorted
    assert sorted(case["placed"]) == case["created"]
    # vLLM's post-load step adds g1_scale_c; the other derived scalars live on its quant config.
    assert sorted(set(case["ended"]) - set(case["created"])) == ["g1_scale_c"]
    assert set(case["derived"]) == {"g1_alphas", "g2_alphas", "a1_gscale", "a2_gscale", "g1_scale_c"}


@pytest.mark.parametrize("model", ["qwen3_moe", "mixtral"])
def test_placed_layer_ends_as_vllms_own_post_load_leaves_it(model: str, seen: dict) -> None:
    case = seen["models"][model]
    assert case["differences"] == []
    for name, (ours, theirs) in case["sizes"].items():
        assert ours == theirs, name
    assert case["hook_removed"]


def test_unpadded_tensors_are_copied_into_the_existing_parameters(seen: dict) -> None:
    case = seen["models"]["qwen3_moe"]  # H 512, I 256: TRT-LLM pads nothing
    assert {"w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"} <= set(case["kept_storage"])
    assert case["reshaped"] == ["w13_input_scale", "w13_weight_scale_2"]  # [E, 2] -> [E], as vLLM's own step


def test_padded_tensors_take_vllms_padded_shapes(seen: dict) -> None:
    case = seen["models"]["mixtral"]  # H 384 -> 512, I 160 -> 192
    assert case["expectation"] == {"hidden_padded": 512, "intermediate_padded": 192}
    assert {"w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"} <= set(case["reshaped"])


def test_a_prepared_folder_is_placed_layer_by_layer(seen: dict, testdata: Path) -> None:
    from safetensors import safe_open

    folder = seen["folder"]
    assert folder["prefixes"] == folder["placed"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    with safe_open(testdata / "qwen3moe_modelopt_nvfp4" / "model.safetensors", framework="pt") as source:
        carried = sorted(name for name in source.keys() if ".mlp.experts." not in name)
    assert folder["other_tensors"] == carried


@pytest.mark.parametrize("backend", ["flashinfer_cutlass", "flashinfer_cutedsl", "vllm_cutlass"])
def test_other_backends_are_refused_saying_what_vllm_would_need(backend: str, seen: dict) -> None:
    case = seen["refusals"][f"backend {backend}"]
    assert case["selected"] != "FLASHINFER_TRTLLM"
    assert case["message"] is not None
    assert f"vLLM selected {case['selected']}" in case["message"]
    assert "only on FLASHINFER_TRTLLM" in case["message"] and "would need" in case["message"]


def test_compressed_tensors_is_refused_saying_what_vllm_would_need(seen: dict) -> None:
    case = seen["refusals"]["compressed-tensors"]
    assert case["message"] is not None
    assert "CompressedTensorsW4A4Nvfp4MoEMethod" in case["message"] and "compressed-tensors" in case["message"]
    assert "would need" in case["message"]


def test_another_vllm_version_is_refused_by_name(seen: dict) -> None:
    refusals = seen["refusals"]
    assert "no profile for vLLM 0.34.0" in refusals["vllm 0.34.0"]
    assert "no profile for vLLM 0.32.1" in refusals["loader vllm 0.32.1"]
    assert refusals["vllm 0.33.0"] is None


@pytest.mark.parametrize(("case", "field"), [
    ("profile seed", "layout record profile"),
    ("record backend", "layout record backend"),
    ("record shard", "layout record ep_rank"),
    ("record sizes", "layout record intermediate_dim_unpadded"),
    ("tensor shape", "experts.w2_weight"),
    ("tensor dtype", "experts.w13_weight_scale"),
    ("tensor missing", "tensors"),
])
def test_a_mismatch_is_refused_before_any_byte_moves(case: str, field: str, seen: dict) -> None:
    refusal = seen["refusals"][case]
    assert refusal["message"] is not None and refusal["message"].startswith("model.layers.0.mlp.experts")
    assert field in refusal["message"]
    assert refusal["untouched"]


def test_a_matching_layer_is_placed(seen: dict) -> None:
    refusal = seen["refusals"]["placed with the record"]
    assert refusal["message"] is None and not refusal["untouched"]  # the same check, for the case it must pass


def test_derived_scalars_vllm_disagrees_with_are_refused(seen: dict) -> None:
    assert "g1_scale_c" in seen["refusals"]["derived g1_scale_c"]


def test_stock_vllm_refuses_the_prepared_folder_and_our_plugin_makes_it_a_quantization_method(seen: dict) -> None:
    case = seen["quantization"]
    assert "Unknown quantization method: nvfp4_prep" in case["unplugged"]  # same process, before the plugins
    assert case["registered"] == "nvfp4_prep.engines.vllm.quant_config.PreparedQuantConfig"
    assert case["model_quantization"] == "nvfp4_prep" and case["source_quantization"] == "modelopt_fp4"
    assert case["quant_config"] == case["registered"] and case["name"] == "nvfp4_prep"


def test_our_quant_config_is_vllms_modelopt_config_of_the_source(seen: dict) -> None:
    case = seen["quantization"]
    assert case["is_modelopt_nvfp4"] and case["same_fields_as_modelopt"]
    config = json.loads((Path(seen["paths"]["prepared"]) / "config.json").read_text())
    assert case["layout_id"] == config["quantization_config"]["layout_id"]
    # each layer gets the method vLLM's own ModelOpt config gives it for the source checkpoint
    for prefix, (ours, modelopt) in case["methods"].items():
        assert ours == modelopt, prefix
    assert case["methods"]["model.layers.0.mlp.experts"][0] == "ModelOptNvFp4FusedMoE"
    assert case["methods"]["model.layers.0.self_attn.o_proj"][0] == "ModelOptLinearMethod"
    assert case["methods"]["lm_head"][0] == "UnquantizedLinearMethod"  # excluded by the source's config


def test_an_older_modelopt_source_s_hf_quant_config_in_the_guard_gives_modelopt_s_config(seen: dict) -> None:
    assert seen["quantization"]["from_hf_quant_config"]


def test_our_quantization_method_without_a_prepared_folder_is_refused(seen: dict) -> None:
    message = seen["quantization"]["without_guard"]
    assert message.startswith("quantization: ") and "point vLLM at a prepared folder" in message


def test_a_prepared_compressed_tensors_folder_is_refused_as_the_loader_refuses_it(seen: dict) -> None:
    message = seen["quantization"]["compressed_tensors"]
    assert "quantization_config.original_quantization_config: " in message
    loader_says = seen["refusals"]["compressed-tensors"]["message"]
    assert loader_says.split("quantization method: ", 1)[1] in message  # the loader's own words, after its field


def test_a_prepared_folder_under_another_load_format_is_refused(seen: dict) -> None:
    message = seen["quantization"]["wrong_format"]
    assert message.startswith("load_format: ") and "--load-format nvfp4_prep, not 'auto'" in message


def test_the_server_source_hands_placement_what_the_folder_source_does(seen: dict) -> None:
    case = seen["server"]
    assert case["placed"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert case["differences"] == []
    assert set(PLACED) < set(case["names"])  # compared tensor by tensor, byte for byte, with the layout records


def test_each_route_picks_its_source(seen: dict) -> None:
    routes = seen["routes"]
    assert routes["prepared model"] == ["FolderSource", seen["paths"]["prepared"]]
    assert routes["rank folder for ep rank 1"] == "tp0of1-ep1of2"  # vLLM pointed at the ep rank 0 folder
    assert routes["prepared model with keys"].startswith("model_loader_extra_config: ")
    assert "is a prepared folder" in routes["prepared model with keys"]
    assert 'exactly one of "prepared"' in routes["source without keys"]
    assert "'modelopt_fp4'" in routes["source without keys"]


@pytest.mark.parametrize(("case", "words"), [
    ("config empty", 'exactly one of "prepared"'),
    ("config both", 'exactly one of "prepared"'),
    ("config unknown key", "unexpected keys ['tls_ca']"),
    ("config missing folder", "model_loader_extra_config.prepared: expected a folder"),
    ("config timeout", "model_loader_extra_config.timeout"),
])
def test_bad_loader_config_is_refused_naming_the_field(case: str, words: str, seen: dict) -> None:
    assert words in seen["refusals"][case]
    assert seen["refusals"]["config folder"] == "FolderSource"
