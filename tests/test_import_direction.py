"""The rooms of the nvfp4_prep namespace import each other in one direction only.

Every module under proto/, server/ and client/ lives at ``<root>/nvfp4_prep/<room>/``; a room may import
its own modules and those of the rooms ``ALLOWED`` names for it, nothing else of ours. The static test reads
every import statement with ``ast`` (those inside functions too); the subprocess tests check what importing
the SDK and the contract really loads.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("proto", "server", "client")
PACKAGE = "nvfp4_prep"

ROOMS = frozenset({"contract", "v1", "wire", "pipeline", "checkpoint", "server", "client", "prepared", "cli",
                   "engines"})
# room -> the other rooms of ours it may import (its own is always allowed).
ALLOWED: dict[str, frozenset[str]] = {
    "contract": frozenset(),
    "v1": frozenset(),
    "wire": frozenset({"v1", "contract"}),
    "pipeline": frozenset({"contract"}),
    "checkpoint": frozenset({"contract", "pipeline"}),
    "server": frozenset({"v1", "wire", "contract", "pipeline", "checkpoint"}),
    "client": frozenset({"v1", "wire", "contract"}),
    "prepared": frozenset({"contract", "checkpoint", "pipeline", "wire", "client"}),
    "cli": ROOMS,
    # Engine loaders (vLLM, ...) take prepared layers from a folder (prepared) or a server (client).
    "engines": frozenset({"contract", "client", "prepared"}),
}


def _modules() -> list[tuple[Path, tuple[str, ...]]]:
    """(file, dotted module name as parts) of every module of ours."""
    found = []
    for root in ROOTS:
        base = REPO / root
        for path in sorted((base / PACKAGE).rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append((path, parts))
    return found


def _imported(tree: ast.AST, module: tuple[str, ...], is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of everything the module imports, relative imports resolved.

    ``from nvfp4_prep import pipeline`` names ``nvfp4_prep.pipeline``: the room is the imported name."""
    package = module if is_package else module[:-1]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]  # level 1: this package, 2: its parent, ...
                prefix = ".".join(base + ((node.module,) if node.module else ()))
            else:
                prefix = node.module or ""
            if prefix == PACKAGE:
                names += [(node.lineno, f"{PACKAGE}.{alias.name}") for alias in node.names]
            else:
                names.append((node.lineno, prefix))
    return names


def _room_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    return parts[1]


def test_modules_were_found() -> None:
    rooms = {parts[1] for _, parts in _modules() if len(parts) > 1}
    assert rooms == ROOMS, f"rooms on disk {sorted(rooms)} differ from the rooms this test knows {sorted(ROOMS)}"


def test_rooms_import_only_in_the_allowed_direction() -> None:
    violations = []
    for path, module in _modules():
        where = path.relative_to(REPO)
        if len(module) < 2:
            violations.append(f"{where}: a module directly in the {PACKAGE} namespace, outside every room")
            continue
        room = module[1]
        if room not in ALLOWED:
            violations.append(f"{where}: room {room!r} has no import rule in this test")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, name in _imported(tree, module, path.name == "__init__.py"):
            target = _room_of(name)
            if name == PACKAGE or target is None or target == room:
                continue
            if target not in ALLOWED[room]:
                allowed = ", ".join(sorted(ALLOWED[room])) or "nothing of ours"
                violations.append(f"{where}:{line}: {room} imports {name} (room {target}); {room} may import {allowed}")
    assert not violations, "imports against the room direction:\n  " + "\n  ".join(violations)


def _loaded_after(statement: str) -> list[str]:
    """Names in sys.modules after running ``statement`` in a fresh interpreter."""
    script = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = dict(os.environ)
    env.pop("PYTHONSTARTUP", None)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=300)
    assert run.returncode == 0, f"{statement!r} failed:\n{run.stderr}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def _matching(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_importing_the_sdk_loads_no_server_side_room_and_no_triton() -> None:
    forbidden = ("nvfp4_prep.pipeline", "nvfp4_prep.server", "nvfp4_prep.checkpoint", "nvfp4_prep.prepared",
                 "triton")
    offending = _matching(_loaded_after("import nvfp4_prep.client"), forbidden)
    assert not offending, f"import nvfp4_prep.client loaded: {', '.join(offending)}"


@pytest.mark.parametrize("module", ["nvfp4_prep.contract.layout", "nvfp4_prep.contract.environment"])
def test_contract_modules_do_not_import_torch(module: str) -> None:
    offending = _matching(_loaded_after(f"import {module}"), ("torch",))
    assert not offending, f"import {module} loaded torch: {', '.join(offending[:20])}"
