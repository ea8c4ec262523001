"""The FTP server: aioftp's ``Server`` and its dispatcher, with the gateway's handlers registered on top."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import aioftp

from gateway.commands.base import Handler, get, in_order
from gateway.commands.basic import ALIASES, NEEDS_ARGUMENT, PUBLIC_VERBS, BasicCommands
from gateway.commands.checksums import ChecksumCommands
from gateway.commands.data import DataChannelCommands
from gateway.commands.files import FileCommands
from gateway.commands.listing import ListingCommands
from gateway.commands.session import SessionCommands
from gateway.commands.transfer import TransferCommands
from gateway.config import Settings
from gateway.errors import command_errors
from gateway.pump import TransferPump
from gateway.users.db import create_engine, display_url, ensure_schema
from gateway.users.facts import DatabaseObjectFacts
from gateway.users.manager import DatabaseUserManager
from gateway.users.store import UserStore
from pathio_backends import BackendResources

logger = logging.getLogger(__name__)


class GatewayServer(
    SessionCommands,
    BasicCommands,
    DataChannelCommands,
    TransferCommands,
    ListingCommands,
    FileCommands,
    ChecksumCommands,
):
    """aioftp's server with the gateway's handlers; every handler answers its own errors (gateway.errors)."""

    def __init__(self, settings: Settings, user_manager: DatabaseUserManager) -> None:
        passive = settings.passive
        super().__init__(
            users=user_manager,
            block_size=settings.transfer.block_size,
            socket_timeout=settings.timeouts.socket,
            idle_timeout=settings.timeouts.idle,
            wait_future_timeout=settings.timeouts.data_connection,
            path_timeout=settings.timeouts.path,
            # Sessions get their user's own backend at login; every path command needs a login first, so this
            # in-memory one is never used (and touches no disk if it were).
            path_io_factory=aioftp.MemoryPathIO,  # type: ignore[arg-type]
            maximum_connections=settings.limits.max_connections,
            ipv4_pasv_forced_response_address=str(passive.masquerade_address) if passive.masquerade_address else None,
            data_ports=passive.ports,
            encoding="utf-8",
            welcome_message=settings.welcome_message,
        )
        self.settings = settings
        self.user_manager = user_manager
        threads = settings.transfer.pump_threads
        self.pump = TransferPump(threads) if threads else None
        # aioftp keeps a throttle per User object forever; weak keys drop it with the user's last session.
        self.throttle_per_user = weakref.WeakKeyDictionary()  # type: ignore[assignment]
        for cls in reversed(type(self).__mro__):
            for verb, method in getattr(cls, "NEW_COMMANDS", {}).items():
                self.commands_mapping[verb] = getattr(self, method)
        for alias, verb in ALIASES.items():
            self.commands_mapping[alias] = self.commands_mapping[verb]
        self.commands_mapping = {
            verb: in_order(command_errors(verb, gate(verb, handler))) for verb, handler in self.commands_mapping.items()
        }

    async def dispatcher(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """aioftp's dispatcher, run as it is. Around it: urgent data stays in the stream (clients send ABOR as
        TCP urgent data, whose last byte Linux would otherwise take out of the line), and a session cancelled
        by ``close()`` ends quietly: Python 3.11's ``start_server`` callback would log it as an error."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        try:
            await super().dispatcher(reader, writer)
        except asyncio.CancelledError:
            pass


def gate(verb: str, handler: Handler) -> Handler:
    """What every command is checked for before its handler runs: a login (530, RFC 959's reply for it,
    where aioftp answers 503), an argument where one is needed (501), no NUL or CR in it (501)."""

    async def gated(connection: aioftp.Connection, rest: str) -> bool:
        if verb.startswith(" "):
            return await handler(connection, rest)  # parse_command's pseudo-verbs carry no argument
        if verb not in PUBLIC_VERBS and not get(connection, "logged"):
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


async def serve_until_signalled(settings: Settings, ready: Callable[[GatewayServer], Awaitable[None]]) -> None:
    """Run the gateway until SIGINT or SIGTERM; ``ready`` runs once it listens (and announces it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running_gateway(settings) as server:
        await ready(server)
        await stop.wait()
        logger.info("stopping")


@asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[GatewayServer]:
    """Open the user database (creating an embedded SQLite schema), start the server, and close both at exit."""
    async with AsyncExitStack() as stack:
        engine = create_engine(settings.database)
        stack.push_async_callback(engine.dispose)
        await ensure_schema(engine)
        store = UserStore(engine)
        logger.info("users in %s", display_url(engine.url))
        resources = BackendResources(facts=DatabaseObjectFacts(engine))
        stack.push_async_callback(resources.aclose)
        server = GatewayServer(settings, DatabaseUserManager(store, settings, resources))
        if server.pump is not None:
            stack.callback(server.pump.close)
        await server.start(settings.listen_host, settings.listen_port)
        stack.push_async_callback(server.close)
        yield server
