"""``nvfp4-prep prepare`` and ``nvfp4-prep verify``: the checkpoint subcommands of the CLI.

Thin: the job itself lives in ``nvfp4_prep.checkpoint``. ``prepare`` sends each
MoE layer to the servers named by ``--server`` (one connection each; a free
server takes the next layer; a layer whose server stays unavailable after the
SDK's retries goes to the next server) or, without ``--server``, through the
pipeline in this process (the embedded default: no server, no loopback). Every flag ``--foo-bar``
may also be set as ``NVFP4_PREP_FOO_BAR``.

Exit codes: 0 success, 1 verify found differences, 2 bad arguments or a
checkpoint or server error, 3 an operating-system error (disk full, ``--out`` a
regular file or not writable, ...), printed as one line
``nvfp4-prep COMMAND: PATH: REASON (errno NAME)`` (files are written under
temporary names and renamed, so nothing half-written is left and a rerun once
the cause is fixed resumes), 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from nvfp4_prep.contract.environment import env_value
from nvfp4_prep.contract.layout import ALL_ACTIVATIONS, BACKENDS, GATED_GROUP_SIZES, INPUT_SCALE_POLICIES, PROFILES

from .connection_flags import add_security_flags, security_options
from .progress import LayerProgress, megabytes

log = logging.getLogger(__name__)

SAMPLE_NAME = "qwen3moe_ct_nvfp4"
EXIT_DIFFERENCES, EXIT_ERROR, EXIT_OS_ERROR, EXIT_INTERRUPTED = 1, 2, 3, 130


def sample_checkpoint() -> Path:
    """The small compressed-tensors checkpoint shipped with the package (see sample/PROVENANCE.md)."""
    return Path(str(resources.files("nvfp4_prep.cli") / "sample" / SAMPLE_NAME))


def _servers(values: list[str] | None) -> list[str]:
    """``--server A,B --server C`` (or NVFP4_PREP_SERVER=A,B) as a list of addresses."""
    if not values:
        env = env_value("server", None)
        values = [env] if env else []
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def add_layout_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the prepared bytes, shared by ``prepare`` and ``layer``."""
    parser.add_argument("--backend", choices=BACKENDS, default=env_value("backend", "flashinfer_cutedsl"),
                         help="kernel backend to prepare for (default: %(default)s) [env NVFP4_PREP_BACKEND]")
    parser.add_argument("--activation", choices=ALL_ACTIVATIONS, default=env_value("activation", "swiglu"),
                         help="MoE activation; which ones a backend runs depends on the profile "
                              "(default: %(default)s) [env NVFP4_PREP_ACTIVATION]")
    parser.add_argument("--profile", choices=PROFILES, default=env_value("profile", "seed"),
                         help="which engine version's bytes, SPEC section 10 (default: %(default)s) "
                              "[env NVFP4_PREP_PROFILE]")
    parser.add_argument("--gated-group-size", type=int, choices=GATED_GROUP_SIZES,
                         default=int(env_value("gated-group-size", "64")),
                         help="CuteDSL gated FC1 row grouping: 64, or 16 for FlashInfer 0.7.4's swap-AB kernels "
                              "(default: %(default)s) [env NVFP4_PREP_GATED_GROUP_SIZE]")
    parser.add_argument("--input-scale-policy", choices=INPUT_SCALE_POLICIES,
                         default=env_value("input-scale-policy", "max"),
                         help="how input scales combine across experts, SPEC section 4 (default: %(default)s) "
                              "[env NVFP4_PREP_INPUT_SCALE_POLICY]")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``prepare`` and ``verify`` to the CLI's subcommands."""
    prepare = subparsers.add_parser(
        "prepare", help="prepare every MoE layer of a checkpoint and write a prepared checkpoint",
        description="Prepares every NVFP4 MoE layer of CKPT for a FlashInfer backend and writes OUT as a "
                    "loadable sharded safetensors checkpoint with a manifest. Resumable: a rerun keeps layers "
                    "already written and verified. Every flag --foo-bar may also be set as NVFP4_PREP_FOO_BAR.")
    prepare.add_argument("checkpoint", nargs="?", default=env_value("checkpoint", None), metavar="CKPT",
                         help="checkpoint directory, .safetensors file, index file or file:// URI "
                              f"(default: the bundled sample {SAMPLE_NAME}) [env NVFP4_PREP_CHECKPOINT]")
    add_layout_flags(prepare)
    prepare.add_argument("--out", default=env_value("out", "./prepared"), metavar="DIR",
                         help="output directory (default: %(default)s) [env NVFP4_PREP_OUT]")
    prepare.add_argument("--server", action="append", metavar="ADDR[,ADDR...]",
                         help="nvfp4-prep servers (host:port) to prepare on, layers spread across them; repeatable "
                              "(default: a server started in this process) [env NVFP4_PREP_SERVER]")
    prepare.add_argument("--verify", action=argparse.BooleanOptionalAction,
                         default=env_value("verify", "false").lower() in ("1", "true", "yes"),
                         help="run verify on the output afterwards; exit 1 on a difference [env NVFP4_PREP_VERIFY]")
    prepare.add_argument("--timeout", type=float, default=env_value("timeout", "600"),
                         help="seconds per layer call to a server, retries included (default: 600) "
                              "[env NVFP4_PREP_TIMEOUT]")
    prepare.add_argument("--overwrite", action="store_true",
                         help="replace an OUT prepared from another checkpoint or with other options (default: refuse)")
    add_security_flags(prepare)
    prepare.add_argument("--quiet", action="store_true", help="no progress output")
    prepare.set_defaults(run=run_prepare)

    verify = subparsers.add_parser(
        "verify", help="check a prepared checkpoint against its source, byte for byte",
        description="Unprepares every layer of DIR and compares it with CKPT byte for byte, recomputes the input "
                    "scales and derived scalars, compares every other tensor, and checks the manifest checksums. "
                    "Prints each difference naming the tensor; exits 1 if there is any, 2 on a checkpoint error. "
                    "A pass proves DIR is exactly the prepared form of CKPT that inverts back to it (catching "
                    "corruption, truncation, a wrong source, mixed layers); it does not prove the layout itself, "
                    "since unpreparing inverts the same index maps prepare used: that is established by the "
                    "project's test suite against independent formulations of the layout.")
    verify.add_argument("out", metavar="DIR", help="prepared checkpoint directory")
    verify.add_argument("--against", required=env_value("against", None) is None, default=env_value("against", None),
                        metavar="CKPT", help="the source checkpoint it was prepared from [env NVFP4_PREP_AGAINST]")
    verify.set_defaults(run=run_verify)


