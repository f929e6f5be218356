"""Where the CLI's log lines go: stderr, warnings by default, INFO with ``-v``, DEBUG with ``-vv``.

The libraries only log (their loggers have a NullHandler); the program decides what is shown. By default
that is warnings, plus the SDK's retries (logged at INFO, logger ``nvfp4_prep.client.retry``): a call
that waits for a restarting server would otherwise look hung. An error the CLI reports as its one error
line is not logged above DEBUG by the SDK, so it is printed once. ``serve`` sets up its own logging
(``--log-level``, ``--log-format``) and is left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator

from nvfp4_prep.contract.environment import env_value

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Logged at INFO by the SDK, shown at the default level.
SHOWN_BY_DEFAULT = ("nvfp4_prep.client.retry",)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as ``serve --log-format text`` writes


def add_logging_flags(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """``-v/--verbose`` and ``--log-level``; ``defaults`` False for a subcommand's copy, so that a flag
    given before the subcommand is not reset by the subcommand's defaults."""
    parser.add_argument("-v", "--verbose", action="count", default=0 if defaults else argparse.SUPPRESS,
                        help="log more to stderr: -v INFO, -vv DEBUG (default: warnings and retries)")
    parser.add_argument("--log-level", dest="cli_log_level", type=_level, metavar="LEVEL",
                        default=env_value("log-level") if defaults else argparse.SUPPRESS,
                        help=f"log at this level or above to stderr, one of {', '.join(LEVELS)} (default: WARNING) "
                             "[env NVFP4_PREP_LOG_LEVEL]")


def _level(text: str) -> str:
    """A level name in any case; the variable's value is checked here too, as argparse converts defaults."""
    if text.upper() not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LEVELS)} "
                                         "(from --log-level or NVFP4_PREP_LOG_LEVEL)")
    return text.upper()


def level_of(verbose: int, log_level: str | None) -> int:
    """The more talkative of ``--log-level`` (WARNING when unset) and ``-v`` counts (INFO, then DEBUG)."""
    named = logging.getLevelName(log_level) if log_level else logging.WARNING
    return max(logging.DEBUG, min(named, logging.WARNING - 10 * verbose))


class _Stderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes (tests and callers may swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


@contextlib.contextmanager
def cli_logging(level: int) -> Iterator[None]:
    """Log lines at ``level`` and above to stderr while the command runs; as before afterwards, so that
    ``main()`` called in a process (a test, a script) leaves that process's logging as it found it."""
    root = logging.getLogger()
    handler = _Stderr()
    handler.setFormatter(logging.Formatter(FORMAT))
    promoted = [logging.getLogger(name) for name in SHOWN_BY_DEFAULT] if level == logging.WARNING else []
    saved = root.level, [(logger, logger.level) for logger in promoted]
    root.addHandler(handler)
    root.setLevel(level)
    for logger in promoted:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        for logger, previous in saved[1]:
            logger.setLevel(previous)
