"""The README documents every setting and every CLI command (so neither can be added silently)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gateway.cli import build_parser
from gateway.config import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()


def setting_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation: Any = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += setting_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_setting_is_in_the_readme() -> None:
    missing = [key for key in setting_keys(Settings) if f"`{key}`" not in README]
    assert missing == []


def test_every_command_is_in_the_readme() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    names = []
    for name, sub in commands.items():
        nested = [a for a in sub._actions if a.choices and a.dest.endswith("_command")]
        names += [f"ftp-gateway {name} {leaf}" for leaf in nested[0].choices] if nested else [f"ftp-gateway {name}"]
    missing = [name for name in names if name not in README]
    assert missing == []
