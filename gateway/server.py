"""The FTP server: aioftp's ``Server`` and its dispatcher, with the gateway's handlers registered on top."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import aioftp

from gateway import admin, aioftp_compat
from gateway.bans import make_store
from gateway.commands.basic import ALIASES, NEEDS_ARGUMENT, PUBLIC_VERBS, BasicCommands
from gateway.commands.checksums import ChecksumCommands
from gateway.commands.control import ControlConnection
from gateway.commands.data import DataChannelCommands
from gateway.commands.files import FileCommands
from gateway.commands.listing import ListingCommands
from gateway.commands.login import LoginCommands
from gateway.commands.security import SecurityCommands
from gateway.commands.transfer import TransferCommands
from gateway.config import Settings, parse_host_port
from gateway.datachannel import DataChannel, client_or_close, peer_of
from gateway.drain import REFUSED_WHILE_DRAINING, drain, refuse_transfer
from gateway.errors import Handler, command_errors
from gateway.log import LogContext, log_context
from gateway.session import SessionState
from gateway.tls import watching
from gateway.users.db import create_engine, display_url, ensure_schema
from gateway.users.facts import DatabaseObjectFacts
from gateway.users.manager import DatabaseUserManager
from gateway.users.passwords import Passwords, unmap_large_blocks
from gateway.users.store import UserStore
from pathio_backends import BackendResources

logger = logging.getLogger(__name__)

# Seconds an implicit FTPS client has for its TLS handshake (at most timeouts.socket).
HANDSHAKE = 10.0
# Commands whose outcome is an audit event, and the event's name.
AUDITED = {"dele": "delete", "rmd": "rmdir", "xrmd": "rmdir", "mkd": "mkdir", "xmkd": "mkdir", "rnto": "rename"}
# Transfers: audited by their worker once they started (``TransferWatch``), here when refused before the 150.
TRANSFERS = {"stor": "upload", "appe": "upload", "stou": "upload", "retr": "download"}
# Seconds a session the server ended keeps reading (and dropping) what the client still sends, after its last
# reply and a FIN, before the socket is closed (see ``aioftp_compat.defer_close``); Apache lingers as long.
LINGER = 2.0


@dataclass(slots=True)
class CommandRecord:
    """The command a task runs, and its first reply other than a 1xx (what it is counted and audited with).
    A transfer's worker inherits it, so STOR counts with its final 226, 426 or 451."""

    verb: str
    code: str | None = None
    # A 1xx reply went out (a transfer started).
    preliminary: bool = False


current_command: ContextVar[CommandRecord | None] = ContextVar("ftp_gateway_command", default=None)


