"""``prepare --server --send``: checkpoint references to a server that reads the files itself (issue 13).

Real servers on loopback, with and without ``--allowed-root``; what travelled is read from the server's own
metrics registry (``nvfp4_prep_received_bytes_total`` by source: "stream" for uploads, "checkpoint" for what
it read). Outputs are compared byte for byte with the in-process job's and verified against the source.
"""

from __future__ import annotations

import filecmp
import json
import logging
import time
from pathlib import Path

import pytest

from nvfp4_prep.checkpoint import CheckpointInvalid, open_checkpoint
from nvfp4_prep.client.errors import PrepNotFound
from nvfp4_prep.client.sdk import PrepClient
from nvfp4_prep.contract import layout
from nvfp4_prep.prepared.manifest import MANIFEST_NAME
from nvfp4_prep.prepared.prepare_job import ReferencePreparer, prepare_checkpoint
from nvfp4_prep.prepared.verify_output import verify_output
from nvfp4_prep.server.server import PrepServer
from tests.helpers.checkpoint_cli import cli
from tests.helpers.checkpoint_factory import moe_checkpoint

BACKEND = "flashinfer_cutedsl"
RECEIVED = "nvfp4_prep_received_bytes_total"
CLI_LOGGER = "nvfp4_prep.cli.checkpoint_commands"


def received(server: PrepServer, source: str, backend: str = BACKEND) -> float:
    return server.metrics.registry.get_sample_value(RECEIVED, {"backend": backend, "source": source}) or 0.0


def settled_received(server: PrepServer, source: str, at_least: float) -> float:
    """The count once it reaches ``at_least``: a call is counted as its handler ends, just after the answer."""
    end = time.monotonic() + 30
    while received(server, source) < at_least and time.monotonic() < end:
        time.sleep(0.05)
    return received(server, source)


def source_bytes(path: Path) -> int:
    with open_checkpoint(path) as checkpoint:
        return sum(checkpoint.entry(name).nbytes for prefix in checkpoint.moe_layers()
                   for name in checkpoint.layer(prefix).tensor_names)


def same_folders(first: Path, second: Path) -> None:
    """Every file of ``first`` in ``second`` with the same bytes, and no other; subfolders too. The manifest
    is compared as JSON: its shards are listed in the order the layers finished, which two workers vary."""
    compared = filecmp.dircmp(first, second)
    assert not compared.left_only and not compared.right_only, (compared.left_only, compared.right_only)
    files = [name for name in compared.common_files if name != MANIFEST_NAME]
    _, mismatch, errors = filecmp.cmpfiles(first, second, files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    if MANIFEST_NAME in compared.common_files:
        manifests = [json.loads((folder / MANIFEST_NAME).read_text()) for folder in (first, second)]
        assert manifests[0] == manifests[1]
    for sub in compared.common_dirs:
        same_folders(first / sub, second / sub)


def info_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == CLI_LOGGER and r.levelno == logging.INFO]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """The model store: the folder a server's --allowed-root names."""
    return tmp_path / "store"


@pytest.fixture
def source(store: Path) -> Path:
    """Two MoE layers of 4 experts with dense tensors, inside the store."""
    return moe_checkpoint(store / "ckpt", 2, 4, 256, 128, seed=3, dense=True)


@pytest.fixture
def embedded(tmp_path: Path, source: Path) -> Path:
    """The in-process job's output, the reference every server run is compared with."""
    out = tmp_path / "embedded"
    assert cli("prepare", source, "--backend", BACKEND, "--out", out, "--quiet") == 0
    return out


@pytest.mark.parametrize("mode", ["auto", "references"])
def test_a_server_under_the_store_is_sent_references(tmp_path, caplog, start_server, store, source, embedded,
                                                     mode) -> None:
    server = start_server(allowed_roots=(store,))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger=CLI_LOGGER):
        code = cli("prepare", source, "--server", server.address, "--send", mode, "--backend", BACKEND, "--out", out,
                   "--verify", "--quiet")
    assert code == 0
    same_folders(embedded, out)
    assert verify_output(out, source).differences == []
    whole = source_bytes(source)
    # The server read every layer itself (plus the probe's expert); nothing was uploaded.
    assert settled_received(server, "checkpoint", whole) >= whole
    assert received(server, "stream") == 0
    decided = [line for line in info_lines(caplog) if server.address in line]
    assert len(decided) == 1 and "sending checkpoint references" in decided[0], decided


