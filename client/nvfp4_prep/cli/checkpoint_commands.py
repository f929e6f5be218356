"""``nvfp4-prep prepare`` and ``nvfp4-prep verify``: the checkpoint subcommands of the CLI.

Thin: the job itself lives in ``nvfp4_prep.checkpoint``. ``prepare`` sends each
MoE layer to the servers named by ``--server`` (one connection each; a free
server takes the next layer; a layer whose server stays unavailable after the
SDK's retries goes to the next server) or, without ``--server``, through the
pipeline in this process (the embedded default: no server, no loopback). A server
that reads the checkpoint itself (``--send``, ``--server-path``) is sent references
instead of the layers' bytes. Every flag ``--foo-bar`` may also be set as ``NVFP4_PREP_FOO_BAR``.

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
import dataclasses
import errno
import logging
import os
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from nvfp4_prep.contract.environment import env_value
from nvfp4_prep.contract.layout import (
    ALL_ACTIVATIONS,
    BACKENDS,
    EXPERT_PLACEMENTS,
    GATED_GROUP_SIZES,
    INPUT_SCALE_POLICIES,
    PROFILES,
    QUANTIZE_RECIPES,
)

from .connection_flags import add_security_flags, security_options
from .layout_pin import expected_layout, pin_layout
from .progress import LayerProgress, megabytes

if TYPE_CHECKING:  # loads torch: not for ``nvfp4-prep --help``
    from nvfp4_prep.checkpoint import Checkpoint

log = logging.getLogger(__name__)

SEND_MODES = ("auto", "references", "tensors")
SAMPLE_NAME = "qwen3moe_ct_nvfp4"
EXIT_DIFFERENCES, EXIT_ERROR, EXIT_OS_ERROR, EXIT_INTERRUPTED = 1, 2, 3, 130
SHOWN_DIFFERENCES = 20  # verify prints this many, then a count of the rest (--max-differences)


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
    parser.add_argument("--layout-version", default=env_value("layout-version"), metavar="ID",
                         help="the layout id every prepared layer must carry, as `nvfp4-prep info` lists them; "
                              "another is an error naming both (default: any) [env NVFP4_PREP_LAYOUT_VERSION]")


def _count(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _limit(text: str) -> int:
    """An argparse type: an integer >= 0 (0: no limit)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0 for all), got {text!r}")
    return value


def add_rank_flags(parser: argparse.ArgumentParser) -> None:
    """``--tp-size``, ``--ep-size``, ``--expert-placement``: one prepared folder per rank (SPEC section 11)."""
    parser.add_argument("--tp-size", type=_count, default=env_value("tp-size", "1"),
                         help="tensor-parallel ranks: above 1 (or with --ep-size above 1), OUT gets one prepared "
                              "folder per rank, OUT/tp{T}of{N}-ep{E}of{M}, and nvfp4_prep_ranks.json listing them "
                              "(default: %(default)s) [env NVFP4_PREP_TP_SIZE]")
    parser.add_argument("--ep-size", type=_count, default=env_value("ep-size", "1"),
                         help="expert-parallel ranks (default: %(default)s) [env NVFP4_PREP_EP_SIZE]")
    parser.add_argument("--expert-placement", choices=EXPERT_PLACEMENTS,
                         default=env_value("expert-placement", "linear"),
                         help="which experts an expert-parallel rank holds, as vLLM places them "
                              "(default: %(default)s) [env NVFP4_PREP_EXPERT_PLACEMENT]")


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
    add_rank_flags(prepare)
    prepare.add_argument("--quantize", choices=QUANTIZE_RECIPES, default=env_value("quantize", None), metavar="RECIPE",
                         help="CKPT is unquantized (BF16, FP16, FP32): quantize its experts by this tool's rules ("
                              f"{', '.join(QUANTIZE_RECIPES)}) and prepare them in the same pass; the output equals "
                              "preparing the tool's checkpoint, other tensors are carried as they are "
                              "[env NVFP4_PREP_QUANTIZE]")
    prepare.add_argument("--activation-scales", default=env_value("activation-scales", None), metavar="SRC",
                         help="with --quantize: the activation scales, from an NVFP4 checkpoint of the same model or "
                              "a calibration .safetensors file of per-module input scales "
                              "[env NVFP4_PREP_ACTIVATION_SCALES]")
    prepare.add_argument("--out", default=env_value("out", "./prepared"), metavar="DIR",
                         help="output directory (default: %(default)s) [env NVFP4_PREP_OUT]")
    prepare.add_argument("--server", action="append", metavar="ADDR[,ADDR...]",
                         help="nvfp4-prep servers (host:port) to prepare on, layers spread across them; repeatable "
                              "(default: a server started in this process) [env NVFP4_PREP_SERVER]")
    prepare.add_argument("--send", choices=SEND_MODES, default=env_value("send", "auto"),
                         help="with --server, what each server gets: references (it reads CKPT itself, from under "
                              "its --allowed-root; only prepared bytes travel), tensors (the layers' bytes, "
                              "uploaded), or auto: references where a server reads the same files, checked on one "
                              "expert, else tensors (default: %(default)s) [env NVFP4_PREP_SEND]")
    prepare.add_argument("--server-path", default=env_value("server-path", None), metavar="PATH",
                         help="CKPT's path as the servers see it (shared storage mounted elsewhere) "
                              "(default: CKPT's absolute path here) [env NVFP4_PREP_SERVER_PATH]")
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
                    "project's test suite against independent formulations of the layout. For a rank set (DIR "
                    "holding nvfp4_prep_ranks.json) each rank folder is compared with preparing that rank's shard "
                    "of CKPT, and the ranks together must give back every layer of CKPT; missing and extra rank "
                    "folders are named. When DIR's manifest names another source than CKPT, the first line says "
                    "so. Without --against, DIR is checked against its own manifest only.")
    verify.add_argument("out", metavar="DIR", help="prepared checkpoint directory, a rank folder, or a rank set "
                                                   "(the folder holding nvfp4_prep_ranks.json)")
    verify.add_argument("--against", default=env_value("against", None), metavar="CKPT",
                        help="the source checkpoint it was prepared from; without it, DIR is checked against its "
                             "own manifest only (sizes, headers, CRC32C, layout record) [env NVFP4_PREP_AGAINST]")
    verify.add_argument("--max-differences", type=_limit, default=env_value("max-differences", SHOWN_DIFFERENCES),
                        metavar="N", help="print the first N differences, then how many more (0: all; default: "
                                          "%(default)s) [env NVFP4_PREP_MAX_DIFFERENCES]")
    verify.set_defaults(run=run_verify)


