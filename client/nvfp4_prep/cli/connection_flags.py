"""The connection flags of the client commands (``info``, ``layer``, ``prepare --server``): TLS, the token,
how long to retry, and the bulk transport.

Each flag ``--foo`` may also come from ``NVFP4_PREP_FOO``. The token is read
from a file (a Kubernetes Secret mounted as a file, typically), never taken on
the command line, where ``ps`` would show it.
"""

from __future__ import annotations

import argparse
import math
import os

from nvfp4_prep.contract.environment import env_value
from nvfp4_prep.wire.bulk_transport import MAX_STREAMS


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


# Bulk connections per call unless told otherwise: a server started with --bulk-address then moves the tensor bytes
# over them (several times the inline stream's rate); one without, or out of reach, answers inline.
DEFAULT_BULK_STREAMS = 4


def _bulk_streams(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_STREAMS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of bulk streams from 0 to {MAX_STREAMS}")
    return value


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """The TLS and token flags, ``--retry-timeout`` and ``--bulk-streams``."""
    parser.add_argument("--tls-ca", default=env_value("tls-ca"), metavar="PEM",
                        help="speak TLS, trusting the server certificates this CA signed (with --tls-cert alone: "
                             "the system's CAs) [env NVFP4_PREP_TLS_CA]")
    parser.add_argument("--tls-cert", default=env_value("tls-cert"), metavar="PEM",
                        help="this client's certificate, for servers that require mutual TLS "
                             "[env NVFP4_PREP_TLS_CERT]")
    parser.add_argument("--tls-key", default=env_value("tls-key"), metavar="PEM",
                        help="the private key of --tls-cert [env NVFP4_PREP_TLS_KEY]")
    parser.add_argument("--token-file", default=env_value("token-file"), metavar="FILE",
                        help="file whose first line is the bearer token the server wants [env NVFP4_PREP_TOKEN_FILE]")
    parser.add_argument("--retry-timeout", type=_seconds, default=env_value("retry-timeout", "60"), metavar="SECONDS",
                        help="keep retrying a call that failed for a passing reason (server restarting or "
                             "unreachable, too busy) for this long, with backoff; 0: no retries (default 60) "
                             "[env NVFP4_PREP_RETRY_TIMEOUT]")
    parser.add_argument("--bulk-streams", type=_bulk_streams,
                        default=env_value("bulk-streams", str(DEFAULT_BULK_STREAMS)), metavar="N",
                        help="move tensor bytes over N TCP connections beside each Prepare call (the server's "
                             f"--bulk-address; TLS like the channel), 1 to {MAX_STREAMS}; inline when the server "
                             "has none or it cannot be reached; 0: always inline (default "
                             f"{DEFAULT_BULK_STREAMS}) [env NVFP4_PREP_BULK_STREAMS]")


def security_options(args: argparse.Namespace) -> dict:
    """``PrepClient`` keyword arguments from the flags (``retry_timeout`` too); ValueError naming the flag when
    one is unusable."""
    from nvfp4_prep.client.credentials import read_token_file

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key: give both (mutual TLS) or neither")
    for flag, path in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"{flag}: {path!r} is not a readable file")
    options = {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
               "retry_timeout": args.retry_timeout, "bulk_streams": getattr(args, "bulk_streams", DEFAULT_BULK_STREAMS)}
    if args.token_file is not None:
        options["token"] = read_token_file(args.token_file)
    return options