def test_without_an_allowed_root_auto_uploads_and_says_so_once(tmp_path, caplog, start_server, source,
                                                               embedded) -> None:
    server = start_server()
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger=CLI_LOGGER):
        code = cli("prepare", source, "--server", server.address, "--backend", BACKEND, "--out", out, "--quiet")
    assert code == 0
    same_folders(embedded, out)
    assert verify_output(out, source).differences == []
    whole = source_bytes(source)
    assert settled_received(server, "stream", whole) == whole
    assert received(server, "checkpoint") == 0
    decided = [line for line in info_lines(caplog) if server.address in line]
    assert len(decided) == 1, decided
    assert "uploading tensors" in decided[0] and "--allowed-root" in decided[0], decided


def test_tensors_mode_uploads_even_to_a_server_that_reads_the_store(tmp_path, start_server, store, source,
                                                                    embedded) -> None:
    server = start_server(allowed_roots=(store,))
    out = tmp_path / "out"
    assert cli("prepare", source, "--server", server.address, "--send", "tensors", "--backend", BACKEND,
               "--out", out, "--quiet") == 0
    same_folders(embedded, out)
    whole = source_bytes(source)
    assert settled_received(server, "stream", whole) == whole
    assert received(server, "checkpoint") == 0


def test_references_mode_fails_in_one_line_before_anything_is_written(tmp_path, capsys, start_server,
                                                                       source) -> None:
    server = start_server()
    out = tmp_path / "out"
    capsys.readouterr()
    code = cli("prepare", source, "--server", server.address, "--send", "references", "--backend", BACKEND,
               "--out", out, "--quiet")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("nvfp4-prep prepare: --send references: server ") and server.address in err[0]
    assert "--allowed-root" in err[0]
    assert not out.exists()
    assert received(server, "stream") == 0


def test_a_path_outside_the_roots_falls_back_and_server_path_maps_the_mount(tmp_path, caplog, start_server,
                                                                            store, source) -> None:
    # The shared storage as this machine mounts it: the store under another path. The server knows it as
    # the store itself, so this machine's path lies outside the server's roots.
    mount = tmp_path / "mnt"
    mount.symlink_to(store, target_is_directory=True)
    here = mount / "ckpt"
    server = start_server(allowed_roots=(store,))
    whole = source_bytes(here)
    embedded = tmp_path / "embedded"
    assert cli("prepare", here, "--backend", BACKEND, "--out", embedded, "--quiet") == 0

    fallback = tmp_path / "fallback"
    with caplog.at_level(logging.INFO, logger=CLI_LOGGER):
        assert cli("prepare", here, "--server", server.address, "--backend", BACKEND, "--out", fallback,
                   "--quiet") == 0
    decided = [line for line in info_lines(caplog) if server.address in line]
    assert len(decided) == 1 and "uploading tensors" in decided[0] and "outside the allowed roots" in decided[0]
    assert settled_received(server, "stream", whole) == whole
    same_folders(embedded, fallback)

    caplog.clear()
    mapped = tmp_path / "mapped"
    with caplog.at_level(logging.INFO, logger=CLI_LOGGER):
        assert cli("prepare", here, "--server", server.address, "--server-path", source, "--send", "references",
                   "--backend", BACKEND, "--out", mapped, "--quiet") == 0
    decided = [line for line in info_lines(caplog) if server.address in line]
    assert len(decided) == 1 and "sending checkpoint references" in decided[0], decided
    assert settled_received(server, "checkpoint", whole) >= whole
    assert received(server, "stream") == whole  # only the fallback run's uploads
    same_folders(embedded, mapped)
    assert verify_output(mapped, here).differences == []


def test_a_server_path_naming_other_files_is_refused_under_references(tmp_path, capsys, start_server, store,
                                                                      source) -> None:
    moe_checkpoint(store / "other", 2, 4, 256, 128, seed=9, dense=True)  # same shapes, other bytes
    server = start_server(allowed_roots=(store,))
    out = tmp_path / "out"
    capsys.readouterr()
    code = cli("prepare", source, "--server", server.address, "--server-path", store / "other",
               "--send", "references", "--backend", BACKEND, "--out", out, "--quiet")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "differ from" in err[0] and str(source) in err[0]
    assert not out.exists()


