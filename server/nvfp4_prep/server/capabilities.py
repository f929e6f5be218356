"""The GetCapabilities answer: versions, devices, backends and limits, built once at start-up."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata

import torch

from nvfp4_prep.contract import layout
from nvfp4_prep.v1 import prep_pb2 as pb

from .worker import DeviceWorker

API = pb.DESCRIPTOR.package


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return ""


def build_capabilities(workers: Sequence[DeviceWorker], limits: pb.Limits, checkpoint_refs: bool) -> pb.Capabilities:
    return pb.Capabilities(
        api=API,
        package_version=_version("nvfp4-prep"),
        torch_version=torch.__version__,
        flashinfer_version=_version("flashinfer-python"),
        pipeline_version=layout.PIPELINE_VERSION,
        flashinfer_layout_version=layout.FLASHINFER_LAYOUT_VERSION,
        devices=[worker.describe() for worker in workers],
        backends=[pb.BackendCapability(backend=b, layout_versions=[layout.layout_id(b)]) for b in layout.BACKENDS],
        activations=list(layout.ACTIVATIONS),
        input_scale_policies=list(layout.INPUT_SCALE_POLICIES),
        tensor_forms=[pb.TENSOR_FORM_STACKED, pb.TENSOR_FORM_PER_EXPERT],
        checkpoint_refs=checkpoint_refs,
        limits=limits,
    )