class GatewayServer(
    ControlConnection,
    SecurityCommands,
    LoginCommands,
    BasicCommands,
    DataChannelCommands,
    TransferCommands,
    ListingCommands,
    FileCommands,
    ChecksumCommands,
):
    """aioftp's server with the gateway's handlers; every handler answers its own errors (gateway.errors)."""

    def __init__(self, settings: Settings, user_manager: DatabaseUserManager) -> None:
        super().__init__(settings, user_manager)
        for cls in reversed(type(self).__mro__):
            for verb, method in getattr(cls, "NEW_COMMANDS", {}).items():
                self.commands_mapping[verb] = getattr(self, method)
        for alias, verb in ALIASES.items():
            self.commands_mapping[alias] = self.commands_mapping[verb]
        self.commands_mapping = {verb: self._command(verb, handler) for verb, handler in self.commands_mapping.items()}

    def _command(self, verb: str, handler: Handler) -> Handler:
        """What every command goes through, from the outside in: the session's log context; one command at a time
        per session, in the order they arrived; errors as replies (``errors.command_errors``); :func:`gate`.
        Its reply is counted (``commands`` metric) and, for changes, audited.

        aioftp's dispatcher starts a task per command as soon as it is read, so when a client sends several
        commands at once (lftp and curl pipeline), a slow one (PASV opening a port) could answer after a fast
        one that came later (SIZE): the client then pairs replies with the wrong commands. The tasks start in
        arrival order and an asyncio.Lock is fair, so taking one lock per session restores the order. Transfers
        run in workers, outside the lock, so ABOR is not held up by them.
        """
        guarded = command_errors(verb, gate(verb, handler, self.session))
        if verb == "auth":
            guarded = self._ending_auth(guarded)
        refused_while_draining = verb in REFUSED_WHILE_DRAINING
        audited = verb in AUDITED or verb in TRANSFERS or verb == "rnfr"

        @functools.wraps(handler)
        async def command(connection: aioftp.Connection, rest: str) -> bool:
            session = self.session(connection)
            log_context.set(session.log_context())
            record = None
            if not verb.startswith(" "):  # parse_command's pseudo-verbs (end of the connection ...) are not commands
                self._count_replies(connection, session)
                record = CommandRecord(verb)
                current_command.set(record)
            async with session.command_lock:
                if session.ended:
                    # Read after the command that ended the session (QUIT, a third wrong password), while that
                    # one's reply went out: not run, so that reply is the last.
                    return True
                if refused_while_draining and self.draining:
                    return refuse_transfer(connection, session)
                if record is None or not audited:
                    keep = await guarded(connection, rest)
                else:
                    path = self._virtual_path(connection, session, rest)
                    source = session.rename_from
                    keep = await guarded(connection, rest)
                    self._audit(verb, record, session, path, source)
                session.ended = not keep
                return keep

        return command

    def _ending_auth(self, handler: Handler) -> Handler:
        """AUTH, however it ends (refused, failed, or TLS), lets the session's commands be read again
        (``SessionState.auth_pending``, set when the AUTH line was read)."""

        async def auth(connection: aioftp.Connection, rest: str) -> bool:
            try:
                return await handler(connection, rest)
            finally:
                session = self.sessions.get(connection.command_connection.writer)
                if session is not None:
                    session.end_auth()

        return auth

    def _count_replies(self, connection: aioftp.Connection, session: SessionState) -> None:
        """Count each command's first reply other than a 1xx, once per session: aioftp gives handlers a
        ``response`` function on the connection, which is wrapped here."""
        if session.replies_counted:
            return
        session.replies_counted = True
        send = connection.response
        metrics = self.metrics

        def response(code: str, *args: Any) -> None:
            record = current_command.get()
            if record is not None and code.startswith("1"):
                record.preliminary = True
            elif record is not None and record.code is None:
                record.code = code
                metrics.command(record.verb, code)
            send(code, *args)

        connection.response = response

    def _virtual_path(self, connection: aioftp.Connection, session: SessionState, rest: str) -> PurePosixPath | None:
        if session.user is None or not rest.strip():
            return None
        try:
            return PurePosixPath(self.get_paths(connection, rest)[1])
        except Exception:  # noqa: BLE001 - the handler answers a path it cannot use; there is then nothing to audit
            return None

    def _audit(
        self,
        verb: str,
        record: CommandRecord,
        session: SessionState,
        path: PurePosixPath | None,
        source: PurePosixPath | None,
    ) -> None:
        """After a command that changes files or may start a transfer: its audit event. RNFR only keeps its path
        for RNTO's event; a transfer that started (a 1xx went out) is its worker's to audit."""
        if verb == "rnfr":
            session.rename_from = path if record.code == "350" else None
            return
        if path is None or session.user is None or record.code is None:
            return
        if verb in TRANSFERS:
            if not record.preliminary:
                code = record.code
                self.audit.event(TRANSFERS[verb], path=str(path), bytes=0, duration=0.0, result="failed", code=code)
            return
        if verb == "rnto":
            session.rename_from = None
        self._audit_change(AUDITED[verb], record, path, source if verb == "rnto" else None)

    def _audit_change(
        self, event: str, record: CommandRecord, path: PurePosixPath, source: PurePosixPath | None
    ) -> None:
        code = record.code or "451"
        fields: dict[str, Any] = {"from": str(source), "to": str(path)} if event == "rename" else {"path": str(path)}
        ok = code.startswith("2")
        self.audit.event(event, **fields, result="ok" if ok else "failed", **({} if ok else {"code": code}))

    def reload_tls(self) -> None:
        """SIGHUP: read the certificate files again (``gateway.tls``); open sessions keep theirs."""
        if self.tls is None:
            logger.info("SIGHUP: no TLS certificate to reload")
        else:
            self.tls.reload()

    async def dispatcher(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, implicit: bool = False
    ) -> None:
        """aioftp's dispatcher, run as it is, with the session's state around it: made when the control
        connection is accepted, its data channel released when the connection ends. Urgent data stays in the
        stream (clients send ABOR as TCP urgent data, whose last byte Linux would otherwise take out of the line),
        and a session cancelled by ``close()`` ends quietly: Python 3.11's ``start_server`` callback would log it
        as an error. A banned client, or one past ``limits.max_connections_per_ip``, gets 421 before any of it
        (``gateway.bans``; on the implicit FTPS listener in clear, which such a client cannot read: no handshake
        is spent on it). ``implicit``: a connection to the implicit FTPS listener, TLS from its first byte (after
        a PROXY header) with PROT P from the start, as implicit FTPS clients expect."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        host, port = peer_of(writer)
        if self.proxy_policy is not None:
            client = await client_or_close(self.proxy_policy, reader, writer, "control connection")
            if client is None:
                self.metrics.connection_refused("proxy_header")
                await refuse(writer, "421 PROXY protocol header expected; closing.")
                return
            host, port = client
            if self.draining:  # it began while the header was awaited
                self.metrics.connection_refused("draining")
                await refuse(writer, "421 Server shutting down.")
                return
        try:
            refusal = await self.bans.refusal(host)
        except asyncio.CancelledError:
            return  # the server closes
        if refusal is not None:
            await self._refuse(writer, host, port, *refusal)
            return
        try:
            await self._session(reader, writer, host, port, implicit)
        finally:
            self.bans.closed(host)

    async def _refuse(self, writer: asyncio.StreamWriter, host: str, port: int, reason: str, text: str) -> None:
        """A banned client, or one over its connections: 421 and the close, before any session exists."""
        log_context.set(LogContext("-", host, port))
        logger.info("connection refused (%s): %s", reason, text)
        self.metrics.connection_refused(reason)
        self.audit.event("refused", reason=reason, code="421")
        await refuse(writer, f"421 {text}")

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int, implicit: bool
    ) -> None:
        context = None
        if implicit and self.tls is not None:
            # A handshake holds its connection before aioftp counts it (at the greeting): connections that never
            # finish theirs could otherwise take every file descriptor. None is begun past max_connections, and each
            # is bounded (a handshake is a few round trips).
            if len(self.sessions) + self.handshakes >= self.max_connections:
                logger.warning(
                    "implicit TLS connection from %s refused: %d connections open", host, self.max_connections
                )
                self.metrics.connection_refused("max_connections")
                writer.close()
                return
            context = self.tls.context
            self.handshakes += 1
            try:
                await aioftp_compat.start_tls(
                    reader, writer, context, handshake_timeout=min(self.settings.timeouts.socket, HANDSHAKE), early=True
                )
            except (OSError, TimeoutError) as exc:
                logger.info("implicit TLS handshake from %s failed: %r", host, exc)
                writer.close()
                return
            finally:
                self.handshakes -= 1
        local_host, *_ = writer.get_extra_info("sockname")
        data = DataChannel(
            self.passive_ports,
            client_host=host,
            server_host=local_host,
            connect_timeout=self.settings.timeouts.data_connection,
            socket_timeout=self.settings.timeouts.socket,
        )
        login_deadline = asyncio.get_running_loop().time() + self.settings.timeouts.login
        session = SessionState(client_host=host, client_port=port, data=data, login_deadline=login_deadline)
        if context is not None:
            session.tls, session.pbsz = context, True
            self.protect(session, context, writer)
        self.sessions[writer] = session
        log_context.set(session.log_context())
        self.metrics.session_opened()
        close = aioftp_compat.defer_close(writer)
        cancelled = False
        try:
            await super().dispatcher(reader, writer)
        except asyncio.CancelledError:
            cancelled = True
        finally:
            del self.sessions[writer]
            data.release()
            self.metrics.session_closed()
            if self.draining and not self.sessions:
                self.sessions_closed.set()
            try:
                if not cancelled:
                    await linger(reader, LINGER)
            except asyncio.CancelledError:
                pass
            finally:
                close()


async def refuse(writer: asyncio.StreamWriter, reply: str) -> None:
    """Answer a control connection refused before its session starts, and close it (quietly: it may be gone)."""
    try:
        writer.write(reply.encode() + b"\r\n")
        writer.close()
        await writer.wait_closed()
    except OSError:
        pass


async def linger(reader: asyncio.StreamReader, seconds: float) -> None:
    """Drop what the client still sends until it closes, for at most ``seconds``: a socket closed with unread
    input sends RST, which can make the client lose the last reply (see ``aioftp_compat.defer_close``)."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(64 * 1024):
                pass
    except (TimeoutError, OSError):
        pass


