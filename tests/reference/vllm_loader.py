"""Our vLLM loader (``nvfp4_prep.engines.vllm``) against vLLM 0.33.0 itself, on CPU: what happens before kernels run.

Runs inside ``.venv-vllm`` (``.ci/env-vllm`` installs our package there, so its entry point is visible), with
``vllm_moe``'s CPU stand-ins for the GPU queries (a B200, capability 10.0) and one real gloo rank:

    python -m tests.reference.vllm_loader OUT.json PREPARED_FOLDER CT_FOLDER RANK_SET SERVER SOURCE

writes one JSON object of observations (``tests/engines/test_vllm_loader.py`` asserts on them):

- ``entry_points``: the ``vllm.general_plugins`` entry points; ``loader_class``: what vLLM's
  ``get_model_loader(LoadConfig(load_format="nvfp4_prep"))`` returns after its own ``load_general_plugins()``.
- ``models``: for a small Qwen3-MoE and a small Mixtral MoE layer (vLLM's ``FusedMoEConfig``,
  ``ModelOptNvFp4Config``, ``ModelOptNvFp4FusedMoE`` with ``--moe-backend flashinfer_trtllm``, parameters from its
  own ``create_weights``): the parameter names vLLM creates and ends with; our layer after our pre-checks,
  placement and vLLM's post-load step in its pre-processed mode, against a second layer that vLLM's normal
  post-load step prepared from the same stacked input (every parameter, the quant config's kernel scalars and
  the sizes, byte for byte); which parameters kept their storage.
- ``folder``: ``PREPARED_FOLDER`` (shared/testdata's Qwen3-MoE, prepared for flashinfer_trtllm / vllm-0.33) read
  through the loader's ``FolderSource``: its layers, each placed on a layer of vLLM's and post-loaded (the
  post-load check compares what vLLM derived with the folder's scalars), the carried-over tensor names.
- ``quantization``: vLLM's own resolution of ``PREPARED_FOLDER`` as the model: ``ModelConfig`` before our
  plugins are loaded (refused) and after (accepted as ``nvfp4_prep``), the class ``get_quantization_config``
  returns, the quant config ``VllmConfig`` builds (its ModelOpt fields against the source's own
  ``ModelOptNvFp4Config``) and the methods it gives a linear layer, an excluded one and a routed-experts layer;
  the refusals of a compressed-tensors folder (``CT_FOLDER``) and of another load format.
- ``server``: the loader's ``ServerSource`` against a real nvfp4-prep server (``SERVER``, reading ``SOURCE``):
  each layer's tensors and layout record against ``FolderSource``'s of the same checkpoint, profile and
  backend, then placed and post-loaded like the folder's. ``routes``: which source each route picks, and the
  rank folder chosen from ``RANK_SET`` when vLLM is pointed at one rank's folder.
- ``refusals``: the message of each refusal (backends, compressed-tensors, vLLM version, layout record fields,
  tensor shapes, derived scalars, loader config), or ``null`` where nothing was refused; for refusals before
  placement, whether the layer's parameters were untouched.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import sys
import tempfile
from collections.abc import Callable

import torch
from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.config.load import LoadConfig
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEParallelConfig, RoutingMethodType
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w4a4_nvfp4 import (  # noqa: E501
    CompressedTensorsW4A4Nvfp4MoEMethod,
)
from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config, ModelOptNvFp4FusedMoE
from vllm.model_executor.model_loader import get_model_loader
from vllm.plugins import load_general_plugins

from nvfp4_prep.engines.vllm.checks import PreparedLoadRefused, check_layout, check_tensors, check_vllm_version
from nvfp4_prep.engines.vllm.layer_state import check_method, expectation
from nvfp4_prep.engines.vllm.loader import PreparedModelLoader
from nvfp4_prep.engines.vllm.params import SLOTS
from nvfp4_prep.engines.vllm.placement import defer_post_load, place
from nvfp4_prep.engines.vllm.quant_config import PreparedQuantConfig
from nvfp4_prep.engines.vllm.source import FolderSource, ServerSource, source_from_config
from nvfp4_prep.pipeline import prepare
from tests.helpers.layer_factory import random_layer
from tests.reference.vllm_moe import BACKENDS, MinimalLayer, _load, cpu_stand_ins

PREFIX = "model.layers.0.mlp.experts"
# Small configs of the two architectures (experts, hidden, moe intermediate, vLLM activation): Qwen3-MoE as
# shared/testdata's qwen3moe checkpoint (no padding); Mixtral-like sizes that TRT-LLM pads (H 384, I 160).
MODELS = {"qwen3_moe": (8, 512, 256, "silu"), "mixtral": (8, 384, 160, "silu")}


def moe_config(experts: int, hidden: int, inter: int, activation: str, backend: str) -> FusedMoEConfig:
    return FusedMoEConfig(
        num_experts=experts, experts_per_token=2, hidden_dim=hidden, intermediate_size=inter,
        num_local_experts=experts, num_logical_experts=experts, activation=MoEActivation.from_str(activation),
        device="cpu", routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(), in_dtype=torch.bfloat16,
        moe_backend=BACKENDS[backend])


def build(model: str, backend: str = "flashinfer_trtllm") -> tuple[MinimalLayer, ModelOptNvFp4FusedMoE]:
    """vLLM's own method and the parameters its create_weights registers, as RoutedExperts would."""
    experts, hidden, inter, activation = MODELS[model]
    moe = moe_config(experts, hidden, inter, activation, backend)
    quant = ModelOptNvFp4Config(quant_method="NVFP4", is_checkpoint_nvfp4_serialized=True, group_size=16)
    method = ModelOptNvFp4FusedMoE(quant, moe)
    layer = MinimalLayer(moe)
    layer.quant_method = method
    method.create_weights(layer, experts, hidden, inter, torch.bfloat16, weight_loader=None,
                          global_num_experts=experts)
    return layer, method


