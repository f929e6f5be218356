"""A prepared folder opened as a ``Checkpoint`` (its index and shards), for ``verify --against``.

``open_checkpoint`` decides a folder's format from its config files, and a prepared folder's
config.json names ``nvfp4_prep`` on purpose (``prepared_config``: stock loaders must refuse it), so it
cannot open one. Here the format is the source's, given by the caller, and the index says which shard
holds which tensor, exactly as for a loader. Local files written by ``prepare``: no root confinement.
"""

from __future__ import annotations

from pathlib import Path

from nvfp4_prep.checkpoint.checkpoint import INDEX_NAME, Checkpoint
from nvfp4_prep.checkpoint.errors import CheckpointInvalid, shown
from nvfp4_prep.checkpoint.exclusions import Exclusions
from nvfp4_prep.checkpoint.files import MAX_INDEX_BYTES, parse_json
from nvfp4_prep.checkpoint.formats import QuantFormat
from nvfp4_prep.checkpoint.safetensors_file import SafetensorsFile


def _weight_map(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CheckpointInvalid(f"{path} is missing; expected the index prepare writes once every shard is done")
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise CheckpointInvalid(f"{path}: larger than {MAX_INDEX_BYTES} bytes; expected a safetensors index")
    value = parse_json(path.read_bytes(), str(path), "a safetensors index")
    weight_map = value.get("weight_map") if isinstance(value, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and Path(v).name == v and v not in ("", ".", "..")
            for k, v in weight_map.items()):
        raise CheckpointInvalid(f"{path}: weight_map is not an object of tensor name -> shard file in the folder")
    return weight_map


def open_output(out_dir: Path, source_format: str) -> Checkpoint:
    """The prepared folder ``out_dir`` read as a checkpoint in ``source_format``; CheckpointInvalid if it is not."""
    weight_map = _weight_map(out_dir / INDEX_NAME)
    shards: dict[str, SafetensorsFile] = {}
    try:
        for name in sorted(set(weight_map.values())):
            shards[name] = SafetensorsFile(out_dir / name)
        for tensor, shard in weight_map.items():
            if tensor not in shards[shard].entries:
                raise CheckpointInvalid(f"{out_dir / INDEX_NAME}: weight_map puts tensor {shown(tensor)!r} in "
                                        f"{shard}, whose header does not list it")
        return Checkpoint(out_dir, QuantFormat(source_format, Exclusions([], "none")), shards, weight_map)
    except BaseException:
        for shard in shards.values():
            shard.close()
        raise
