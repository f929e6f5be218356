"""Byte counts as people read them: decimal units (1 MB = 10**6 bytes), as disks and ``--memory-budget 2GB`` count.

One helper for every size the CLI prints (progress lines, summaries, ``info``), so that figures a user
compares are written the same way.
"""

from __future__ import annotations

MB = 10**6
# Largest first; a count below 1 kB stays in bytes.
UNITS = (("TB", 10**12), ("GB", 10**9), ("MB", MB), ("kB", 10**3))
# Decimals by unit: a gigabyte hides more than a megabyte, so it keeps one more.
_DECIMALS = {"TB": 2, "GB": 2, "MB": 1, "kB": 1}
_SIZES = dict(UNITS)


def human_bytes(nbytes: int, unit: str | None = None) -> str:
    """``"3.4 MB"``, ``"1.23 GB"``, ``"512 B"``: in the largest unit that ``nbytes`` reaches, or in ``unit``
    (one of ``UNITS``' names) when figures must line up with others in that unit (a progress bar's)."""
    if unit is None:
        unit = next((name for name, size in UNITS if abs(nbytes) >= size), "B")
    if unit == "B":
        return f"{nbytes} B"
    if unit not in _SIZES:
        raise ValueError(f"unit: {unit!r} is not one of {[name for name, _ in UNITS] + ['B']}")
    return f"{nbytes / _SIZES[unit]:.{_DECIMALS[unit]}f} {unit}"
