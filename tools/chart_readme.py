"""The values table of helm/ftp-gateway/README.md, generated from the `# --` comments of values.yaml.

helm-docs (the usual tool for this) is a Go program that is not on PyPI, so this script reads the same
convention: a comment starting with `# --` (continued by the `#` lines right after it) documents the key on
the next line. `--write` rewrites the table between the README's markers; `--check` exits 1 when it is stale
(tests/test_chart.py runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "ftp-gateway"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"
KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z0-9_]+):")

Row = tuple[str, str, str, str]


def rows(values_text: str) -> list[Row]:
    """(dotted key, type, default, description) for every documented key, in file order."""
    data = yaml.safe_load(values_text)
    stack: list[tuple[int, str]] = []
    description: list[str] | None = None
    found: list[Row] = []
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            description = [stripped.removeprefix("# --").strip()]
            continue
        if stripped.startswith("#"):
            if description is not None:
                description.append(stripped.removeprefix("#").strip())
            continue
        match = KEY.match(line)
        if not match:
            if not stripped:
                description = None
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if description is not None:
            path = [key for _, key in stack]
            value = lookup(data, path)
            found.append((".".join(path), type_name(value), json.dumps(value), " ".join(description)))
            description = None
    return found


def lookup(data: Any, path: list[str]) -> Any:
    for key in path:
        data = data[key]
    return data


def type_name(value: Any) -> str:
    if value is None:
        return "int or null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}[type(value)]


def table(found: list[Row]) -> str:
    lines = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for key, kind, default, description in found:
        cell, text = default.replace("|", "\\|"), description.replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | `{cell}` | {text} |")
    return "\n".join(lines)


def rendered_readme() -> tuple[Path, str, str]:
    readme = CHART / "README.md"
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    if END not in rest:
        raise SystemExit(f"{readme}: the markers {START} ... {END} are missing")
    new = f"{head}{START}\n{table(rows((CHART / 'values.yaml').read_text()))}\n{END}{tail}"
    return readme, text, new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="rewrite the table in helm/ftp-gateway/README.md")
    group.add_argument("--check", action="store_true", help="exit 1 when the table is not up to date")
    args = parser.parse_args(argv)
    readme, old, new = rendered_readme()
    if args.write:
        readme.write_text(new)
        return 0
    if old != new:
        print(f"{readme} is out of date: run python tools/chart_readme.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
