"""The committed stubs are what protoc makes from the committed .proto files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from nvfp4_prep.v1 import prep_pb2

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", PROTO_ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    generator = _generator()
    written = generator.generate(tmp_path)
    assert written, "protoc wrote nothing"
    for path in written:
        relative = path.relative_to(tmp_path)
        committed = PROTO_ROOT / relative
        assert committed.exists(), f"{relative} is not committed; run: python proto/generate.py"
        assert committed.read_bytes() == path.read_bytes(), f"{relative} is stale; run: python proto/generate.py"


def test_contract_package_and_methods() -> None:
    assert prep_pb2.DESCRIPTOR.package == "nvfp4_prep.v1"
    service = prep_pb2.DESCRIPTOR.services_by_name["Prep"]
    prepare = service.methods_by_name["Prepare"]
    assert prepare.client_streaming and prepare.server_streaming
    capabilities = service.methods_by_name["GetCapabilities"]
    assert not capabilities.client_streaming and not capabilities.server_streaming
    header = prep_pb2.PrepareHeader.DESCRIPTOR
    assert [f.name for f in header.oneofs_by_name["source"].fields] == ["tensors", "ref"]
