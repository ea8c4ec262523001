"""``ftp-gateway ban list`` and ``ftp-gateway ban delete IP``: the bans in the Redis store the gateways share.

They need ``bans.redis_url`` (or ``cluster.redis_url``): bans kept in a server's memory live in that process alone,
which this command cannot reach, so then it says so in one line (exit 2) instead of showing an empty list.
"""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any

from gateway import runtime
from gateway.bans import BannedIP, BanStoreError, NameFailures, RedisStore, ban_key, client_key, redis_store
from gateway.cli_types import EXIT_FAILURE, CliError
from gateway.config import Settings


def add_parser(commands: Any, common: argparse.ArgumentParser, parser_class: type[argparse.ArgumentParser]) -> None:
    """Register ``ban list`` and ``ban delete IP`` on ``commands`` (cli.py's subparsers)."""
    ban = commands.add_parser("ban", help="list or lift the bans of client IPs (in Redis)").add_subparsers(
        dest="ban_command", required=True, metavar="COMMAND", parser_class=parser_class
    )
    ban.add_parser("list", parents=[common], help="banned IPs and slowed user names").set_defaults(func=cmd_list)
    delete = ban.add_parser(
        "delete", parents=[common], help="lift the ban of an IP or IPv6 network (and forget its failed logins)"
    )
    delete.add_argument("ip", type=ip_address, metavar="IP")
    delete.set_defaults(func=cmd_delete)


def ip_address(text: str) -> str:
    """An address (canonical) or a network as ``ban list`` shows it (``2001:db8:1:2::/64``); which network
    bans are kept for is checked against the settings' ``bans.ipv6_prefix`` by :func:`cmd_delete`."""
    text = text.strip()
    try:
        if "/" in text:
            return str(ipaddress.ip_network(text, strict=False))
        return client_key(text, 128)  # the address itself, spelt one way
    except ValueError:
        what = "network" if "/" in text else "address"
        raise argparse.ArgumentTypeError(f"invalid IP {what} {text!r}") from None


def _store(settings: Settings) -> RedisStore:
    store = redis_store(settings)
    if store is None:
        raise CliError(
            "bans are kept in the memory of the serving process (bans.redis_url is not set); "
            "they end with it or when they expire"
        )
    return store


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    store = _store(settings)

    async def fetch() -> tuple[list[BannedIP], list[NameFailures]]:
        try:
            return await store.bans(), await store.names()
        finally:
            await store.aclose()

    try:
        banned, names = runtime.run(fetch(), "asyncio")
    except BanStoreError as exc:
        raise CliError(f"ban store: {exc}", EXIT_FAILURE) from None
    policy = settings.bans
    if banned:
        _table([("IP", "REMAINING", "FAILURES"), *((b.ip, _duration(b.remaining), str(b.failures)) for b in banned)])
    else:
        print("no IP is banned")
    slowed = [n for n in names if n.failures >= policy.max_failures]
    if slowed:
        print(f"user names slowed (failed logins in the last {policy.window:g} s):")
        # A name is what a client sent: shown escaped when it holds control characters (a terminal's escapes).
        _table(
            [
                ("NAME", "FAILURES"),
                *((n.name if n.name.isprintable() else repr(n.name), str(n.failures)) for n in slowed),
            ]
        )
    return 0


def cmd_delete(settings: Settings, args: argparse.Namespace) -> int:
    try:
        key = ban_key(args.ip, settings.bans.ipv6_prefix)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    store = _store(settings)

    async def delete() -> bool:
        try:
            return await store.delete(key)
        finally:
            await store.aclose()

    try:
        lifted = runtime.run(delete(), "asyncio")
    except BanStoreError as exc:
        raise CliError(f"ban store: {exc}", EXIT_FAILURE) from None
    if not lifted:
        raise CliError(f"{key} is not banned")
    print(f"ban of {key} lifted")
    return 0


def _duration(seconds: float) -> str:
    whole = int(seconds + 0.999)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