def gate(verb: str, handler: Handler, session_of: Callable[[aioftp.Connection], SessionState]) -> Handler:
    """What every command is checked for before its handler runs: a login (530, RFC 959's reply for it,
    where aioftp answers 503), an argument where one is needed (501), no NUL or CR in it (501)."""

    async def gated(connection: aioftp.Connection, rest: str) -> bool:
        if verb.startswith(" "):
            return await handler(connection, rest)  # parse_command's pseudo-verbs carry no argument
        if verb not in PUBLIC_VERBS and session_of(connection).user is None:
            connection.response("530", "Please log in with USER and PASS.")
        elif "\x00" in rest or "\r" in rest:
            connection.response("501", "Arguments may not contain NUL or CR.")
        elif verb in NEEDS_ARGUMENT and not rest.strip():
            connection.response("501", f"{verb.upper()} needs an argument.")
        else:
            return await handler(connection, rest)
        return True

    return gated


def format_address(host: str | None, port: int) -> str:
    host = host or "0.0.0.0"  # noqa: S104 - only for display
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listening_lines(settings: Settings, port: int, admin_url: str | None, implicit_port: int | None = None) -> str:
    """What ``serve`` prints once it listens: the FTP address, the implicit FTPS one, the admin endpoint."""
    lines = f"listening on ftp://{format_address(settings.listen_host, port)}\n"
    if settings.tls.implicit_listen:
        host, configured = parse_host_port(settings.tls.implicit_listen)
        lines += f"listening on ftps://{format_address(host, implicit_port or configured)}\n"
    if admin_url is not None:
        lines += f"admin on {admin_url}\n"
    return lines


