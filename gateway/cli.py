"""``ftp-gateway``: serve, manage users, migrate the database.

Every failure the operator can fix is one line on stderr and exit code 2 (bad flag, config, input, or a
database schema that needs ``db upgrade``); a failure of the environment (database or port unreachable)
is one line and exit code 1. No traceback either way.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import json
import logging
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from gateway import __version__, ban_cli, cli_users, runtime, s3_cleanup
from gateway import log as gateway_log
from gateway.cli_types import (
    EXIT_FAILURE,
    EXIT_USAGE,
    CliError,
    ban_options,
    ban_overrides,
    common_options,
    limit_options,
    listen_address,
    networks,
    observability_options,
    password_option,
    port_range,
    seconds,
    tls_options,
    tls_overrides,
    worker_number,
)
from gateway.config import ConfigError, Settings, load_settings
from gateway.config_permissions import exposed_key, exposed_secrets
from gateway.runtime import EventLoopChoice
from gateway.users.db import DatabaseError, create_engine, describe_error, ensure_schema, schema_revisions, upgrade
from gateway.users.passwords import Passwords
from gateway.users.store import UserChanges, UserError, UserStore

if TYPE_CHECKING:
    from gateway.server import GatewayServer

PROG = "ftp-gateway"
# What binding the listening socket fails with (anything else is not about the address).
LISTEN_ERRNOS = {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES}
T = TypeVar("T")
logger = logging.getLogger(__name__)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, exit 2 (argparse prints the whole usage block first)."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# -- the parser -----------------------------------------------------------------------------------------


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common_options(common)

    parser = Parser(prog=PROG, description="FTP gateway onto local disk or S3, with users in a database.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    serve = commands.add_parser("serve", parents=[common], help="run the FTP server")
    serve.add_argument("--listen", type=listen_address, metavar="HOST:PORT", help="control connection address")
    serve.add_argument("--passive-ports", type=port_range, metavar="LO-HI", help="passive data port range")
    serve.add_argument("--masquerade-address", metavar="IP", help="IPv4 address announced in PASV replies")
    serve.add_argument("--storage", metavar="URI", help="storage of users without their own ({username} allowed)")
    serve.add_argument(
        "--proxy-trusted",
        type=networks,
        metavar="CIDR[,CIDR]",
        help="networks whose connections start with a PROXY protocol header (load balancers)",
    )
    serve.add_argument("--redis-url", metavar="URL", help="Redis shared by the replicas (cluster mode)")
    serve.add_argument("--node-address", metavar="IP", help="address the other replicas reach this one on")
    serve.add_argument(
        "--workers", type=worker_number, metavar="N", help="processes sharing the control port (default: one per CPU)"
    )
    serve.add_argument(
        "--drain-timeout",
        type=seconds,
        metavar="SECONDS",
        help="on SIGTERM, how long running transfers may finish before they are aborted (default: 30)",
    )
    observability_options(serve)
    ban_options(serve)
    tls_options(serve)
    serve.set_defaults(func=cmd_serve)

    dev = commands.add_parser(
        "dev", parents=[common], help="serve onto an S3 in this process (moto), with a demo user: for trying it"
    )
    dev.add_argument("--listen", type=listen_address, metavar="HOST:PORT", help="control connection address")
    dev.add_argument("--data-dir", type=Path, metavar="DIR", help="keep the user database here (default: temporary)")
    dev.add_argument("--password-stdin", action="store_true", help="demo's password from stdin (default: generated)")
    dev.add_argument("--tls", action="store_true", help="explicit FTPS with a self-signed certificate made for it")
    observability_options(dev)
    dev.set_defaults(func=cmd_dev)

    check = commands.add_parser(
        "check", parents=[common], help="check the config, the database and every storage; exit 1 if one fails"
    )
    check.add_argument("--storage", metavar="URI", help="storage of users without their own ({username} allowed)")
    check.set_defaults(func=cmd_check)

    db = commands.add_parser("db", help="user database schema").add_subparsers(
        dest="db_command", required=True, metavar="COMMAND", parser_class=Parser
    )
    db.add_parser("upgrade", parents=[common], help="create or upgrade the schema").set_defaults(func=cmd_db_upgrade)
    db.add_parser("status", parents=[common], help="show the schema revision").set_defaults(func=cmd_db_status)

    user = commands.add_parser("user", help="manage FTP users").add_subparsers(
        dest="user_command", required=True, metavar="COMMAND", parser_class=Parser
    )

    add = user.add_parser("add", parents=[common], help="create a user")
    add.add_argument("name")
    password_option(add)
    add.add_argument("--storage", metavar="URI", help="file:///path or s3://bucket/prefix (default: server's)")
    add.add_argument("--home", default="/", metavar="PATH", help="directory the session starts in (default: /)")
    add.add_argument("--read-only", action="store_true", help="may read but not change anything under /")
    limit_options(add)
    add.set_defaults(func=cmd_user_add)

    listing = user.add_parser("list", parents=[common], help="list users")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    listing.set_defaults(func=cmd_user_list)

    show = user.add_parser("show", parents=[common], help="show one user")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(func=cmd_user_show)

    passwd = user.add_parser("passwd", parents=[common], help="set a user's password")
    passwd.add_argument("name")
    password_option(passwd)
    passwd.set_defaults(func=cmd_user_passwd)

    change = user.add_parser("set", parents=[common], help="change a user")
    change.add_argument("name")
    storage = change.add_mutually_exclusive_group()
    storage.add_argument("--storage", metavar="URI")
    storage.add_argument("--default-storage", action="store_true", help="use the server's default storage")
    change.add_argument("--home", metavar="PATH")
    access = change.add_mutually_exclusive_group()
    access.add_argument("--read-only", action="store_true", help="set / to read-only")
    access.add_argument("--read-write", action="store_true", help="set / to read-write")
    limit_options(change)
    change.add_argument(
        "--unset-perm", action="append", default=[], metavar="PATH", help="remove a permission entry (repeatable)"
    )
    change.set_defaults(func=cmd_user_set)

    for name, func, text in (
        ("disable", cmd_user_disable, "refuse the user's logins"),
        ("enable", cmd_user_enable, "allow the user's logins again"),
        ("delete", cmd_user_delete, "delete the user (files are kept)"),
        ("rescan", cmd_user_rescan, "recount the user's bytes and files (its usage) from its storage"),
    ):
        sub = user.add_parser(name, parents=[common], help=text)
        sub.add_argument("name")
        sub.set_defaults(func=func)

    s3 = commands.add_parser("s3", help="S3 housekeeping").add_subparsers(
        dest="s3_command", required=True, metavar="COMMAND", parser_class=Parser
    )
    cleanup = s3.add_parser("cleanup", parents=[common], help="abort multipart uploads left behind")
    cleanup.add_argument("location", type=s3_cleanup.bucket_and_prefix, metavar="s3://BUCKET[/PREFIX]")
    cleanup.add_argument("--older-than", type=s3_cleanup.duration, default="24h", help="default 24h; 0: all")
    cleanup.add_argument("--dry-run", action="store_true", help="list what would be aborted, abort nothing")
    cleanup.set_defaults(func=cmd_s3_cleanup)
    ban_cli.add_parser(commands, common, Parser)
    return parser


# -- settings -------------------------------------------------------------------------------------------


def config_file(args: argparse.Namespace) -> Path | None:
    return args.config or (Path(os.environ["FTP_GATEWAY_CONFIG"]) if os.environ.get("FTP_GATEWAY_CONFIG") else None)


def settings_from(args: argparse.Namespace) -> Settings:
    """The config file < ``FTP_GATEWAY_*`` < the flags given on this command line."""
    config = config_file(args)
    overrides: dict[str, Any] = {}
    if args.database:
        overrides["database"] = {"url": args.database}
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    passive: dict[str, Any] = {}
    if getattr(args, "passive_ports", None):
        passive["port_min"], passive["port_max"] = args.passive_ports
    if getattr(args, "masquerade_address", None):
        passive["masquerade_address"] = args.masquerade_address
    if passive:
        overrides["passive"] = passive
    if args.command in ("serve", "check") and args.storage:
        overrides["storage"] = {"default_uri": args.storage}
    if getattr(args, "drain_timeout", None) is not None:
        overrides["timeouts"] = {"drain": args.drain_timeout}
    if getattr(args, "proxy_trusted", None) is not None:
        overrides["proxy_protocol"] = {"trusted": args.proxy_trusted}
    cluster = {
        key: value
        for key, value in (
            ("redis_url", getattr(args, "redis_url", None)),
            ("node_address", getattr(args, "node_address", None)),
        )
        if value
    }
    if cluster:
        overrides["cluster"] = cluster
    if getattr(args, "admin_listen", None):
        overrides["admin"] = {"listen": args.admin_listen}
    log: dict[str, Any] = {}
    if getattr(args, "log_format", None):
        log["format"] = args.log_format
    if getattr(args, "audit_log", None):
        log["audit"] = args.audit_log
    if log:
        overrides["log"] = log
    settings = load_settings(config, overrides | ban_overrides(args) | tls_overrides(args))
    for warning in (
        exposed_secrets(config, strict=args.strict_permissions),
        exposed_key(settings.tls.key_file, strict=args.strict_permissions),
    ):
        if warning:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return settings


def read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise CliError("the passwords differ")
    else:
        raise CliError("no terminal to ask for the password on: pipe it in with --password-stdin")
    if not password:
        raise CliError("empty password")
    return password


# -- running against the database -----------------------------------------------------------------------


def run_with_store(
    settings: Settings, action: Callable[[UserStore], Awaitable[T]], failure: str = "database unavailable"
) -> T:
    async def main() -> T:
        engine = create_engine(settings.database)
        try:
            await ensure_schema(engine)
            return await action(UserStore(engine))
        finally:
            await engine.dispose()

    return _run(main(), failure)


def _run(coro: Coroutine[Any, Any, T], failure: str = "database unavailable", loop: EventLoopChoice = "asyncio") -> T:
    try:
        return runtime.run(coro, loop)
    except (CliError, UserError, DatabaseError):
        raise
    except Exception as exc:
        raise CliError(f"{failure}: {describe_error(exc)}", EXIT_FAILURE) from exc


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    async def main() -> tuple[str | None, str | None]:
        engine = create_engine(settings.database)
        try:
            await upgrade(engine)
            return await schema_revisions(engine)
        finally:
            await engine.dispose()

    current, _ = _run(main())
    print(f"database schema at revision {current}")
    return 0


def cmd_db_status(settings: Settings, args: argparse.Namespace) -> int:
    async def main() -> tuple[str | None, str | None]:
        engine = create_engine(settings.database)
        try:
            return await schema_revisions(engine)
        finally:
            await engine.dispose()

    current, head = _run(main())
    state = "up to date" if current == head else "needs 'ftp-gateway db upgrade'"
    print(f"schema revision {current or 'none'}, this version needs {head}: {state}")
    return 0 if current == head else EXIT_USAGE


def cmd_user_add(settings: Settings, args: argparse.Namespace) -> int:
    password_hash = Passwords().hash_now(read_password(args))
    permissions = {path: (r, w) for path, r, w in args.perm}
    info = run_with_store(
        settings,
        lambda store: store.add(
            args.name,
            password_hash,
            storage_uri=args.storage,
            home=args.home,
            read_only=args.read_only,
            permissions=permissions,
            **cli_users.limits(args),
        ),
    )
    print(f"user {info.name} added")
    warn_if_storage_unusable(settings, args.storage)
    return 0


def cmd_user_list(settings: Settings, args: argparse.Namespace) -> int:
    users = run_with_store(settings, lambda store: store.list())
    if args.json:
        print(json.dumps([u.as_dict() for u in users], indent=2))
        return 0
    print("\n".join(cli_users.table(users)))
    return 0


def cmd_user_show(settings: Settings, args: argparse.Namespace) -> int:
    info = run_with_store(settings, lambda store: store.info(args.name))
    print(json.dumps(info.as_dict(), indent=2) if args.json else "\n".join(cli_users.describe(info)))
    return 0


def cmd_user_passwd(settings: Settings, args: argparse.Namespace) -> int:
    changes = UserChanges(password_hash=Passwords().hash_now(read_password(args)))
    run_with_store(settings, lambda store: store.change(args.name, changes))
    print(f"password of {args.name} changed")
    return 0


def cmd_user_set(settings: Settings, args: argparse.Namespace) -> int:
    limits = cli_users.limits(args)
    changes = UserChanges(
        storage_uri=args.storage,
        default_storage=args.default_storage,
        home=args.home,
        permissions={path: (r, w) for path, r, w in args.perm},
        remove_permissions=args.unset_perm,
        set_limits=set(limits),
        **limits,
    )
    if args.read_only or args.read_write:
        changes.permissions.setdefault("/", (True, bool(args.read_write)))
    if changes == UserChanges():
        raise CliError("nothing to change: give at least one option (see 'ftp-gateway user set --help')")
    info = run_with_store(settings, lambda store: store.change(args.name, changes))
    print("\n".join(cli_users.describe(info)))
    warn_if_storage_unusable(settings, args.storage)
    return 0


def warn_if_storage_unusable(settings: Settings, uri: str | None) -> None:
    """One line on stderr when a user's new storage cannot be used from here (``check.storage_warning``)."""
    from gateway.check import storage_warning

    warning = runtime.run(storage_warning(settings, uri), "asyncio") if uri else None
    if warning:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.check import run_checks

    passed = _run(run_checks(settings, config_file(args), lambda line: print(line, flush=True)), "check failed")
    return 0 if passed else EXIT_FAILURE


