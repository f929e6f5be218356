"""Bad checkpoint references: each gets its typed error (and gRPC status), naming what is wrong."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import grpc
import pytest
import torch

from nvfp4_prep.checkpoint import (
    CheckpointError,
    CheckpointInvalid,
    CheckpointNotFound,
    CheckpointPermissionDenied,
    open_checkpoint,
)
from nvfp4_prep.client.errors import PrepClientError
from nvfp4_prep.client.sdk import PrepClient
from nvfp4_prep.pipeline import prepare
from nvfp4_prep.server.status import status_of
from tests.helpers.checkpoint_factory import dense_tensors, moe_layer_tensors, write_checkpoint

PREFIX = "model.layers.0.mlp.experts"


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """(allowed root holding checkpoint 'ckpt', a directory outside it holding checkpoint 'outside')."""
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    tensors = {**dense_tensors(64), **moe_layer_tensors(0, 2, 64, 64)}
    write_checkpoint(root / "ckpt", tensors)
    write_checkpoint(outside / "outside", tensors)
    return root, outside


def expect(error: type[CheckpointError], code: str, location: object, roots: list[Path], *fragments: str) -> str:
    with pytest.raises(error) as info:
        open_checkpoint(location, allowed_roots=roots)
    message = str(info.value)
    assert status_of(info.value).code.name == code
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_checkpoint_inside_the_roots_opens(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    assert open_checkpoint(root / "ckpt", allowed_roots=[root]).moe_layers() == [PREFIX]
    assert open_checkpoint((root / "ckpt").as_uri(), allowed_roots=[root]).moe_layers() == [PREFIX]


def test_path_outside_the_roots_is_denied(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    expect(CheckpointPermissionDenied, "PERMISSION_DENIED", outside / "outside", [root], "outside the allowed roots")
    expect(CheckpointPermissionDenied, "PERMISSION_DENIED", "file:///etc/passwd", [root], "/etc/passwd")


def test_dotdot_escape_is_denied(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    sneaky = f"{root}/ckpt/../../{outside.name}/outside"
    expect(CheckpointPermissionDenied, "PERMISSION_DENIED", sneaky, [root], sneaky, "outside the allowed roots")
    expect(CheckpointPermissionDenied, "PERMISSION_DENIED", f"file://{sneaky}", [root], "outside the allowed roots")


def test_symlink_leaving_the_roots_is_denied(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    (root / "link").symlink_to(outside / "outside", target_is_directory=True)
    expect(CheckpointPermissionDenied, "PERMISSION_DENIED", root / "link", [root], "link", "outside the allowed roots")


def test_symlinked_shard_leaving_the_roots_is_denied(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    ckpt = root / "ckpt"
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(outside / "outside" / "model.safetensors")
    expect(CheckpointPermissionDenied, "PERMISSION_DENIED", ckpt, [root], "model.safetensors")


def _index(ckpt: Path, shard_name: str) -> None:
    header_names = json.loads((ckpt / "model.safetensors").read_bytes()[8:][
        :struct.unpack("<Q", (ckpt / "model.safetensors").read_bytes()[:8])[0]])
    weight_map = {name: shard_name for name in header_names if name != "__metadata__"}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_index_naming_a_shard_outside_the_checkpoint_is_denied(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    ckpt = root / "ckpt"
    _index(ckpt, "../../elsewhere/outside/model.safetensors")
    expect(CheckpointPermissionDenied, "PERMISSION_DENIED", ckpt, [root], "../../elsewhere", "inside the checkpoint")
    _index(ckpt, str(outside / "outside" / "model.safetensors"))
    expect(CheckpointPermissionDenied, "PERMISSION_DENIED", ckpt, None, "inside the checkpoint")


def test_missing_checkpoint_and_missing_shard_are_not_found(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    expect(CheckpointNotFound, "NOT_FOUND", root / "nope", [root], "nope", "does not exist")
    ckpt = root / "ckpt"
    _index(ckpt, "model-00001-of-00002.safetensors")
    expect(CheckpointNotFound, "NOT_FOUND", ckpt, [root], "model-00001-of-00002.safetensors", "does not exist")
    empty = root / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    expect(CheckpointNotFound, "NOT_FOUND", empty, [root], "model.safetensors")


def test_index_naming_a_tensor_its_shard_lacks_is_invalid(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    ckpt = root / "ckpt"
    _index(ckpt, "model.safetensors")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.experts.0.up_proj.bias"] = "model.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    expect(CheckpointInvalid, "INVALID_ARGUMENT", ckpt, [root], "model.layers.0.mlp.experts.0.up_proj.bias")


def _without(tmp_path: Path, drop: callable) -> Path:
    tensors = moe_layer_tensors(0, 4, 64, 32)
    return write_checkpoint(tmp_path / "broken", {k: v for k, v in tensors.items() if not drop(k)})


def test_missing_expert_is_invalid_naming_the_expert(tmp_path: Path) -> None:
    ckpt = _without(tmp_path, lambda name: ".experts.2." in name)
    expect(CheckpointInvalid, "INVALID_ARGUMENT", ckpt, None, PREFIX, "expert 2 is missing")


def test_huge_expert_index_is_invalid_without_enumerating_up_to_it(tmp_path: Path) -> None:
    """Experts 0 and 4000000000: the gap is found from the two indices alone (no 4e9-long range)."""
    tensors = moe_layer_tensors(0, 2, 64, 32)
    renamed = {name.replace(".experts.1.", ".experts.4000000000."): tensor for name, tensor in tensors.items()}
    ckpt = write_checkpoint(tmp_path / "huge", renamed)
    expect(CheckpointInvalid, "INVALID_ARGUMENT", ckpt, None, PREFIX, "expert 1 is missing", "0..4000000000")


def test_missing_projection_is_invalid_naming_it(tmp_path: Path) -> None:
    ckpt = _without(tmp_path, lambda name: ".experts.3.down_proj." in name)
    expect(CheckpointInvalid, "INVALID_ARGUMENT", ckpt, None, f"{PREFIX}.3.down_proj", "projection missing")


def test_missing_projection_tensor_is_invalid_naming_it(tmp_path: Path) -> None:
    ckpt = _without(tmp_path, lambda name: name.endswith(".experts.1.up_proj.weight_scale_2"))
    expect(CheckpointInvalid, "INVALID_ARGUMENT", ckpt, None, f"{PREFIX}.1.up_proj.weight_scale_2", "tensor missing")


def _rewrite(path: Path, edit: callable) -> None:
    path.write_bytes(edit(path.read_bytes()))


def test_truncated_files_are_invalid(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    shard = root / "ckpt" / "model.safetensors"
    original = shard.read_bytes()
    header_len = struct.unpack("<Q", original[:8])[0]
    for cut, fragment in ((5, "too short"), (8 + header_len // 2, "header length"),
                          (8 + header_len + 10, "past the end")):
        shard.write_bytes(original[:cut])
        expect(CheckpointInvalid, "INVALID_ARGUMENT", root / "ckpt", [root], str(shard), fragment)


def test_corrupt_header_json_is_invalid(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    shard = root / "ckpt" / "model.safetensors"
    _rewrite(shard, lambda data: data[:8] + b"#" + data[9:])
    expect(CheckpointInvalid, "INVALID_ARGUMENT", root / "ckpt", [root], str(shard), "not valid JSON")
    _rewrite(shard, lambda data: data[:8] + b"[" + data[9:])
    expect(CheckpointInvalid, "INVALID_ARGUMENT", root / "ckpt", [root], str(shard))


def _edit_header(shard: Path, edit: callable) -> None:
    data = shard.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    shard.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length:])


def test_offsets_past_the_end_and_inconsistent_entries_are_invalid(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    shard = root / "ckpt" / "model.safetensors"
    name = f"{PREFIX}.1.gate_proj.weight"
    original = shard.read_bytes()

    def past_end(header: dict) -> None:
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + 10**9, end + 10**9]

    cases = [(past_end, "past the end"),
             (lambda h: h[name].update(shape=[3, 3]), "expected 9 for dtype U8"),
             (lambda h: h[name].update(dtype="Q7"), "not a safetensors dtype"),
             (lambda h: h[name].update(data_offsets=[5, 1]), "begin <= end"),
             (lambda h: h[name].update(shape=[-1, 2]), "non-negative")]
    for edit, fragment in cases:
        shard.write_bytes(original)
        _edit_header(shard, edit)
        expect(CheckpointInvalid, "INVALID_ARGUMENT", root / "ckpt", [root], name, fragment)


def test_locations_that_are_not_paths_are_invalid(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    expect(CheckpointInvalid, "INVALID_ARGUMENT", "https://example.com/model", [root], "scheme 'https'")
    expect(CheckpointInvalid, "INVALID_ARGUMENT", "file://otherhost/x", [root], "host 'otherhost'")
    expect(CheckpointInvalid, "INVALID_ARGUMENT", "ckpt", [root], "absolute path")
    expect(CheckpointInvalid, "INVALID_ARGUMENT", "", [root], "non-empty")


def test_bad_config_json_is_invalid(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    (root / "ckpt" / "hf_quant_config.json").unlink()
    (root / "ckpt" / "config.json").write_text("{not json")
    expect(CheckpointInvalid, "INVALID_ARGUMENT", root / "ckpt", [root], "config.json", "not valid JSON")
    (root / "ckpt" / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    expect(CheckpointInvalid, "INVALID_ARGUMENT", root / "ckpt", [root], "quant_method is 'gptq'")


def test_references_over_grpc_get_their_status_codes(roots: tuple[Path, Path], start_server) -> None:
    """The same bad references, sent to a real server as PrepareHeader.ref, come back as gRPC statuses."""
    root, outside = roots
    (root / "link").symlink_to(outside / "outside", target_is_directory=True)
    truncated = root / "truncated"
    truncated.mkdir()
    for path in (root / "ckpt").iterdir():
        data = path.read_bytes()
        (truncated / path.name).write_bytes(data[:50] if path.suffix == ".safetensors" else data)
    server = start_server(allowed_roots=(root,))
    with PrepClient(server.address, retries=0) as client:
        good = client.prepare_reference(str(root / "ckpt"), PREFIX, "flashinfer_cutlass")
        expected = prepare(open_checkpoint(root / "ckpt").read_layer(PREFIX), "flashinfer_cutlass")
        for name, tensor in expected.tensors.items():
            assert torch.equal(good.tensors[name].view(torch.uint8), tensor.view(torch.uint8)), name
        cases = [
            (str(outside / "outside"), PREFIX, grpc.StatusCode.PERMISSION_DENIED),
            (f"{root}/ckpt/../../{outside.name}/outside", PREFIX, grpc.StatusCode.PERMISSION_DENIED),
            (str(root / "link"), PREFIX, grpc.StatusCode.PERMISSION_DENIED),
            (str(root / "missing"), PREFIX, grpc.StatusCode.NOT_FOUND),
            ((root / "ckpt").as_uri(), "model.layers.9.mlp.experts", grpc.StatusCode.NOT_FOUND),
            (str(truncated), PREFIX, grpc.StatusCode.INVALID_ARGUMENT),
            ("http://example.com/ckpt", PREFIX, grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for location, prefix, code in cases:
            with pytest.raises(PrepClientError) as info:
                client.prepare_reference(location, prefix, "flashinfer_cutlass")
            assert info.value.code == code, (location, info.value)
            assert location.split("/")[-1] in info.value.details or prefix in info.value.details