async def serve_until_signalled(
    settings: Settings, ready: Callable[[GatewayServer], Awaitable[None]], *, reuse_port: bool = False
) -> None:
    """Run the gateway until SIGINT or SIGTERM, then drain it (``gateway.drain``: a second signal cuts the drain
    short); ``ready`` runs once it listens (and announces it). A signal this process ignores (a worker of
    ``serve --workers``, whose parent passes SIGINT on as SIGTERM) stays ignored."""
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            loop.add_signal_handler(signum, signalled.set)
    async with running_gateway(settings, reuse_port=reuse_port) as server:
        reload = signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN
        if reload:
            loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
        try:
            await ready(server)
            await signalled.wait()
            signalled.clear()
            await drain(server, signalled)
        finally:
            if reload:
                loop.remove_signal_handler(signal.SIGHUP)


@asynccontextmanager
async def running_gateway(settings: Settings, *, reuse_port: bool = False) -> AsyncIterator[GatewayServer]:
    """Open the user database (creating an embedded SQLite schema), start the server, and close both at exit.
    ``reuse_port``: the control port is shared with other worker processes (``SO_REUSEPORT``)."""
    async with AsyncExitStack() as stack:
        engine = create_engine(settings.database)
        stack.push_async_callback(engine.dispose)
        await ensure_schema(engine)
        store = UserStore(engine)
        logger.info("users in %s", display_url(engine.url))
        resources = BackendResources(s3=settings.s3, facts=DatabaseObjectFacts(engine))
        stack.push_async_callback(resources.aclose)
        unmap_large_blocks()
        passwords = Passwords()
        stack.callback(passwords.close)
        server = GatewayServer(settings, DatabaseUserManager(store, settings, resources, passwords))
        resources.observer = server.metrics
        # Usage not written yet goes to the database after the last session (and before the engine closes).
        stack.push_async_callback(server.quotas.aclose)
        if server.pump is not None:
            stack.callback(server.pump.close)
        if (ban_store := make_store(settings)) is not None:
            server.bans.store = ban_store
            stack.push_async_callback(ban_store.aclose)
        if settings.cluster.redis_url:
            from gateway.cluster import ClusterPorts  # redis is imported only by replicas of a cluster

            server.passive_ports = await stack.enter_async_context(ClusterPorts(settings, server.metrics))
        # Written until the last session has ended (closed after the server, so entered before it).
        stack.enter_context(server.audit)
        readiness = admin.Readiness(
            [
                ("database", admin.database_check(engine)),
                ("storage", admin.storage_check(settings.storage.default_uri, resources)),
            ],
            lambda: server.draining,
        )
        if reuse_port:
            await server.start(settings.listen_host, settings.listen_port, reuse_port=True)
        else:
            await server.start(settings.listen_host, settings.listen_port)
        stack.push_async_callback(server.close)
        if settings.tls.implicit_listen:
            host, port = parse_host_port(settings.tls.implicit_listen)
            implicit = functools.partial(server.dispatcher, implicit=True)
            server.implicit_server = await asyncio.start_server(implicit, host, port, reuse_port=reuse_port or None)
            stack.callback(server.implicit_server.close)  # before ``server.close`` cuts its sessions
            server.implicit_port = server.implicit_server.sockets[0].getsockname()[1]
        if server.tls is not None and settings.tls.reload_interval:
            await stack.enter_async_context(watching(server.tls, settings.tls.reload_interval))
        app = admin.make_app(readiness, server.metrics.registry)
        server.admin_url = await stack.enter_async_context(admin.admin_endpoint(settings.admin.listen, app))
        yield server
