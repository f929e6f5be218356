"""Shared fixtures: real in-process servers on loopback, raw stubs, random layers in both tensor forms."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from nvfp4_prep.server.config import ServeConfig
from nvfp4_prep.server.server import PrepServer
from nvfp4_prep.v1 import prep_pb2_grpc
from tests.helpers.checkpoint_factory import SHARED_NAMES
from tests.helpers.layer_factory import random_layer

GATED = ("swiglu", "swigluoai")
# The real checkpoints of shared/testdata: beside the checkout (as CI lays it out), else where the sessions have it.
TESTDATA_CANDIDATES = (Path(__file__).resolve().parents[2] / "shared" / "testdata", Path("/work/shared/testdata"))


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The folder of the real test checkpoints (qwen3moe_modelopt_nvfp4, qwen3moe_ct_nvfp4, ...)."""
    for candidate in TESTDATA_CANDIDATES:
        if (candidate / "qwen3moe_modelopt_nvfp4").is_dir():
            return candidate
    raise FileNotFoundError(f"shared/testdata not found at {[str(c) for c in TESTDATA_CANDIDATES]}")


@pytest.fixture
def start_server() -> Iterator[Callable[..., PrepServer]]:
    """``start_server(**ServeConfig fields)``: a started server on 127.0.0.1, port 0 unless given.

    Every server started is stopped at teardown. Defaults: cpu, 1GiB budget, no cache, no metrics port.
    """
    servers: list[PrepServer] = []

    def start(**fields) -> PrepServer:
        fields = {"host": "127.0.0.1", "port": 0, "devices": ("cpu",), "memory_budget": 1 << 30, "metrics_port": 0,
                  **fields}
        server = PrepServer(ServeConfig(**fields)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0)


@pytest.fixture
def prep_server(start_server: Callable[..., PrepServer]) -> PrepServer:
    """A running cpu server with default settings."""
    return start_server()


@pytest.fixture
def prep_address(prep_server: PrepServer) -> str:
    """``host:port`` of ``prep_server``."""
    return prep_server.address


@pytest.fixture
def raw_stub() -> Iterator[Callable[[str], prep_pb2_grpc.PrepStub]]:
    """``raw_stub(address)``: a generated stub, for tests that must send what the SDK never would."""
    channels: list[grpc.Channel] = []

    def make(address: str) -> prep_pb2_grpc.PrepStub:
        channel = grpc.insecure_channel(address)
        channels.append(channel)
        return prep_pb2_grpc.PrepStub(channel)

    yield make
    for channel in channels:
        channel.close()


@pytest.fixture
def make_layer() -> Callable[..., dict[str, torch.Tensor]]:
    """``make_layer(experts=2, hidden=256, inter=128, activation="swiglu", seed=0)``: a random stacked layer."""

    def make(experts: int = 2, hidden: int = 256, inter: int = 128, activation: str = "swiglu",
             seed: int = 0) -> dict[str, torch.Tensor]:
        return random_layer(experts, hidden, inter, gated=activation in GATED, seed=seed)

    return make


def split_experts(stacked: dict[str, torch.Tensor], fmt: str = "modelopt") -> dict[str, torch.Tensor]:
    """The per-expert checkpoint tensors (keys relative to the experts prefix) of a gated stacked layer.

    ``fmt`` "modelopt" stores global and input scales as they are, "compressed-tensors"
    as float32 reciprocals (SPEC section 2), so that stacking them back gives ``stacked``.
    """
    experts, n1, _ = stacked["w13_weight"].shape
    inter = n1 // 2
    names = {
        "modelopt": ("gate_proj", "up_proj", "down_proj", "weight", "weight_scale_2", "input_scale"),
        "compressed-tensors": ("w1", "w3", "w2", "weight_packed", "weight_global_scale", "input_global_scale"),
    }[fmt]
    gate, up, down, weight, global_name, input_name = names

    def scalar(value: torch.Tensor) -> torch.Tensor:
        value = value.reshape(()).clone()
        return torch.reciprocal(value) if fmt == "compressed-tensors" else value

    out: dict[str, torch.Tensor] = {}
    for e in range(experts):
        for proj, rows, column in ((gate, slice(0, inter), 0), (up, slice(inter, n1), 1)):
            out[f"{e}.{proj}.{weight}"] = stacked["w13_weight"][e, rows].clone()
            out[f"{e}.{proj}.weight_scale"] = stacked["w13_weight_scale"][e, rows].clone()
            ws13, a13 = stacked["w13_weight_scale_2"][e], stacked["w13_input_scale"][e]
            out[f"{e}.{proj}.{global_name}"] = scalar(ws13[column] if ws13.dim() else ws13)
            out[f"{e}.{proj}.{input_name}"] = scalar(a13[column] if a13.dim() else a13)
        out[f"{e}.{down}.{weight}"] = stacked["w2_weight"][e].clone()
        out[f"{e}.{down}.weight_scale"] = stacked["w2_weight_scale"][e].clone()
        out[f"{e}.{down}.{global_name}"] = scalar(stacked["w2_weight_scale_2"][e])
        out[f"{e}.{down}.{input_name}"] = scalar(stacked["w2_input_scale"][e])
    return out


@pytest.fixture
def per_expert() -> Callable[..., dict[str, torch.Tensor]]:
    """``per_expert(stacked, fmt="modelopt")``: see ``split_experts``."""
    return split_experts


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same names in the same order, same dtypes and shapes, same bytes."""
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name].contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), name


@pytest.fixture
def same_tensors() -> Callable[[dict, dict], None]:
    """``same_tensors(got, want)``: asserts bit-identical tensor dicts (names, order, dtypes, shapes, bytes)."""
    return assert_same_tensors


@pytest.fixture
def shared(testdata: Path) -> dict[str, Path]:
    """Format name -> the real checkpoint of that format in shared/testdata."""
    return {fmt: testdata / name for fmt, name in SHARED_NAMES.items()}


@pytest.fixture
def ct_checkpoint(shared: dict[str, Path]) -> Path:
    """shared/testdata/qwen3moe_ct_nvfp4 (compressed-tensors)."""
    return shared["compressed-tensors"]


@pytest.fixture
def modelopt_checkpoint(shared: dict[str, Path]) -> Path:
    """shared/testdata/qwen3moe_modelopt_nvfp4 (ModelOpt)."""
    return shared["modelopt"]
