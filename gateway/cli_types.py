"""The command line's argument types (each turns a bad value into argparse's one-line error, exit 2) and the
option groups several subcommands share."""

from __future__ import annotations

import argparse
import ipaddress
import re
from pathlib import Path
from typing import Any

from gateway.config import parse_host_port, parse_port_range
from gateway.users.store import PERMISSION_MODES, TLS_MODES, UserError, parse_permission

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CliError(Exception):
    """A command's failure: ``cli.main`` prints it as one line (``ftp-gateway: error: ...``) and exits with ``code``
    (2: bad input or configuration; 1: something it needs cannot be reached)."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?(/s)?", re.IGNORECASE)


def byte_rate(text: str) -> int:
    """``0`` (unlimited), ``500000``, ``512K``, ``10M``, ``1G`` (powers of 1024) bytes per second."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: expected bytes per second such as 512K, 10M or 0")
    exponent = " kmgt".index(match.group(2).lower() or " ")
    return int(match.group(1)) << (10 * exponent)


def byte_size(text: str) -> int:
    """``0`` (none), ``500000``, ``512K``, ``10G``, ``2T`` (powers of 1024) bytes: as :func:`byte_rate`, no ``/s``."""
    match = _SIZE.fullmatch(text.strip())
    if not match or match.group(4):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected bytes such as 500M, 10G or 0")
    return byte_rate(text)


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to 86400, got {text!r}")
    return value


def listen_address(text: str) -> str:
    try:
        parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def admin_address(text: str) -> str:
    """``HOST:PORT``, ``unix:PATH`` or ``off``, checked as the ``admin.listen`` setting is."""
    from gateway.config import AdminSettings

    try:
        AdminSettings(listen=text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or off, got {text!r}") from exc
    return text


def port_range(text: str) -> tuple[int, int]:
    try:
        return parse_port_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def permission(text: str) -> tuple[str, bool, bool]:
    try:
        return parse_permission(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def worker_number(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"invalid worker count {text!r}: 0 (one per CPU) to 256")
    return int(text)


def networks(text: str) -> list[str]:
    """``CIDR[,CIDR]``: networks (a bare address is a /32 or /128)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    for part in parts:
        try:
            ipaddress.ip_network(part)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid network {part!r}: {exc}") from None
    return parts


# -- option groups --------------------------------------------------------------------------------------


def common_options(parser: argparse.ArgumentParser) -> None:
    """What every command takes: where the settings and the users are."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML configuration file (default: $FTP_GATEWAY_CONFIG, else built-in defaults)",
    )
    parser.add_argument("--database", metavar="URL", help="user database, e.g. sqlite:///users.db or postgresql://...")
    parser.add_argument(
        "--strict-permissions",
        action="store_true",
        help="refuse a config file holding secrets that group or others can read (default: a warning)",
    )


def observability_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-listen",
        type=admin_address,
        metavar="HOST:PORT|off",
        help="admin HTTP endpoint (/healthz, /readyz, /metrics); port 0 picks one (default 127.0.0.1:9090)",
    )
    parser.add_argument(
        "--log-format", choices=("json", "text", "auto"), help="log lines on stderr (auto: json unless a terminal)"
    )
    parser.add_argument("--audit-log", metavar="stdout|FILE|off", help="where audit events go (default stdout)")


def password_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")


def limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-sessions", type=non_negative_int, metavar="N", help="concurrent sessions (0: no limit)")
    parser.add_argument("--upload-limit", type=byte_rate, metavar="RATE", help="bytes/s over all sessions, e.g. 10M")
    parser.add_argument("--download-limit", type=byte_rate, metavar="RATE", help="bytes/s over all sessions")
    parser.add_argument(
        "--perm",
        type=permission,
        action="append",
        default=[],
        metavar="PATH=MODE",
        help=f"permission on a path and below, MODE one of {', '.join(PERMISSION_MODES)} (repeatable)",
    )
    parser.add_argument(
        "--tls", choices=TLS_MODES, help="whether the user must log in over TLS (default: the server's tls.required)"
    )
    parser.add_argument(
        "--quota-bytes", type=byte_size, metavar="SIZE", help="bytes the user may store, e.g. 10G (0: none)"
    )
    parser.add_argument("--quota-files", type=non_negative_int, metavar="N", help="files the user may store (0: none)")


def ban_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-connections-per-ip",
        type=non_negative_int,
        metavar="N",
        help="control connections one client IP may hold at once (0: no limit)",
    )
    parser.add_argument("--ban-redis-url", metavar="URL", help="Redis for the bans the replicas share (bans.redis_url)")


def ban_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings ``ban_options`` gave, as ``load_settings`` overrides."""
    overrides: dict[str, Any] = {}
    if getattr(args, "max_connections_per_ip", None) is not None:
        overrides["limits"] = {"max_connections_per_ip": args.max_connections_per_ip}
    if getattr(args, "ban_redis_url", None):
        overrides["bans"] = {"redis_url": args.ban_redis_url}
    return overrides


def tls_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("FTPS (RFC 4217)")
    group.add_argument("--tls-cert", type=Path, metavar="FILE", help="certificate chain, PEM (the server's first)")
    group.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key, PEM")
    group.add_argument(
        "--tls-required", action="store_true", default=None, help="refuse logins and transfers without TLS"
    )
    group.add_argument(
        "--implicit-tls-listen", type=listen_address, metavar="HOST:PORT", help="listener for implicit FTPS (port 990)"
    )


def tls_overrides(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """The ``tls`` settings the flags of :func:`tls_options` give (only those given)."""
    values = {
        "cert_file": getattr(args, "tls_cert", None),
        "key_file": getattr(args, "tls_key", None),
        "required": getattr(args, "tls_required", None),
        "implicit_listen": getattr(args, "implicit_tls_listen", None),
    }
    given = {key: value for key, value in values.items() if value is not None}
    return {"tls": given} if given else {}
