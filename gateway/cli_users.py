"""How the ``user`` subcommands read their limit flags and show a user (moved out of cli.py, which is near its
size limit)."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.users.store import UserInfo

# The flags of limit_options (gateway/cli_types.py) that map to a UserChanges field of the same name.
LIMIT_FLAGS = ("max_sessions", "upload_limit", "download_limit", "tls", "quota_bytes", "quota_files")


def limits(args: argparse.Namespace) -> dict[str, Any]:
    """The limit flags given on the command line (``0`` and ``default`` included: they reset)."""
    return {name: getattr(args, name) for name in LIMIT_FLAGS if getattr(args, name) is not None}


def size_text(value: int) -> str:
    """``123``, ``1.5K``, ``10.0G``: bytes in powers of 1024, for people (JSON keeps the exact numbers)."""
    if value < 1024:
        return str(value)
    amount = float(value)
    for unit in "KMGTP":
        amount /= 1024
        if amount < 1024 or unit == "P":
            break
    return f"{amount:.1f}{unit}"


def usage_text(used: int, quota: int | None, sizes: bool) -> str:
    """``used / quota``, e.g. ``1.5M / 10.0G`` or ``3 / unlimited``."""
    show = size_text if sizes else str
    return f"{show(used)} / {show(quota) if quota else 'unlimited'}"


def describe(info: UserInfo) -> list[str]:
    def rate(value: int | None) -> str:
        return f"{value} bytes/s" if value else "unlimited"

    lines = [
        f"name:           {info.name}",
        f"enabled:        {'yes' if info.enabled else 'no'}",
        f"storage:        {info.storage_uri or '(server default)'}",
        f"home:           {info.home}",
        f"tls:            {info.tls or '(server default)'}",
        f"max sessions:   {info.max_sessions or 'unlimited'}",
        f"upload limit:   {rate(info.upload_limit)}",
        f"download limit: {rate(info.download_limit)}",
        f"bytes used:     {usage_text(info.used_bytes, info.quota_bytes, True)}",
        f"files used:     {usage_text(info.used_files, info.quota_files, False)}",
        f"created:        {info.created_at.isoformat(timespec='seconds') if info.created_at else '-'}",
        f"last login:     {info.last_login_at.isoformat(timespec='seconds') if info.last_login_at else 'never'}",
        "permissions:",
    ]
    lines += [f"  {path} {mode}" for path, mode in info.permissions.items()]
    return lines


def table(users: list[UserInfo]) -> list[str]:
    """``user list``: one line a user, in columns; the last (the login time) is not padded."""
    rows = [("NAME", "ENABLED", "SESSIONS", "STORAGE", "BYTES USED", "LAST LOGIN")]
    for u in users:
        last = u.last_login_at.strftime("%Y-%m-%d %H:%M") if u.last_login_at else "never"
        rows.append(
            (
                u.name,
                "yes" if u.enabled else "no",
                str(u.max_sessions or "-"),
                u.storage_uri or "(default)",
                usage_text(u.used_bytes, u.quota_bytes, True),
                last,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ]
