"""nvfp4-prep: prepare NVFP4 MoE weights for FlashInfer kernels on a gRPC server.

The connection flags of the client commands come from the environment too
(``--server`` <-> ``NVFP4_PREP_SERVER``); ``serve`` and ``prepare`` read every flag
from it, as their ``--help`` says. ``-v`` and ``--log-level`` (``NVFP4_PREP_LOG_LEVEL``)
choose what the client commands log to stderr (``logging_setup``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from nvfp4_prep.contract.environment import env_value
from nvfp4_prep.wire import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

from . import checkpoint_commands, info_command, inspect_command, quantize_command
from .connection_flags import add_security_flags, security_options
from .logging_setup import add_logging_flags, cli_logging, level_of

EXIT_USAGE = 2
EXIT_FAILED = 1


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    server = env_value("server")
    parser.add_argument("--server", default=server, required=server is None,
                        help="server address: host:port, ipv4:h:p1,h:p2 or dns:///name:port [env NVFP4_PREP_SERVER]")
    parser.add_argument("--timeout", type=float, default=env_value("timeout", "600"),
                        help="seconds per call, retries included (default 600) [env NVFP4_PREP_TIMEOUT]")
    add_security_flags(parser)


def _serve(args: argparse.Namespace) -> int:
    from nvfp4_prep.server.config import ConfigError, ServeConfig

    try:
        config = ServeConfig.from_args(args)
        from nvfp4_prep.server.server import run
        return run(config)
    except ConfigError as err:
        print(f"nvfp4-prep serve: {err}", file=sys.stderr)
        return EXIT_USAGE


def _layer(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError
    from tqdm import tqdm

    from nvfp4_prep.checkpoint import CheckpointError
    from nvfp4_prep.client.errors import PrepClientError
    from nvfp4_prep.client.sdk import PrepClient, Progress

    from .layer_file import write_prepared_layer
    from .layer_input import read_layer_input

    def usage(message: str) -> int:
        print(f"nvfp4-prep layer: {message}", file=sys.stderr)
        return EXIT_USAGE

    try:
        security = security_options(args)
    except ValueError as err:
        return usage(str(err))
    try:
        prefix, tensors = read_layer_input(args.input, args.layer_prefix, args.activation)
    except (ValueError, CheckpointError) as err:  # names INPUT, --layer-prefix or the tensor itself
        return usage(str(err))
    except (OSError, SafetensorError) as err:
        return usage(f"{args.input}: cannot read the stacked layer or per-expert tensors ({err})")
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, disable=args.quiet)
    phase = [""]

    def progress(event: Progress) -> None:
        if phase[0] != event.phase:
            phase[0] = event.phase
            bar.set_description(event.phase)
            bar.reset(total=event.total)
        bar.update(event.done - bar.n)

    try:
        with PrepClient(args.server, timeout=args.timeout, chunk_size=args.chunk_size, **security) as client:
            layer = client.prepare_layer(tensors, args.backend, args.activation, args.input_scale_policy,
                                         profile=args.profile, gated_group_size=args.gated_group_size,
                                         layout_version=args.layout_version, progress=progress)
    except PrepClientError as err:  # its text ends with "(request <id>)", as the server's log lines name it
        bar.close()  # before the line, which would otherwise follow the bar's last frame
        print(f"nvfp4-prep layer: {err}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as err:
        bar.close()
        return usage(str(err))
    bar.close()
    try:
        write_prepared_layer(args.output, prefix, layer)
    except (OSError, SafetensorError, ValueError) as err:
        return usage(f"{args.output}: cannot write the prepared layer ({err})")
    if not args.quiet:
        print(f"wrote {args.output}: {len(layer.tensors)} tensors, layout {layer.layout['layout_id']} "
              f"(request {layer.request_id})", file=sys.stderr)
    return 0


def _size(text: str) -> int:
    from nvfp4_prep.server.config import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _chunk_size(text: str) -> int:
    size = _size(text)
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text!r} is {size} bytes (expected {MIN_CHUNK_SIZE >> 10}KiB to {MAX_CHUNK_SIZE >> 20}MiB)")
    return size


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("nvfp4-prep")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from nvfp4_prep.server.config import add_arguments

    parser = argparse.ArgumentParser(prog="nvfp4-prep", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    add_logging_flags(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = subparsers.add_parser("serve", help="run the gRPC server",
                                  description="Run the nvfp4-prep gRPC server (one worker per device). Every "
                                              "flag --foo-bar may also be set as NVFP4_PREP_FOO_BAR.")
    add_arguments(serve)
    serve.set_defaults(run=_serve)

    info = subparsers.add_parser("info", help="show a server's versions, devices, backends and limits",
                                 description="Ask a server what it runs and offers (GetCapabilities and health); "
                                             "sizes in decimal units, exact bytes with --json.")
    _add_client_flags(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=info_command.run_info)

    layer = subparsers.add_parser(
        "layer", help="prepare one layer: a stacked or per-expert safetensors file, or a checkpoint's layer",
        description="Send one MoE layer to a server and write the prepared layer, with its layout record in the "
                    "metadata, to OUTPUT. INPUT is a safetensors file holding one stacked layer (w13_weight, "
                    "w13_weight_scale, ... optionally under a prefix) or one layer's per-expert tensors "
                    "(<prefix>.<e>.gate_proj.weight, ... or w1/w3/w2), or a ModelOpt or compressed-tensors "
                    "checkpoint (its directory, or a .safetensors file beside its config.json) with "
                    "--layer-prefix naming the layer. For every layer of a checkpoint use nvfp4-prep prepare.")
    layer.add_argument("input", type=Path, metavar="INPUT",
                       help="safetensors file holding one layer, or a checkpoint directory or file")
    layer.add_argument("output", type=Path, metavar="OUTPUT", help="safetensors file to write")
    _add_client_flags(layer)
    checkpoint_commands.add_layout_flags(layer)  # the same choices and defaults as ``prepare``
    layer.add_argument("--layer-prefix", "--prefix", dest="layer_prefix", default=None, metavar="PREFIX",
                       help="the layer's prefix in INPUT (e.g. model.layers.3.mlp.experts): needed for a "
                            "checkpoint, or a file holding several layers")
    layer.add_argument("--chunk-size", type=_chunk_size, default=DEFAULT_CHUNK_SIZE,
                       help=f"bytes per upload chunk, {MIN_CHUNK_SIZE >> 10}KiB to {MAX_CHUNK_SIZE >> 20}MiB "
                            "(default 2MiB)")
    layer.add_argument("--quiet", action="store_true", help="no progress bar")
    layer.set_defaults(run=_layer)

    checkpoint_commands.register(subparsers)
    inspect_command.register(subparsers)
    quantize_command.register(subparsers)
    for name, command in subparsers.choices.items():
        if name != "serve":  # serve has its own --log-level and --log-format
            add_logging_flags(command, defaults=False)  # after the command as well as before it
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command and returns its exit status (tests call it in-process)."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return args.run(args)
    with cli_logging(level_of(args.verbose, args.cli_log_level)):
        return args.run(args)


def entry() -> None:
    """The ``nvfp4-prep`` program: ``main``, then an exit that skips the interpreter's teardown.

    Every channel and server is closed by then, but grpcio's daemon threads may
    still be unwinding streams that were cancelled (a server died, a layer
    failed); finalising the interpreter under them can abort the process
    (``std::terminate``, exit -6) after the real status was decided.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
