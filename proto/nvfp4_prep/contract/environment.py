"""``NVFP4_PREP_*`` environment variables: every flag ``--foo-bar`` of every command may come from
``NVFP4_PREP_FOO_BAR``, and a flag on the command line wins. The name rule and the read live here alone;
each variable's default lives with its flag."""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV_PREFIX = "NVFP4_PREP_"


def env_name(flag: str) -> str:
    """``NVFP4_PREP_FOO_BAR`` for the flag ``foo-bar`` (or ``--foo-bar``)."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def env_value(flag: str, default: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The variable of ``flag``; an empty value counts as unset (``FOO=`` in a manifest clears it)."""
    value = (os.environ if environ is None else environ).get(env_name(flag), "")
    return value if value != "" else default
