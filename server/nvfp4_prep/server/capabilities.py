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


def _backend(backend: str) -> pb.BackendCapability:
    """What the server offers for ``backend``: per profile its activations and CuteDSL group sizes; the layout
    ids of whole layers with the default policy, one per profile, activation and group size."""
    profiles, ids = [], []
    for profile in layout.PROFILES:
        activations = layout.backend_activations(profile, backend)
        groups = [64, 16] if backend == "flashinfer_cutedsl" and profile == "seed" else [64]
        profiles.append(pb.ProfileCapability(profile=profile, activations=activations, gated_group_sizes=groups,
                                             flashinfer_release=layout.flashinfer_release(profile)))
        ids += [layout.layout_id(backend, profile=profile, activation=a, gated_group_size=g)
                for g in groups for a in activations]
    return pb.BackendCapability(backend=backend, layout_versions=ids, profiles=profiles)


def build_capabilities(workers: Sequence[DeviceWorker], limits: pb.Limits, checkpoint_refs: bool,
                       bulk_port: int = 0) -> pb.Capabilities:
    return pb.Capabilities(
        api=API,
        package_version=_version("nvfp4-prep"),
        torch_version=torch.__version__,
        flashinfer_version=_version("flashinfer-python"),
        pipeline_version=layout.PIPELINE_VERSION,
        flashinfer_layout_version=layout.FLASHINFER_LAYOUT_VERSION,
        devices=[worker.describe() for worker in workers],
        backends=[_backend(b) for b in layout.BACKENDS],
        activations=list(layout.ALL_ACTIVATIONS),
        input_scale_policies=list(layout.INPUT_SCALE_POLICIES),
        tensor_forms=[pb.TENSOR_FORM_STACKED, pb.TENSOR_FORM_PER_EXPERT],
        checkpoint_refs=checkpoint_refs,
        limits=limits,
        quantize_recipes=list(layout.QUANTIZE_RECIPES),
        bulk_port=bulk_port,
    )