@dataclasses.dataclass(frozen=True)
class Sending:
    """What ``--send`` needs to decide, per server, whether to send references: the mode, the open checkpoint,
    its path as the servers see it, and the request the probe repeats (backend, activation, policy, options)."""

    mode: str
    checkpoint: Checkpoint
    server_path: str
    backend: str
    activation: str = "swiglu"
    input_scale_policy: str = "max"
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in SEND_MODES:  # argparse checks the flag's choices, not a default from NVFP4_PREP_SEND
            raise ValueError(f"--send (or NVFP4_PREP_SEND): unknown value {self.mode!r}, expected one of "
                             f"{', '.join(SEND_MODES)}")


def send_mode(send: str, quantize: str | None) -> str:
    """``--send``, where a ``--quantize`` run (which sends the layers' weights to be quantized) allows it."""
    if quantize is None:
        return send
    if send == "references":
        raise ValueError("--send references: a --quantize run sends the layers' BF16 weights to be quantized; "
                         "expected --send auto or tensors")
    return "tensors"


def server_path(location: str | os.PathLike, given: str | None) -> str:
    """``--server-path``, else the checkpoint's location here as an absolute path (a file:// URI as it is)."""
    if given:
        return given
    text = os.fspath(location)
    return text if "://" in text else os.path.abspath(text)


@contextlib.contextmanager
def layer_preparers(servers: list[str], timeout: float | None = None, security: dict | None = None,
                    layout: tuple[str, str, str] | None = None, sending: Sending | None = None) -> Iterator[list]:
    """One preparer per server, or the pipeline in this process when no server is named.

    With ``layout`` (backend, profile, whole-layer layout id), each server is asked first (health,
    capabilities) whether it serves and produces that layout, so that a wrong server fails before anything
    is written. With ``sending`` (mode not "tensors"), each is then asked whether it reads the checkpoint
    itself (``reference_probe``): such a server gets a ``ReferencePreparer``, the others ``prepare_layer``
    uploads; under "references" a server that cannot fails here, before anything is written.

    Each tries its own server first and, when that stays unavailable (it died, or drains), the others in
    turn (of the same kind: a reference needs a server that reads the files): preparing is a pure function,
    so any server gives the same bytes.
    """
    if not servers:
        from nvfp4_prep.prepared.in_process import InProcessPreparer

        preparer = InProcessPreparer()
        log.info("preparing in this process on %s", preparer.device)
        yield [preparer]
        return
    from nvfp4_prep.client.sdk import PrepClient

    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(PrepClient(address, timeout=timeout, **(security or {})))
                   for address in servers]
        if layout is not None:
            for client in clients:
                check_server(client, *layout)
        reads = [sending is not None and sending.mode != "tensors" and reads_checkpoint(client, sending)
                 for client in clients]
        readers = [client for client, reading in zip(clients, reads, strict=True) if reading]
        yield [_reference_preparer(client, readers, sending) if reading else _upload_preparer(client, clients)
               for client, reading in zip(clients, reads, strict=True)]


