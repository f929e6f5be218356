"""``--layout-version``: the layout id every prepared layer must carry, whoever prepares it.

The id is checked three times: against what this package's contract names for the options, before
anything is opened or written (``expected_layout``); against what each server offers, with its health
(``checkpoint_commands.check_server``); and against every layer's answer (``pin_layout``). A rank's id is
the whole layer's followed by its shard (``.../tp0of2/ep1of2-linear``), so one pinned id serves every rank
of a set. Each message names both ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from nvfp4_prep.client.errors import PrepLayoutMismatch

if TYPE_CHECKING:  # the job's modules load torch: not for ``nvfp4-prep --help``
    from nvfp4_prep.prepared.prepare_job import LayerPreparer, PreparedLike

# Parts of a layout id that name a rank's shard (contract.layout.layout_id).
SHARD_PARTS = 2


def expected_layout(backend: str, profile: str, activation: str, policy: str, gated_group_size: int,
                    layout_version: str | None) -> str:
    """The whole layer's layout id for the options; PrepLayoutMismatch when ``layout_version`` pins another."""
    from nvfp4_prep.contract.layout import layout_id

    expected = layout_id(backend, profile=profile, activation=activation, policy=policy,
                         gated_group_size=gated_group_size)
    if layout_version is not None and layout_version != expected:
        raise PrepLayoutMismatch(f"--layout-version: these options prepare {expected!r}, not {layout_version!r}",
                                 field="layout_version")
    return expected


def whole_layer_id(layout: dict) -> str | None:
    """The layout id of ``layout`` without its shard part."""
    produced = layout.get("layout_id")
    if produced is None or (layout.get("tp_size", 1) == 1 and layout.get("ep_size", 1) == 1):
        return produced
    return "/".join(produced.split("/")[:-SHARD_PARTS])


def check_layout(layout: dict, layout_version: str) -> None:
    """PrepLayoutMismatch naming both ids when ``layout`` is not (a shard of) the pinned one."""
    produced = whole_layer_id(layout)
    if produced != layout_version:
        raise PrepLayoutMismatch(f"--layout-version: this layer was prepared as {layout.get('layout_id')!r}, "
                                 f"not {layout_version!r}", field="layout_version")


def pin_layout(preparers: Sequence[LayerPreparer], layout_version: str | None) -> list[LayerPreparer]:
    """``preparers``, each making sure of ``layout_version`` (None: any layout, as they are)."""
    if layout_version is None:
        return list(preparers)
    return [_checked(preparer, layout_version) for preparer in preparers]


def _checked(preparer: Callable[..., PreparedLike], layout_version: str) -> LayerPreparer:
    def prepare(*args: object, **options: object) -> PreparedLike:
        prepared = preparer(*args, **options)
        check_layout(prepared.layout, layout_version)
        return prepared
    return prepare