@pytest.mark.parametrize(("tp_size", "ep_size"), [(2, 1), (1, 2)])
def test_each_rank_reference_reads_only_that_ranks_bytes(tmp_path, start_server, store, source, tp_size,
                                                         ep_size) -> None:
    embedded = tmp_path / "embedded-ranks"
    ranks = ("--tp-size", tp_size, "--ep-size", ep_size)
    assert cli("prepare", source, "--backend", BACKEND, "--out", embedded, *ranks, "--quiet") == 0
    server = start_server(allowed_roots=(store,))
    out = tmp_path / "out"
    assert cli("prepare", source, "--server", server.address, "--send", "references", "--backend", BACKEND,
               "--out", out, *ranks, "--verify", "--quiet") == 0
    same_folders(embedded, out)
    assert received(server, "stream") == 0
    # Each rank read its share: all ranks together read the layer's bytes about once (every rank also reads the
    # layer's small input scales), not once per rank.
    whole = source_bytes(source)
    read = settled_received(server, "checkpoint", whole)
    assert whole <= read < 1.2 * whole


def test_a_reference_preparer_in_the_job_and_its_size_check(tmp_path, start_server, store, source,
                                                            embedded) -> None:
    server = start_server(allowed_roots=(store,))
    with PrepClient(server.address) as client, open_checkpoint(source) as checkpoint:
        out = tmp_path / "out"
        summary = prepare_checkpoint(checkpoint, out, [ReferencePreparer(client.prepare_reference, str(source))],
                                     BACKEND)
        assert summary.layers_prepared == 2
        same_folders(embedded, out)

        smaller = moe_checkpoint(store / "smaller", 2, 2, 256, 128, seed=3)  # 2 experts where the source has 4
        with pytest.raises(CheckpointInvalid, match=r"the server read a layer of .*'experts': 2.*'experts': 4"):
            prepare_checkpoint(checkpoint, tmp_path / "wrong", [ReferencePreparer(client.prepare_reference,
                                                                                  str(smaller))], BACKEND)

        with pytest.raises(PrepNotFound):
            prepare_checkpoint(checkpoint, tmp_path / "missing",
                               [ReferencePreparer(client.prepare_reference, str(store / "absent"))], BACKEND)


def test_an_unknown_send_mode_from_the_environment_is_named(tmp_path, capsys, monkeypatch, prep_address,
                                                            source) -> None:
    monkeypatch.setenv("NVFP4_PREP_SEND", "sometimes")
    capsys.readouterr()
    code = cli("prepare", source, "--server", prep_address, "--backend", BACKEND, "--out", tmp_path / "out",
               "--quiet")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--send" in err[0] and "'sometimes'" in err[0] and "auto, references, tensors" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", layout.BACKENDS)
def test_a_real_checkpoint_by_reference_matches_the_embedded_job(tmp_path, start_server, testdata, ct_checkpoint,
                                                                 backend) -> None:
    embedded, out = tmp_path / "embedded", tmp_path / "out"
    ranks = ("--tp-size", 1, "--ep-size", 2)
    assert cli("prepare", ct_checkpoint, "--backend", backend, "--out", embedded, *ranks, "--quiet") == 0
    server = start_server(allowed_roots=(testdata,))
    assert cli("prepare", ct_checkpoint, "--server", server.address, "--send", "references", "--backend", backend,
               "--out", out, *ranks, "--verify", "--quiet") == 0
    same_folders(embedded, out)
    assert received(server, "stream", backend) == 0


def test_a_quantize_run_uploads_and_refuses_references(tmp_path, capsys, start_server, testdata) -> None:
    server = start_server(allowed_roots=(testdata,))
    quantize = ("--quantize", "modelopt", "--activation-scales", testdata / "qwen3moe_modelopt_nvfp4")
    source = testdata / "qwen3moe_bf16"
    capsys.readouterr()
    assert cli("prepare", source, *quantize, "--server", server.address, "--send", "references", "--backend",
               BACKEND, "--out", tmp_path / "refused", "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nvfp4-prep prepare: --send references: a --quantize run"), err
    assert not (tmp_path / "refused").exists()
    # auto: the BF16 weights are uploaded to be quantized, never probed or referenced
    assert cli("prepare", source, *quantize, "--server", server.address, "--backend", BACKEND,
               "--out", tmp_path / "out", "--quiet") == 0
    assert settled_received(server, "stream", 1) > 0
    assert received(server, "checkpoint") == 0
