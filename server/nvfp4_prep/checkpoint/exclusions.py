"""A quantization config's list of modules left unquantized, matched in time linear in the name.

Entries are exact module names, fnmatch globs (ModelOpt) or ``re:`` regular expressions
(compressed-tensors, matched from the start as llm-compressor does). They come from a file the
server is asked to read, so they are never run by a backtracking engine: ``re:(a+)+$`` against a
crafted name would hold a thread for ever. Regular expressions and globs are compiled together into
one RE2 program (linear time, no backreferences or lookaround); exact names are a set.
"""

from __future__ import annotations

from collections.abc import Sequence

import re2

from .errors import CheckpointInvalid, shown

_GLOB_CHARS = frozenset("*?[")
# RE2's memory for the compiled list (its default is 8 MiB); a config is at most a few MiB of text.
_MAX_PROGRAM_BYTES = 64 << 20


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # errors become CheckpointInvalid, not lines on stderr
    options.never_capture = True
    options.max_mem = _MAX_PROGRAM_BYTES
    return options


def _error_text(exc: re2.error) -> str:
    detail = exc.args[0] if exc.args else ""
    return detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)


def glob_pattern(glob: str) -> str:
    """``fnmatch.fnmatchcase``'s syntax (``*``, ``?``, ``[seq]``, ``[!seq]``) as an RE2 pattern of the whole name."""
    out, i, n = [], 0, len(glob)
    while i < n:
        char = glob[i]
        i += 1
        if char == "*":
            if not out or out[-1] != ".*":
                out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[":
            j = i + (i < n and glob[i] == "!")
            j += j < n and glob[j] == "]"
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal "[", as fnmatch has it
                out.append(r"\[")
                continue
            body, i = glob[i:j], j + 1
            negate = body.startswith("!")
            body = body[1:] if negate else body
            body = body.replace("\\", r"\\").replace("[", r"\[").replace("]", r"\]")
            if not negate and body.startswith("^"):
                body = "\\" + body
            out.append(f"[{'^' if negate else ''}{body}]")
        else:
            out.append(re2.escape(char))
    return "(?s:" + "".join(out) + r")\z"


class Exclusions:
    """The entries of one exclusion list (``where`` names it in errors), compiled once."""

    def __init__(self, entries: Sequence[str], where: str) -> None:
        self.entries = tuple(entries)
        self._exact = {entry for entry in self.entries if not entry.startswith("re:")}  # a glob equals itself too
        patterns = []
        for index, entry in enumerate(self.entries):
            if entry.startswith("re:"):
                pattern = entry[3:]
            elif _GLOB_CHARS.intersection(entry):
                pattern = glob_pattern(entry)
            else:
                continue
            try:
                re2.compile(pattern, _options())
            except re2.error as exc:
                kind = "regular expression" if entry.startswith("re:") else "glob"
                raise CheckpointInvalid(
                    f"{where}[{index}]: {shown(entry)!r} is not a {kind} RE2 accepts ({shown(_error_text(exc))}); "
                    "expected a pattern without backreferences or lookaround") from None
            patterns.append(f"(?:{pattern})")
        self._pattern = None
        if patterns:
            try:
                self._pattern = re2.compile("|".join(patterns), _options())
            except re2.error as exc:
                raise CheckpointInvalid(
                    f"{where}: its {len(patterns)} patterns together are too large to match "
                    f"({shown(_error_text(exc))}); expected a shorter list") from None

    def excludes(self, module: str) -> bool:
        """True when ``module`` or a module above it (``a.b`` for ``a.b.c``) matches an entry."""
        parts = module.split(".")
        for end in range(1, len(parts) + 1):
            candidate = ".".join(parts[:end])
            if candidate in self._exact or (self._pattern is not None and self._pattern.match(candidate)):
                return True
        return False