def reads_checkpoint(client, sending: Sending) -> bool:
    """Whether ``client``'s server reads the checkpoint at ``sending.server_path`` (one INFO line says which);
    ValueError naming the server and why, under ``--send references``, when it cannot."""
    from nvfp4_prep.prepared.reference_probe import why_not_references

    reason = why_not_references(client, sending.server_path, sending.checkpoint, sending.backend, sending.activation,
                                sending.input_scale_policy, sending.options)
    if reason is None:
        log.info("%s reads %s as %s: sending checkpoint references", client.target, sending.checkpoint.directory,
                 sending.server_path)
        return True
    if sending.mode == "references":
        raise ValueError(f"--send references: server {client.target} cannot read {sending.server_path}: {reason} "
                         "(start it with --allowed-root over the checkpoint, give --server-path, or --send tensors)")
    log.info("%s cannot read %s (%s): uploading tensors", client.target, sending.server_path, reason)
    return False


def _in_turn(own, others: list, call):
    """``call(client)`` on ``own``'s server, then, while that stays unavailable, on each of ``others``."""
    from nvfp4_prep.client.errors import PrepUnavailable

    index = others.index(own)
    order = others[index:] + others[:index]
    for attempt, client in enumerate(order[:-1]):
        try:
            return call(client)
        except PrepUnavailable as err:
            log.warning("%s is unavailable (%s); trying %s", client.target, err.details, order[attempt + 1].target)
    return call(order[-1])


def _upload_preparer(own, clients: list):
    def prepare_layer(stacked, backend: str, activation: str, policy: str, **options):
        return _in_turn(own, clients, lambda client: client.prepare_layer(stacked, backend, activation, policy,
                                                                          **options))
    return prepare_layer


def _reference_preparer(own, readers: list, sending: Sending):
    from nvfp4_prep.prepared.prepare_job import ReferencePreparer

    def prepare_reference(location: str, prefix: str, backend: str, activation: str, policy: str, **options):
        return _in_turn(own, readers, lambda client: client.prepare_reference(location, prefix, backend, activation,
                                                                              policy, **options))
    return ReferencePreparer(prepare_reference, sending.server_path)


def pinned(preparers: list, layout_version: str | None) -> list:
    """``pin_layout`` over both kinds of preparer (a reference preparer's call is pinned inside it)."""
    from nvfp4_prep.prepared.prepare_job import ReferencePreparer

    return [dataclasses.replace(preparer, prepare=pin_layout([preparer.prepare], layout_version)[0])
            if isinstance(preparer, ReferencePreparer) else pin_layout([preparer], layout_version)[0]
            for preparer in preparers]


def check_server(client, backend: str, profile: str, wanted: str) -> None:
    """Raises ``ValueError`` naming the server when it is not serving or cannot produce layout ``wanted``."""
    status = client.health()
    if status != "SERVING":
        raise ValueError(f"server {client.target} reports health {status}, expected SERVING")
    offered = {cap.backend: cap for cap in client.capabilities().backends}
    capability = offered.get(backend)
    if capability is None:
        raise ValueError(f"server {client.target} offers no backend {backend} (it offers "
                         f"{', '.join(offered) or 'none'})")
    if profile not in [p.profile for p in capability.profiles]:
        raise ValueError(f"server {client.target} offers no profile {profile} for {backend} (it offers "
                         f"{', '.join(p.profile for p in capability.profiles) or 'none'})")
    if wanted not in capability.layout_versions:
        raise ValueError(f"server {client.target} produces {list(capability.layout_versions) or 'nothing'} for "
                         f"{backend}, expected layout {wanted} (a server of another nvfp4-prep version?)")


def os_error_line(command: str, exc: OSError, fallback: object) -> str:
    """``nvfp4-prep COMMAND: PATH: REASON (errno NAME)``; PATH is ``fallback`` when the error names none."""
    path = exc.filename if exc.filename is not None else fallback
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    reason = exc.strerror or str(exc) or type(exc).__name__
    name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else type(exc).__name__
    return f"nvfp4-prep {command}: {os.fsdecode(path)}: {reason} (errno {name})"