@contextlib.contextmanager
def layer_preparers(servers: list[str], timeout: float | None = None, security: dict | None = None,
                    backend: str | None = None) -> Iterator[list]:
    """One ``prepare_layer`` per server, or the pipeline in this process when no server is named.

    With ``backend``, each server is asked first (health, capabilities) whether it serves and produces
    this package's layout for that backend, so that a wrong server fails before anything is written.

    Each tries its own server first and, when that stays unavailable (it died, or drains), the others in
    turn: preparing is a pure function, so any server gives the same bytes.
    """
    if not servers:
        from nvfp4_prep.prepared.in_process import InProcessPreparer

        preparer = InProcessPreparer()
        log.info("preparing in this process on %s", preparer.device)
        yield [preparer]
        return
    from nvfp4_prep.client.errors import PrepUnavailable
    from nvfp4_prep.client.sdk import PrepClient

    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(PrepClient(address, timeout=timeout, **(security or {})))
                   for address in servers]
        if backend is not None:
            for client in clients:
                check_server(client, backend)

        def preparer(index: int):
            order = clients[index:] + clients[:index]

            def prepare_layer(stacked, backend: str, activation: str, policy: str, **options):
                for attempt, client in enumerate(order):
                    try:
                        return client.prepare_layer(stacked, backend, activation, policy, **options)
                    except PrepUnavailable as err:
                        if attempt == len(order) - 1:
                            raise
                        log.warning("%s is unavailable (%s); trying %s", client.target, err.details,
                                    order[attempt + 1].target)
            return prepare_layer

        yield [preparer(index) for index in range(len(clients))]


