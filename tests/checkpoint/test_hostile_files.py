"""Files built to cost: oversized and deeply nested JSON, huge numbers, backtracking patterns, long names.

Each is a CheckpointInvalid (or NotFound) naming the file or entry, in bounded time and with a bounded
message that tells a remote caller nothing of the server's roots.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
import threading
from pathlib import Path

import pytest

from nvfp4_prep.checkpoint import (
    CheckpointError,
    CheckpointInvalid,
    CheckpointNotFound,
    CheckpointPermissionDenied,
    open_checkpoint,
)
from nvfp4_prep.checkpoint.errors import SHOWN_CHARS
from nvfp4_prep.checkpoint.exclusions import Exclusions
from nvfp4_prep.checkpoint.files import MAX_CONFIG_BYTES, MAX_INDEX_BYTES
from nvfp4_prep.checkpoint.safetensors_file import MAX_HEADER_BYTES
from nvfp4_prep.server.status import status_of
from tests.helpers.checkpoint_factory import load_all, moe_layer_tensors, write_checkpoint

PREFIX = "model.layers.0.mlp.experts"
# Room for the message around one bounded echo of a caller's string.
MESSAGE_BOUND = 2 * SHOWN_CHARS + 300


def bounded(call, timeout: float = 30) -> CheckpointError:
    """The CheckpointError that ``call()`` raises, in a thread joined with a generous timeout."""
    outcome: dict[str, BaseException] = {}

    def target() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s"
    error = outcome.get("error")
    assert isinstance(error, CheckpointError), error
    assert len(str(error)) < MESSAGE_BOUND, len(str(error))
    return error


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "root" / "ckpt", moe_layer_tensors(0, 2, 64, 64))


def _with_header(shard: Path, header: bytes) -> None:
    """The shard with ``header`` (padded to 8 bytes) in place of its own, tensor bytes kept."""
    data = shard.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header += b" " * (-len(header) % 8)
    shard.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length:])


def _nested(depth: int) -> bytes:
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"


def test_header_over_the_limit_is_invalid_and_the_limit_is_a_parameter(ckpt: Path) -> None:
    shard = ckpt / "model.safetensors"
    data = shard.read_bytes()
    header = data[8:8 + struct.unpack("<Q", data[:8])[0]]
    # The header padded past the default limit with the whitespace JSON allows: refused before parsing.
    _with_header(shard, header + b" " * MAX_HEADER_BYTES)
    error = bounded(lambda: open_checkpoint(ckpt))
    assert str(shard) in str(error) and f"{MAX_HEADER_BYTES}-byte limit" in str(error)
    assert open_checkpoint(ckpt, max_header_bytes=2 * MAX_HEADER_BYTES).moe_layers() == [PREFIX]
    with pytest.raises(CheckpointInvalid, match="1000-byte limit"):
        open_checkpoint(ckpt, max_header_bytes=1000)


def test_default_header_limit_leaves_room_for_the_real_checkpoints(shared: dict[str, Path]) -> None:
    for path in shared.values():
        length = struct.unpack("<Q", (path / "model.safetensors").read_bytes()[:8])[0]
        tensors = len(load_all(path / "model.safetensors"))
        assert length * 100_000 // tensors < MAX_HEADER_BYTES  # 100k tensors of this size in one file still fit


@pytest.mark.parametrize("target", ["header", "model.safetensors.index.json", "config.json", "hf_quant_config.json"])
def test_deeply_nested_json_is_invalid_naming_the_file(ckpt: Path, target: str) -> None:
    if target == "header":
        _with_header(ckpt / "model.safetensors", _nested(100_000))
        name = "model.safetensors"
    else:
        (ckpt / target).write_bytes(_nested(100_000))
        name = target
    error = bounded(lambda: open_checkpoint(ckpt, [ckpt.parent]))
    assert isinstance(error, CheckpointInvalid) and name in str(error) and "nested too deeply" in str(error)
    assert status_of(error).code.name == "INVALID_ARGUMENT"


@pytest.mark.parametrize("target", ["header", "config.json"])
def test_number_too_long_to_convert_is_invalid(ckpt: Path, target: str) -> None:
    document = b'{"x": ' + b"7" * 5000 + b"}"
    if target == "header":
        _with_header(ckpt / "model.safetensors", document)
    else:
        (ckpt / target).write_bytes(document)
    error = bounded(lambda: open_checkpoint(ckpt))
    assert isinstance(error, CheckpointInvalid) and "not valid JSON" in str(error)


def test_oversized_config_and_index_are_invalid(ckpt: Path) -> None:
    config = ckpt / "config.json"
    value = json.loads(config.read_text())
    value["padding"] = "x" * MAX_CONFIG_BYTES
    config.write_text(json.dumps(value))
    error = bounded(lambda: open_checkpoint(ckpt))
    assert "config.json" in str(error) and f"{MAX_CONFIG_BYTES}-byte limit" in str(error)
    value.pop("padding")
    config.write_text(json.dumps(value))
    index = ckpt / "model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": {}}' + b" " * MAX_INDEX_BYTES)
    error = bounded(lambda: open_checkpoint(ckpt))
    assert str(index) in str(error) and f"{MAX_INDEX_BYTES}-byte limit" in str(error)


def test_backtracking_ignore_pattern_matches_in_linear_time(tmp_path: Path) -> None:
    """``re:(a+)+$`` against a crafted 40-character module name: Python's re would run for days."""
    crafted, plain = "a" * 39 + "!", "a" * 39
    tensors = {}
    for first in (crafted, plain):
        tensors.update({name.replace("model.layers.0", first): tensor
                        for name, tensor in moe_layer_tensors(0, 2, 64, 64, fmt="compressed-tensors").items()})
    ckpt = write_checkpoint(tmp_path / "ct", tensors, fmt="compressed-tensors", ignore=["re:(a+)+$"])
    layers: list[list[str]] = []
    thread = threading.Thread(target=lambda: layers.append(open_checkpoint(ckpt).moe_layers()), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "matching the ignore list did not finish in 30 s"
    assert layers == [[f"{crafted}.mlp.experts"]]  # the all-'a' layer is excluded, the crafted one is not


REAL_PATTERNS = ["re:.*lm_head", r"re:.*mlp\.gate$", r"re:model\.layers\.[0-3]\.mlp\.experts.*", "re:.*self_attn.*",
                 r"re:(?i).*EMBED.*", r"re:.*\.(q|k|v)_proj$", r"re:^model\.layers\.\d+\.mlp\.shared_experts"]
GLOBS = ["model.layers.*.mlp.gate", "lm_head", "*.experts.[0-3]*", "model.layers.?.self_attn*", "[!m]*",
         "model.layers.1[", "*[]]*", "*.[a-c]*_proj", r"*\*"]
NAMES = ["lm_head", "model.embed_tokens", "model.layers.0.mlp.gate", "model.layers.12.mlp.gate",
         "model.layers.3.mlp.experts.7.down_proj", "model.layers.4.mlp.experts.0", "model.layers.1.self_attn.q_proj",
         "model.layers.1.self_attn.o_proj", "model.layers.2.mlp.shared_experts.up_proj", "head]x", "model.layers.1[",
         "x.b_proj", r"a\*", "Model.Embed"]


def _reference(entry: str, module: str) -> bool:
    """What the entry means, by Python's own re and fnmatch: any dotted prefix of the module matches it."""
    parts = module.split(".")
    for candidate in (".".join(parts[:end]) for end in range(1, len(parts) + 1)):
        if entry.startswith("re:"):
            if re.match(entry[3:], candidate):
                return True
        elif candidate == entry or fnmatch.fnmatchcase(candidate, entry):
            return True
    return False


@pytest.mark.parametrize("entry", REAL_PATTERNS + GLOBS)
def test_exclusions_agree_with_python_re_and_fnmatch_on_benign_names(entry: str) -> None:
    exclusions = Exclusions([entry], "ignore")
    for name in NAMES:
        assert exclusions.excludes(name) == _reference(entry, name), (entry, name)


def test_pattern_re2_cannot_run_is_invalid_naming_the_entry(tmp_path: Path) -> None:
    for pattern in (r"re:(a)\1", "re:(?=lm_head)"):
        tensors = moe_layer_tensors(0, 2, 64, 64, fmt="compressed-tensors")
        ckpt = write_checkpoint(tmp_path / f"ct{len(pattern)}", tensors, fmt="compressed-tensors",
                                ignore=["lm_head", pattern])
        with pytest.raises(CheckpointInvalid) as info:
            open_checkpoint(ckpt)
        assert "quantization_config.ignore[1]" in str(info.value) and repr(pattern) in str(info.value)


def test_long_location_and_shard_names_give_bounded_messages(ckpt: Path) -> None:
    root = ckpt.parent
    long_component = f"{root}/{'a' * 5000}"
    error = bounded(lambda: open_checkpoint(long_component, [root]))
    assert isinstance(error, CheckpointInvalid) and "too long" in str(error)
    many_components = f"{root}/" + "/".join(["ab"] * 2500)
    assert isinstance(bounded(lambda: open_checkpoint(many_components, [root])), CheckpointNotFound)
    error = bounded(lambda: open_checkpoint("/" + "x" * 5000, [root]))
    assert isinstance(error, CheckpointPermissionDenied) and "outside the allowed roots" in str(error)

    header = json.loads((ckpt / "model.safetensors").read_bytes()[8:][
        :struct.unpack("<Q", (ckpt / "model.safetensors").read_bytes()[:8])[0]])
    index = {"weight_map": {name: "s" * 5000 + ".safetensors" for name in header if name != "__metadata__"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    error = bounded(lambda: open_checkpoint(ckpt, [root]))
    assert isinstance(error, CheckpointInvalid) and "too long" in str(error)


def test_shard_missing_when_opened_is_not_found(ckpt: Path) -> None:
    """The index names two shards; one is gone by the time it is opened (as when deleted mid-call)."""
    header_bytes = (ckpt / "model.safetensors").read_bytes()
    header = json.loads(header_bytes[8:8 + struct.unpack("<Q", header_bytes[:8])[0]])
    names = sorted(name for name in header if name != "__metadata__")
    weight_map = {name: "model.safetensors" for name in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    error = bounded(lambda: open_checkpoint(ckpt, [ckpt.parent]))
    assert isinstance(error, CheckpointNotFound) and "model-00002-of-00002.safetensors" in str(error)


def test_denials_reveal_neither_the_roots_nor_where_a_symlink_leads(tmp_path: Path, ckpt: Path) -> None:
    root = ckpt.parent
    secret = write_checkpoint(tmp_path / "private" / "secret", moe_layer_tensors(0, 2, 64, 64))
    (root / "link").symlink_to(secret, target_is_directory=True)
    for location in ("/etc/passwd", str(root / "link"), f"{root}/ckpt/../../private/secret", secret.as_uri()):
        with pytest.raises(CheckpointPermissionDenied) as info:
            open_checkpoint(location, [root])
        message = str(info.value)
        assert "outside the allowed roots" in message, message
        assert str(secret) not in message or str(secret) in location, message
        assert str(root) not in message or str(root) in location, message


def test_huge_layer_number_and_expert_index_are_handled(tmp_path: Path) -> None:
    digits = "9" * 5000
    tensors = {name.replace("model.layers.0.", f"model.layers.{digits}."): tensor
               for name, tensor in moe_layer_tensors(0, 2, 64, 64).items()}
    tensors.update(moe_layer_tensors(1, 2, 64, 64))
    checkpoint = open_checkpoint(write_checkpoint(tmp_path / "layers", tensors))
    assert checkpoint.moe_layers() == ["model.layers.1.mlp.experts", f"model.layers.{digits}.mlp.experts"]
    tensors = {name.replace(".experts.1.", f".experts.{digits}."): tensor
               for name, tensor in moe_layer_tensors(0, 2, 64, 64).items()}
    error = bounded(lambda: open_checkpoint(write_checkpoint(tmp_path / "experts", tensors)))
    assert isinstance(error, CheckpointInvalid) and "expert index of 5000 digits" in str(error)