def _report(outcome, out: str, limit: int = SHOWN_DIFFERENCES, passed: str = "identical to its source") -> int:
    """Prints a ``VerifyOutcome``: the source note first, then at most ``limit`` differences (0: all)."""
    if outcome.note:
        print(f"NOTE {out}: {outcome.note}")
    differences = outcome.differences
    shown = differences if limit == 0 else differences[:limit]
    for difference in shown:
        print(f"DIFFERENCE {difference}")
    if len(differences) > len(shown):
        print(f"... and {len(differences) - len(shown)} more differences (--max-differences 0 prints all)")
    if differences:
        print(f"{out}: {len(differences)} differences", file=sys.stderr)
        return EXIT_DIFFERENCES
    print(f"{out}: verified, {passed}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from nvfp4_prep.checkpoint import CheckpointError, open_checkpoint
    from nvfp4_prep.client.errors import PrepClientError
    from nvfp4_prep.contract.errors import PrepError
    from nvfp4_prep.prepared.prepare_job import prepare_checkpoint
    from nvfp4_prep.prepared.verify_output import verify_output

    location = args.checkpoint or sample_checkpoint()
    try:
        wanted = expected_layout(args.backend, args.profile, args.activation, args.input_scale_policy,
                                 args.gated_group_size, args.layout_version)
        scales = quantize_inputs(args)
        with open_checkpoint(location) as checkpoint:
            security = security_options(args)
            progress = LayerProgress(enabled=not args.quiet)
            options = {"profile": args.profile, "gated_group_size": args.gated_group_size}
            sending = Sending(send_mode(args.send, args.quantize), checkpoint, server_path(location, args.server_path),
                              args.backend, args.activation, args.input_scale_policy, options)
            try:
                with layer_preparers(_servers(args.server), args.timeout, security,
                                     (args.backend, args.profile, wanted), sending) as preparers:
                    summary = prepare_checkpoint(checkpoint, args.out, pinned(preparers, args.layout_version),
                                                 args.backend, args.activation,
                                                 args.input_scale_policy, progress=progress, overwrite=args.overwrite,
                                                 profile=args.profile, gated_group_size=args.gated_group_size,
                                                 tp_size=args.tp_size, ep_size=args.ep_size,
                                                 expert_placement=args.expert_placement, quantize=args.quantize,
                                                 activation_scales=scales)
            finally:
                progress.close()
            print(f"{summary.out_dir}: {summary.layers_prepared} layers prepared, {summary.layers_skipped} kept "
                  f"from an earlier run, {megabytes(summary.bytes_prepared)} in {summary.seconds:.2f}s, "
                  f"layout {summary.layout_id}")
            if summary.ranks:
                print(f"{summary.out_dir}: {len(summary.ranks)} rank folders ({', '.join(summary.ranks)}), listed in "
                      "nvfp4_prep_ranks.json; each folder's layout id names its rank")
            if args.verify:
                return _report(verify_output(args.out, checkpoint), summary.out_dir)
            print(f"next: nvfp4-prep verify {summary.out_dir}" + ("" if args.quantize else f" --against {location}"))
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


def quantize_inputs(args: argparse.Namespace) -> dict | None:
    """The activation scales ``--quantize`` needs (None without it); ValueError naming the flag otherwise."""
    if args.quantize is None:
        if args.activation_scales:
            raise ValueError("--activation-scales: given without --quantize; expected --quantize RECIPE for an "
                             "unquantized checkpoint (an NVFP4 one carries its scales)")
        return None
    if not args.activation_scales:
        raise ValueError("--activation-scales: missing; --quantize needs the activation scales (an NVFP4 checkpoint "
                         "of the same model or a calibration .safetensors file)")
    if args.verify:
        raise ValueError("--verify: compares the output with an NVFP4 source, and a --quantize run has none; "
                         "`nvfp4-prep verify DIR` checks the output against its manifest")
    from nvfp4_prep.prepared.activation_scales import load_activation_scales

    return load_activation_scales(args.activation_scales)


def run_verify(args: argparse.Namespace) -> int:
    from nvfp4_prep.checkpoint import CheckpointError
    from nvfp4_prep.prepared.integrity import verify_integrity
    from nvfp4_prep.prepared.verify_output import VerifyOutcome, verify_output

    try:
        if args.against is None:  # no source at hand: the folder against its own manifest
            return _report(VerifyOutcome(None, verify_integrity(args.out)), args.out, args.max_differences,
                           "consistent with its manifest (checksums, layout record; give --against CKPT to "
                           "compare with the source)")
        return _report(verify_output(args.out, args.against), args.out, args.max_differences)
    except CheckpointError as exc:
        print(f"nvfp4-prep verify: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # an unreadable DIR is not "differences" (1)
        print(os_error_line("verify", exc, args.out), file=sys.stderr)
        return EXIT_OS_ERROR
