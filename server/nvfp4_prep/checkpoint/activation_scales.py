"""The activation scales of a layer to quantize, read from where calibration left them (for the server, from
under its allowed roots).

Calibration, which needs the model's forward pass, is not ours to run, so ``CheckpointRef.activation_scales_location``
names where it left them: an NVFP4 checkpoint of the same model (only its input scales are read), or a calibration
``.safetensors`` file of per-module ``<module>.input_scale`` / ``<module>.input_global_scale`` scalars (a file with
no ``config.json`` or ``hf_quant_config.json`` beside it). Every file is opened by the same walk as a checkpoint
reference (``checkpoint.location``), so the roots bound it too. Errors name the field.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CONFIG_FILES, open_checkpoint
from .errors import CheckpointError, CheckpointInvalid, CheckpointNotFound, shown
from .formats import BF16
from .location import Found, Tree
from .safetensors_file import Interrupt, SafetensorsFile

FIELD = "activation_scales_location"
INPUT_LEAVES = (".input_scale", ".input_global_scale")
NO_SCALES_IN_BF16 = ("an unquantized checkpoint holds no activation scales; expected an NVFP4 checkpoint of the same "
                     "model or a calibration .safetensors file")
# An input scale is a float32 scalar (0-d or [1]); a larger entry under such a name is refused unread.
MAX_SCALE_BYTES = 4


@dataclass(frozen=True)
class ActivationScales:
    """One layer's input scales keyed ``<e>.<proj>.<leaf>`` (as ``quantize_layer`` takes them), and the identity
    of the files they came from (for the cache key)."""

    tensors: dict[str, torch.Tensor]
    identity: str


def _has_config(tree: Tree, found: Found) -> bool:
    for name in CONFIG_FILES:
        opened = tree.open_in(found, name, "config file", missing_ok=True)
        if opened is not None:
            opened.close()
            return True
    return False


def _read(names: list[str], entry_bytes, read, prefix: str, where: str) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    wanted = [name for name in names if name.startswith(prefix + ".") and name.endswith(INPUT_LEAVES)]
    if not wanted:
        raise CheckpointNotFound(f"{where}: no input scales of layer {shown(prefix)} "
                                 f"({shown(prefix)}.<e>.<proj>{INPUT_LEAVES[0]} or {INPUT_LEAVES[1]}); expected the "
                                 "calibrated activation scales of this layer's experts")
    out = {}
    for name in wanted:
        nbytes = entry_bytes(name)
        if nbytes > MAX_SCALE_BYTES:
            raise CheckpointInvalid(f"{where}: {shown(name)} holds {nbytes} bytes; expected a float32 scalar")
        out[name[start:]] = read(name)
    return out


def _calibration_file(found: Found, prefix: str, interrupt: Interrupt | None) -> ActivationScales:
    file = SafetensorsFile(Path(found.file.display), fd=found.file.fd)  # takes the descriptor over
    with contextlib.closing(file):
        tensors = _read(list(file.entries), lambda name: file.entry(name).nbytes,
                        lambda name: file.tensor(name, interrupt=interrupt), prefix, shown(found.file.display))
        return ActivationScales(tensors, f"calibration:{':'.join(map(str, file.identity))}")


def _nvfp4_checkpoint(location: str, prefix: str, roots: Sequence[str], interrupt: Interrupt | None
                      ) -> ActivationScales:
    with open_checkpoint(location, roots) as checkpoint:
        if checkpoint.format == BF16:
            raise CheckpointInvalid(f"{shown(checkpoint.directory)}: {NO_SCALES_IN_BF16}")
        tensors = _read(checkpoint.tensor_names(), lambda name: checkpoint.entry(name).nbytes,
                        lambda name: checkpoint.read_tensor(name, interrupt=interrupt), prefix,
                        shown(checkpoint.directory))
        return ActivationScales(tensors, f"checkpoint:{checkpoint.source_identity()}")


def read_activation_scales(location: str, prefix: str, roots: Sequence[str],
                           interrupt: Interrupt | None = None) -> ActivationScales:
    """The input scales of layer ``prefix`` at ``location`` (see the module docstring); a CheckpointError whose
    message starts with the field's name otherwise."""
    try:
        with Tree(roots) as tree:
            found = tree.open_location(location, FIELD)
            if found.file is not None:
                try:
                    calibration = found.file.display.endswith(".safetensors") and not _has_config(tree, found)
                except BaseException:
                    found.file.close()
                    raise
                if calibration:
                    return _calibration_file(found, prefix, interrupt)
                found.file.close()
        return _nvfp4_checkpoint(location, prefix, roots, interrupt)
    except CheckpointError as exc:
        raise type(exc)(f"{FIELD}: {exc}") from None