def stacked(model: str) -> dict[str, torch.Tensor]:
    experts, hidden, inter, _ = MODELS[model]
    return random_layer(experts, hidden, inter, seed=hidden + inter)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def state(layer: MinimalLayer, method: ModelOptNvFp4FusedMoE) -> dict[str, torch.Tensor]:
    """Everything the kernel reads: the layer's parameters and the quant config's tensors."""
    out = {f"layer.{name}": p for name, p in layer.named_parameters()}
    for name in ("g1_alphas", "g2_alphas", "a1_gscale", "a2_gscale", "w1_scale", "w2_scale"):
        out[f"quant_config.{name}"] = getattr(method.moe_quant_config, name)
    return out


def differences(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> list[str]:
    found = [f"{name}: only in {'ours' if name in ours else 'vLLM'}" for name in sorted(set(ours) ^ set(theirs))]
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            found.append(f"{name}: ours {list(a.shape)} {a.dtype}, vLLM {list(b.shape)} {b.dtype}")
        elif not torch.equal(as_bytes(a), as_bytes(b)):
            found.append(f"{name}: bytes differ")
    return found


SIZES = ("hidden_dim", "hidden_dim_unpadded", "intermediate_size_per_partition")


def model_case(model: str) -> dict:
    reference, reference_method = build(model)
    created = sorted(name for name, _ in reference.named_parameters())
    _load(reference, stacked(model))
    reference_method.process_weights_after_loading(reference)  # vLLM's normal path: it prepares the layer
    ended = sorted(name for name, _ in reference.named_parameters())

    layer, method = build(model)
    before = {name: p.data_ptr() for name, p in layer.named_parameters()}
    shapes_before = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    expected = expectation(layer, method, PREFIX)
    prepared = prepare(stacked(model), "flashinfer_trtllm", "swiglu", profile="vllm-0.33")
    check_layout(prepared.layout, expected)
    check_tensors(prepared.tensors, expected)
    place(layer, prepared.tensors)
    defer_post_load(method, prepared.tensors, prepared.layout, expected)
    method.process_weights_after_loading(layer)  # what vLLM's model-wide post-load loop calls
    kept = sorted(name for name, ptr in before.items()
                  if getattr(layer, name).data_ptr() == ptr and tuple(getattr(layer, name).shape) == shapes_before[name]
                  )
    return {
        "created": created, "ended": ended,
        "placed": [slot.name for slot in SLOTS if slot.placed],
        "derived": [slot.name for slot in SLOTS if not slot.placed],
        "differences": differences(state(layer, method), state(reference, reference_method)),
        "sizes": {name: [getattr(layer.moe_config, name), getattr(reference.moe_config, name)] for name in SIZES},
        "kept_storage": kept,
        "reshaped": sorted(name for name in before if tuple(getattr(layer, name).shape) != shapes_before[name]),
        "hook_removed": "process_weights_after_loading" not in vars(method),
        "expectation": {"hidden_padded": expected.hidden_padded, "intermediate_padded": expected.intermediate_padded},
    }


TESTDATA_LAYERS = ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")


def testdata_layers() -> dict[str, tuple[MinimalLayer, ModelOptNvFp4FusedMoE, object]]:
    """Prefix -> (layer, method, expectation) of layers vLLM made for the testdata checkpoint's sizes."""
    layers = {}
    for prefix in TESTDATA_LAYERS:
        layer, method = build("qwen3_moe")
        layers[prefix] = (layer, method, expectation(layer, method, prefix))
    return layers


def place_from(source: FolderSource | ServerSource, layers: dict) -> tuple[list[str], dict[str, dict]]:
    """The loader's order per layer (record, tensors, placement, vLLM's post-load); the tensors taken."""
    placed, taken = [], {}
    for prefix, (layer, method, expected) in layers.items():
        tensors, layout = source.layer(expected, "cpu")
        check_layout(layout, expected)
        check_tensors(tensors, expected)
        taken[prefix] = {"tensors": {name: t.clone() for name, t in tensors.items()}, "layout": layout}
        place(layer, tensors)
        defer_post_load(method, tensors, layout, expected)
        method.process_weights_after_loading(layer)
        placed.append(prefix)
    return placed, taken


def folder_case(path: str) -> tuple[dict, dict[str, dict]]:
    """The loader's folder path, layer by layer, on layers vLLM made for the testdata checkpoint's sizes."""
    source = FolderSource(path)
    layers = testdata_layers()
    try:
        source.open(next(iter(layers.values()))[2])
        prefixes = sorted(source.prefixes())
        for prefix, (_, _, expected) in layers.items():
            check_layout(source.layout(prefix), expected)
        placed, taken = place_from(source, layers)
        others = sorted(name for name, _ in source.other_weights())
    finally:
        source.close()
    return {"prefixes": prefixes, "placed": placed, "other_tensors": others}, taken


def server_case(address: str, location: str, from_folder: dict[str, dict]) -> dict:
    """``ServerSource`` against a real server: what it hands to placement, against the folder's for each layer."""
    source = ServerSource(address, location, timeout=300)
    layers = testdata_layers()
    try:
        source.open(next(iter(layers.values()))[2])
        placed, taken = place_from(source, layers)
    finally:
        source.close()
    found = []
    for prefix, folder in from_folder.items():
        served = taken[prefix]
        if served["layout"] != folder["layout"]:
            found.append(f"{prefix}: layout record {served['layout']} != {folder['layout']}")
        found += [f"{prefix}.{difference}" for difference in differences(served["tensors"], folder["tensors"])]
    return {"placed": placed, "differences": found, "names": sorted(taken[TESTDATA_LAYERS[0]]["tensors"])}


def refused_any(action: Callable[[], object]) -> str | None:
    """The message of whatever ``action`` raises (vLLM wraps some in its own errors), None when nothing."""
    try:
        action()
    except Exception as error:
        return " ".join(str(error).split())
    return None


def model_config(folder: str) -> ModelConfig:
    return ModelConfig(model=folder, tokenizer=folder)


def fields(config: object) -> dict:
    return {name: value for name, value in vars(config).items() if name != "guard"}


def routed_experts(model: str) -> RoutedExperts:
    """An object of vLLM's RoutedExperts class carrying only what ``get_quant_method`` reads (its moe_config)."""
    layer = RoutedExperts.__new__(RoutedExperts)
    torch.nn.Module.__init__(layer)
    layer.moe_config = moe_config(*MODELS[model], "flashinfer_trtllm")
    return layer


def quant_methods(prepared: VllmConfig, stock: VllmConfig) -> dict[str, list[str]]:
    """Prefix -> the method class our quant config and the source's ModelOpt one give that layer (under
    ``cpu_stand_ins``: ModelOpt's MoE method selects its backend as on a B200)."""
    linear = ReplicatedLinear(512, 512, bias=False, quant_config=None, prefix="lm_head")
    with set_current_vllm_config(prepared):
        return {prefix: [type(config.quant_config.get_quant_method(layer, prefix)).__name__
                         for config in (prepared, stock)]
                for prefix, layer in {"model.layers.0.self_attn.o_proj": linear, "lm_head": linear,
                                      PREFIX: routed_experts("qwen3_moe")}.items()}


def quantization_case(folder: str, ct_folder: str, source: str,
                      unplugged: str | None) -> tuple[dict, VllmConfig, VllmConfig]:
    """vLLM's own config resolution of the prepared folder as the model, with our plugins loaded; the prepared
    folder's and the source's VllmConfig."""
    prepared = VllmConfig(model_config=model_config(folder), load_config=LoadConfig(load_format="nvfp4_prep"),
                          device_config=DeviceConfig("cpu"))
    stock = VllmConfig(model_config=model_config(source), device_config=DeviceConfig("cpu"))
    ours, theirs = prepared.quant_config, stock.quant_config
    other_format = VllmConfig(model_config=model_config(folder), device_config=DeviceConfig("cpu"))
    linear = ReplicatedLinear(512, 512, bias=False, quant_config=None, prefix="lm_head")
    with set_current_vllm_config(other_format):
        wrong_format = refused(lambda: other_format.quant_config.get_quant_method(linear, "lm_head"))
    with open(os.path.join(source, "hf_quant_config.json"), encoding="utf-8") as handle:
        hf_quant = json.load(handle)  # an older ModelOpt export: config.json without, this file beside it
    file_guard = {key: value for key, value in ours.guard.items() if key != "original_quantization_config"}
    from_file = PreparedQuantConfig.from_config({**file_guard, "original_hf_quant_config": hf_quant})
    return {
        "unplugged": unplugged,
        "registered": f"{get_quantization_config('nvfp4_prep').__module__}."
                      f"{get_quantization_config('nvfp4_prep').__qualname__}",
        "model_quantization": prepared.model_config.quantization,
        "source_quantization": stock.model_config.quantization,
        "quant_config": f"{type(ours).__module__}.{type(ours).__qualname__}",
        "is_modelopt_nvfp4": isinstance(ours, ModelOptNvFp4Config),
        "name": ours.get_name(),
        "same_fields_as_modelopt": fields(ours) == fields(theirs),
        "layout_id": ours.guard["layout_id"],
        "compressed_tensors": refused_any(lambda: VllmConfig(
            model_config=model_config(ct_folder), load_config=LoadConfig(load_format="nvfp4_prep"),
            device_config=DeviceConfig("cpu"))),
        "wrong_format": wrong_format,
        "from_hf_quant_config": fields(from_file) == fields(ModelOptNvFp4Config.from_config(hf_quant)),
        "without_guard": refused(lambda: PreparedQuantConfig().get_quant_method(linear, "lm_head")),
    }, prepared, stock


def route_cases(folder: str, rank_set: str) -> dict:
    """Which source each route picks: the model itself when it is a prepared folder, this rank's of a set."""
    picked = source_from_config({}, folder, "nvfp4_prep")
    rank0 = os.path.join(rank_set, "tp0of1-ep0of2")
    layer, method = build("qwen3_moe")
    second = dataclasses.replace(expectation(layer, method, PREFIX), ep_rank=1, ep_size=2, experts=4,
                                 expert_ids=(4, 5, 6, 7))
    from_rank0 = source_from_config({}, rank0, "nvfp4_prep")
    try:
        from_rank0.open(second)
        chosen = from_rank0._folder.directory.name
    finally:
        from_rank0.close()
    return {
        "prepared model": [type(picked).__name__, str(picked.path)],
        "rank folder for ep rank 1": chosen,
        "prepared model with keys": refused(lambda: source_from_config({"prepared": folder}, folder, "nvfp4_prep")),
        "source without keys": refused(lambda: source_from_config({}, "/model", "modelopt_fp4")),
    }


def refused(action: Callable[[], object]) -> str | None:
    try:
        action()
    except PreparedLoadRefused as refusal:
        return str(refusal)
    return None


def untouched_after(action: Callable[[MinimalLayer, ModelOptNvFp4FusedMoE], object]) -> dict:
    """Refusal message of ``action`` on a fresh layer, and whether its parameters stayed as they were."""
    layer, method = build("mixtral")
    for p in layer.parameters():
        as_bytes(p.data).fill_(0)
    before = {name: (p.data_ptr(), tuple(p.shape), as_bytes(p).clone()) for name, p in layer.named_parameters()}
    message = refused(lambda: action(layer, method))
    same = all((p.data_ptr(), tuple(p.shape)) == before[n][:2] and torch.equal(as_bytes(p), before[n][2])
               for n, p in layer.named_parameters())
    return {"message": message, "untouched": same}


def checked_place(tensors: dict, layout: dict) -> Callable[[MinimalLayer, ModelOptNvFp4FusedMoE], None]:
    """The loader's order for one layer: record, then tensors, and only then placement."""
    def run(layer: MinimalLayer, method: ModelOptNvFp4FusedMoE) -> None:
        expected = expectation(layer, method, PREFIX)
        check_layout(layout, expected)
        check_tensors(tensors, expected)
        place(layer, tensors)
    return run


def refusal_cases() -> dict:
    layer = stacked("mixtral")
    good = prepare(layer, "flashinfer_trtllm", "swiglu", profile="vllm-0.33")
    cases: dict[str, object] = {}
    for backend in ("flashinfer_cutlass", "flashinfer_cutedsl", "vllm_cutlass"):
        _, method = build("qwen3_moe", backend)
        cases[f"backend {backend}"] = {"selected": method.nvfp4_backend.value,
                                       "message": refused(lambda m=method: check_method(m, PREFIX))}
    experts, hidden, inter, activation = MODELS["qwen3_moe"]
    ct = CompressedTensorsW4A4Nvfp4MoEMethod(moe_config(experts, hidden, inter, activation, "flashinfer_trtllm"))
    cases["compressed-tensors"] = {"selected": ct.nvfp4_backend.value, "message": refused(lambda: check_method(ct,
                                                                                                              PREFIX))}
    cases["vllm 0.34.0"] = refused(lambda: check_vllm_version("0.34.0"))
    cases["vllm 0.33.0"] = refused(lambda: check_vllm_version("0.33.0"))
    cases["loader vllm 0.32.1"] = refused(lambda: PreparedModelLoader(LoadConfig(load_format="nvfp4_prep"),
                                                                       vllm_version="0.32.1"))
    seed = prepare(layer, "flashinfer_trtllm", "swiglu", profile="seed")
    cases["profile seed"] = untouched_after(checked_place(good.tensors, seed.layout))
    cutlass = prepare(random_layer(8, 384, 192, seed=3), "flashinfer_cutlass", "swiglu", profile="vllm-0.33")
    cases["record backend"] = untouched_after(checked_place(good.tensors, cutlass.layout))
    shard = prepare(layer, "flashinfer_trtllm", "swiglu", profile="vllm-0.33", ep_rank=1, ep_size=2)
    cases["record shard"] = untouched_after(checked_place(shard.tensors, shard.layout))
    other = prepare(random_layer(8, 384, 256, seed=5), "flashinfer_trtllm", "swiglu", profile="vllm-0.33")
    cases["record sizes"] = untouched_after(checked_place(other.tensors, other.layout))
    cases["tensor shape"] = untouched_after(checked_place(
        {**good.tensors, "w2_weight": good.tensors["w2_weight"][:, :-1]}, good.layout))
    cases["tensor dtype"] = untouched_after(checked_place(
        {**good.tensors, "w13_weight_scale": good.tensors["w13_weight_scale"].view(torch.uint8)}, good.layout))
    cases["tensor missing"] = untouched_after(checked_place(
        {k: v for k, v in good.tensors.items() if k != "g1_scale_c"}, good.layout))
    cases["placed with the record"] = untouched_after(checked_place(good.tensors, good.layout))

    def derived_differs(layer: MinimalLayer, method: ModelOptNvFp4FusedMoE) -> None:
        tensors = {**good.tensors, "g1_scale_c": good.tensors["g1_scale_c"] * 2}
        checked_place(tensors, good.layout)(layer, method)
        defer_post_load(method, tensors, good.layout, expectation(layer, method, PREFIX))
        method.process_weights_after_loading(layer)
    cases["derived g1_scale_c"] = untouched_after(derived_differs)["message"]
    with tempfile.TemporaryDirectory() as folder:
        for name, config in {"config empty": {}, "config both": {"prepared": folder, "server": "localhost:1"},
                             "config unknown key": {"prepared": folder, "tls_ca": "ca.pem"},
                             "config missing folder": {"prepared": os.path.join(folder, "absent")},
                             "config timeout": {"server": "localhost:1", "timeout": -1}}.items():
            cases[name] = refused(lambda c=config: source_from_config(c, "/model", "modelopt_fp4"))
        cases["config folder"] = type(source_from_config({"prepared": folder}, "/model", "modelopt_fp4")).__name__
    return cases


def main(out_path: str, folder: str, ct_folder: str, rank_set: str, server: str, source: str) -> None:
    config = VllmConfig(device_config=DeviceConfig("cpu"))
    with tempfile.TemporaryDirectory() as scratch, set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{scratch}/rendezvous")
        initialize_model_parallel(1, 1)
        entry_points = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
        unplugged = refused_any(lambda: model_config(folder))  # stock vLLM: our plugins not loaded yet
        load_general_plugins()
        loader = get_model_loader(LoadConfig(load_format="nvfp4_prep", model_loader_extra_config={"prepared": scratch}))
        quantization, prepared, stock = quantization_case(folder, ct_folder, source, unplugged)  # vLLM's CPU platform
        with cpu_stand_ins():
            quantization["methods"] = quant_methods(prepared, stock)
            folder_seen, from_folder = folder_case(folder)
            answer = {
                "entry_points": entry_points,
                "loader_class": f"{type(loader).__module__}.{type(loader).__qualname__}",
                "models": {model: model_case(model) for model in MODELS},
                "folder": folder_seen,
                "server": server_case(server, source, from_folder),
                "quantization": quantization,
                "routes": route_cases(folder, rank_set),
                "refusals": refusal_cases(),
            }
    with open(out_path, "w", encoding="utf-8") as out:
        json.dump(answer, out, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:7])
