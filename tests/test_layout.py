"""The shape of the code, as the architecture in README.md describes it: small modules, no import circles, and
private names of aioftp and asyncio in one module only (``gateway/aioftp_compat.py``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "pathio_backends")
MAX_LINES = 600
COMPAT = ROOT / "gateway" / "aioftp_compat.py"
# Private or undocumented names of aioftp and asyncio the gateway once reached into.
PRIVATE = re.compile(
    r"\._buffer\b|\"_buffer\"|\._eof\b|\"_eof\"|_start_passive_server|available_data_ports|throttle_per_user"
    r"|\._dispatcher\b|\.connections\b"
)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue  # Alembic's revisions are loaded by Alembic, not imported
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that ``name`` imports, anywhere in it (type-checking and function-level imports
    too): ``from a.b import c`` is ``a.b.c`` where that is a module, else ``a.b``."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


def test_no_module_is_over_600_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: size for name, size in sizes.items() if size > MAX_LINES} == {}


def test_no_import_circles() -> None:
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    circles = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                circles.append([*trail[trail.index(target) :], target] if target in trail else [name, target])
            elif target not in state:
                visit(target, [*trail, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []
    # The check sees imports: the server reaches the commands, which reach the data channel and the backends.
    assert "gateway.commands.transfer" in graph["gateway.server"]
    assert "gateway.datachannel" in graph["gateway.commands.transfer"]


def test_private_aioftp_and_asyncio_names_only_in_the_compat_module() -> None:
    outside = {
        str(path.relative_to(ROOT)): sorted(set(PRIVATE.findall(path.read_text())))
        for path in modules().values()
        if path != COMPAT and PRIVATE.search(path.read_text())
    }
    assert outside == {}
    assert PRIVATE.search(COMPAT.read_text())  # the pattern does find what the compat module holds


def test_the_command_modules_do_not_import_each_other() -> None:
    found = modules()
    commands = {name for name in found if name.startswith("gateway.commands.") and name != "gateway.commands.base"}
    sideways = {name: sorted(imports(name, found[name], set(found)) & commands) for name in commands}
    assert {name: targets for name, targets in sideways.items() if targets} == {}