def cmd_s3_cleanup(settings: Settings, args: argparse.Namespace) -> int:
    try:
        runtime.run(s3_cleanup.cleanup(settings.s3, args.location, args.older_than, args.dry_run), "asyncio")
    except s3_cleanup.CleanupFailed as exc:
        raise CliError(str(exc), EXIT_FAILURE) from None
    return 0


def _set_enabled(settings: Settings, name: str, enabled: bool) -> int:
    run_with_store(settings, lambda store: store.change(name, UserChanges(enabled=enabled)))
    print(f"user {name} {'enabled' if enabled else 'disabled'}")
    return 0


def cmd_user_disable(settings: Settings, args: argparse.Namespace) -> int:
    return _set_enabled(settings, args.name, False)


def cmd_user_enable(settings: Settings, args: argparse.Namespace) -> int:
    return _set_enabled(settings, args.name, True)


def cmd_user_delete(settings: Settings, args: argparse.Namespace) -> int:
    run_with_store(settings, lambda store: store.delete(args.name))
    print(f"user {args.name} deleted")
    return 0


def cmd_user_rescan(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.rescan import rescan

    print(run_with_store(settings, lambda store: rescan(settings, store, args.name), "rescan failed").describe())
    return 0


# -- serve ----------------------------------------------------------------------------------------------


def serve(settings: Settings, ready: Callable[[GatewayServer], Awaitable[None]], *, reuse_port: bool = False) -> int:
    """Run a gateway until a signal; a port already in use or any start-up failure is one line."""
    from gateway.admin import AdminListenError
    from gateway.server import serve_until_signalled

    async def started(server: GatewayServer) -> None:
        logger.info(
            "event loop %s; open files limit %d (%s); at most %d connections",
            runtime.loop_name(),
            limit,
            f"raised from {previous}" if limit != previous else "the hard limit",
            server.max_connections,
        )
        await ready(server)

    async def main() -> int:
        from gateway.cluster import ClusterError

        try:
            await serve_until_signalled(settings, started, reuse_port=reuse_port)
        except ClusterError as exc:
            raise CliError(str(exc)) from None
        except AdminListenError as exc:
            raise CliError(str(exc), EXIT_FAILURE) from None  # in use, as the control port: exit 1
        except OSError as exc:
            if exc.errno not in LISTEN_ERRNOS:
                raise  # not the listening socket: a database or storage failure, reported by _run
            raise CliError(f"cannot listen on {settings.listen}: {os.strerror(exc.errno)}", EXIT_FAILURE) from None
        return 0

    check_event_loop(settings)
    previous, limit = runtime.raise_open_files_limit()
    return _run(main(), "cannot start", settings.event_loop)


def check_event_loop(settings: Settings) -> None:
    try:
        runtime.loop_factory(settings.event_loop)
    except ImportError:
        raise CliError("event_loop = uvloop, but uvloop is not installed (pip install uvloop)") from None


async def warn_if_no_users(store: UserStore) -> None:
    if not await store.count():
        logger.warning("no users yet: add one with 'ftp-gateway user add NAME' (same --database or config)")


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from gateway import tls, workers
    from gateway.admin import AdminListenError
    from gateway.server import listening_lines

    gateway_log.configure(settings.log.level, settings.log.format)
    if args.workers is not None:
        settings = settings.model_copy(update={"workers": args.workers})
    if settings.cluster.redis_url and settings.workers > 1:
        # Every replica listens on the whole passive range, and relays to a replica by its address: two
        # processes on one address could not tell which of them holds a session.
        raise CliError(f"--workers {settings.workers} does not go with cluster.redis_url: run one process per replica")
    count = 1 if settings.cluster.redis_url else workers.worker_count(settings.workers)
    tls.check(settings, count)

    def announce(port: int, admin_url: str | None, implicit_port: int | None = None) -> None:
        if count > 1:
            logger.info("%d worker processes share the control port", count)
        # One write for all lines, so that nothing printed by another thread (the audit log) comes between.
        sys.stdout.write(listening_lines(settings, port, admin_url, implicit_port))
        sys.stdout.flush()

    if count == 1:

        async def ready(server: GatewayServer) -> None:
            await warn_if_no_users(server.user_manager.store)
            announce(server.server_port, server.admin_url, server.implicit_port)

        return serve(settings, ready)

    check_event_loop(settings)
    try:
        workers.passive_slices(settings.passive, count)
    except workers.WorkersError as exc:
        raise CliError(str(exc)) from None
    # Also creates an embedded schema, once, before the workers start.
    run_with_store(settings, warn_if_no_users, "cannot start")

    def run_worker(worker: Settings, ready: Callable[[GatewayServer], Awaitable[None]]) -> int:
        try:
            return serve(worker, ready, reuse_port=True)
        except CliError as exc:
            return _fail(str(exc), exc.code)

    try:
        return workers.serve_workers(settings, count, run_worker, announce)
    except workers.WorkersError as exc:
        raise CliError(str(exc)) from None
    except AdminListenError as exc:
        raise CliError(str(exc), EXIT_FAILURE) from None
    except OSError as exc:
        raise CliError(f"cannot listen on {settings.listen}: {os.strerror(exc.errno or 0)}", EXIT_FAILURE) from None


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    from gateway import dev

    password = read_password(args) if args.password_stdin else secrets.token_urlsafe(12)
    gateway_log.configure(settings.log.level, settings.log.format)
    try:
        with dev.environment(settings, args.data_dir, bool(args.database), args.tls) as (dev_settings, endpoint):
            return serve(dev_settings, dev.when_ready(dev_settings, endpoint, password))
    except dev.MotoMissing as exc:
        raise CliError(str(exc)) from None


# -- entry point ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        command: Callable[[Settings, argparse.Namespace], int] = args.func
        return command(settings, args)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except (UserError, DatabaseError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code