def check_server(client, backend: str) -> None:
    """Raises ``ValueError`` naming the server when it is not serving or cannot produce our layout."""
    from nvfp4_prep.contract.layout import layout_id

    status = client.health()
    if status != "SERVING":
        raise ValueError(f"server {client.target} reports health {status}, expected SERVING")
    offered = {cap.backend: list(cap.layout_versions) for cap in client.capabilities().backends}
    wanted = layout_id(backend)
    if wanted not in offered.get(backend, []):
        raise ValueError(f"server {client.target} produces {offered.get(backend) or 'nothing'} for {backend}, "
                         f"expected layout {wanted} (a server of another nvfp4-prep version?)")


def os_error_line(command: str, exc: OSError, fallback: object) -> str:
    """``nvfp4-prep COMMAND: PATH: REASON (errno NAME)``; PATH is ``fallback`` when the error names none."""
    path = exc.filename if exc.filename is not None else fallback
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    reason = exc.strerror or str(exc) or type(exc).__name__
    name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else type(exc).__name__
    return f"nvfp4-prep {command}: {os.fsdecode(path)}: {reason} (errno {name})"


def _report(differences: list, out: str) -> int:
    for difference in differences:
        print(f"DIFFERENCE {difference}")
    if differences:
        print(f"{out}: {len(differences)} differences", file=sys.stderr)
        return EXIT_DIFFERENCES
    print(f"{out}: verified, identical to its source")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from nvfp4_prep.checkpoint import CheckpointError, open_checkpoint
    from nvfp4_prep.client.errors import PrepClientError
    from nvfp4_prep.contract.errors import PrepError
    from nvfp4_prep.prepared.prepare_job import prepare_checkpoint
    from nvfp4_prep.prepared.verify import verify_prepared

    location = args.checkpoint or sample_checkpoint()
    try:
        with open_checkpoint(location) as checkpoint:
            security = security_options(args)
            progress = LayerProgress(enabled=not args.quiet)
            try:
                with layer_preparers(_servers(args.server), args.timeout, security, args.backend) as preparers:
                    summary = prepare_checkpoint(checkpoint, args.out, preparers, args.backend, args.activation,
                                                 args.input_scale_policy, progress=progress, overwrite=args.overwrite,
                                                 profile=args.profile, gated_group_size=args.gated_group_size)
            finally:
                progress.close()
            print(f"{summary.out_dir}: {summary.layers_prepared} layers prepared, {summary.layers_skipped} kept "
                  f"from an earlier run, {megabytes(summary.bytes_prepared)} in {summary.seconds:.2f}s, "
                  f"layout {summary.layout_id}")
            if args.verify:
                return _report(verify_prepared(args.out, checkpoint), summary.out_dir)
            print(f"next: nvfp4-prep verify {summary.out_dir} --against {location}")
    except (CheckpointError, PrepError, PrepClientError, ValueError) as exc:
        print(f"nvfp4-prep prepare: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # disk full, --out a file or not writable: not "differences" (1), no traceback
        print(os_error_line("prepare", exc, args.out), file=sys.stderr)
        return EXIT_OS_ERROR
    except KeyboardInterrupt:
        print(f"nvfp4-prep prepare: interrupted; run it again to resume {args.out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from nvfp4_prep.checkpoint import CheckpointError
    from nvfp4_prep.prepared.verify import verify_prepared

    try:
        return _report(verify_prepared(args.out, args.against), args.out)
    except CheckpointError as exc:
        print(f"nvfp4-prep verify: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # an unreadable DIR is not "differences" (1)
        print(os_error_line("verify", exc, args.out), file=sys.stderr)
        return EXIT_OS_ERROR
