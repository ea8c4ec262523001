"""What every group of command handlers shares."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import PurePath, PurePosixPath
from typing import Any, ClassVar, TypeVar

import aioftp
from aioftp.common import ThrottleStreamIO

from gateway.config import Settings
from gateway.errors import unwrap
from gateway.pump import TransferPump
from gateway.users.manager import DatabaseUserManager

logger = logging.getLogger(__name__)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
HALF_YEAR_SECONDS = 182.5 * 24 * 3600


# A ConnectionConditions field: set by PASV, EPSV, PORT or EPRT, removed when the transfer ends.
DATA_CHANNEL_READY = aioftp.ConnectionConditions(
    ("data_channel", ""), fail_code="425", fail_info="Use PASV, EPSV, PORT or EPRT first."
)
LOGGED_IN = aioftp.ConnectionConditions(aioftp.ConnectionConditions.login_required)

# RFC 3659 time-val: YYYYMMDDHHMMSS[.sss], UTC.
TIME_VAL = re.compile(r"(\d{14})(?:\.(\d{1,9}))?")


# Times a client may set: what every storage keeps as given (ext4 and S3 metadata alike), 1970 to 2106.
SETTABLE_SECONDS = range(0, 2**32)


def parse_time_val(text: str) -> float | None:
    """Seconds since the epoch for an RFC 3659 time-val, or None if it is not one, not a real date, or outside
    :data:`SETTABLE_SECONDS` (a storage would keep another time than the one the client was told it set)."""
    match = TIME_VAL.fullmatch(text)
    if match is None:
        return None
    try:
        moment = datetime.strptime(match.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    seconds = moment.timestamp()
    if int(seconds) not in SETTABLE_SECONDS:
        return None
    return seconds + float("0." + (match.group(2) or "0"))


async def stat_or_none(connection: aioftp.Connection, real_path: PurePath) -> os.stat_result | None:
    """One stat of a path, or None if there is nothing there. Handlers ask this once instead of aioftp's
    ``exists`` then ``is_file``/``is_dir`` then ``stat``: on S3 each of those is a request or two."""
    try:
        result: os.stat_result = await connection.path_io.stat(real_path)
    except aioftp.PathIOError as exc:
        if isinstance(unwrap(exc), FileNotFoundError):
            return None
        raise
    return result


def plain_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as compared here: an IPv4-mapped IPv6 address is its IPv4 address."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class CommandBase(aioftp.Server):
    """Base of the handler groups; ``NEW_COMMANDS`` maps verbs aioftp lacks to handler method names."""

    NEW_COMMANDS: ClassVar[dict[str, str]] = {}
    settings: Settings
    user_manager: DatabaseUserManager
    pump: TransferPump | None

    async def regular_file(
        self, connection: aioftp.Connection, real_path: PurePath, not_a_file: str = "550"
    ) -> os.stat_result | None:
        """The stat of a regular file, or None after answering 550 (missing) or ``not_a_file`` (a directory)."""
        st = await stat_or_none(connection, real_path)
        if st is None:
            connection.response("550", "No such file.")
        elif not stat.S_ISREG(st.st_mode):
            connection.response(not_a_file, "Not a regular file.")
        else:
            return st
        return None

    async def set_mtime(self, connection: aioftp.Connection, path: str, mtime: float, code: str, text: str) -> bool:
        """Set the time of ``path`` if the user may write there; used by MFMT, MDTM with a time and SITE UTIME."""
        real_path, virtual_path = self.get_paths(connection, path)
        if not (await connection.user.get_permissions(virtual_path)).writable:
            connection.response("550", "Permission denied.")
        elif not await connection.path_io.exists(real_path):
            connection.response("550", "No such file or directory.")
        else:
            await connection.path_io.set_mtime(real_path, mtime)
            connection.response(code, text)
        return True

    async def _connect_active(self, connection: aioftp.Connection, host: str, port: int) -> None:
        """Open the active data connection (from an unprivileged port of the address the client talks to)."""
        try:
            async with asyncio.timeout(self.wait_future_timeout):
                reader, writer = await asyncio.open_connection(host, port, local_addr=(connection.server_host, 0))
        except (OSError, TimeoutError) as exc:
            # The transfer's wait for a data connection then ends in 425.
            logger.warning("active data connection to %s:%s failed: %r", host, port, exc)
            return
        if get(connection, "data_channel") != "active":
            writer.close()
            return
        attach_data_connection(connection, reader, writer)

    def start_transfer(self, connection: aioftp.Connection, worker: Awaitable[object]) -> None:
        """Hand a transfer worker to the dispatcher (ABOR cancels ``extra_workers``); open the active data
        connection if the client asked for one; release the data channel when the worker ends."""
        address = get(connection, "active_address")
        if get(connection, "data_channel") == "active" and address is not None:
            connector = asyncio.ensure_future(self._connect_active(connection, *address))
        else:
            connector = None

        async def transfer() -> None:
            try:
                await worker
            finally:
                if connector is not None and not connector.done():
                    connector.cancel()
                self._release_data_channel(connection)

        connection.extra_workers.add(asyncio.ensure_future(transfer()))

    def _release_data_channel(self, connection: aioftp.Connection) -> None:
        """Close the passive listener and return its port; forget an active address or an unused connection.

        The keys are removed, so aioftp's own clean-up at the end of the session finds nothing to return twice.
        """
        if get(connection, "passive_server") is not None:
            connection.passive_server.close()
            if self.available_data_ports is not None:
                self.available_data_ports.put_nowait((0, connection.passive_server_port))
            del connection.passive_server
        if connection.future.data_connection.done():
            connection.data_connection.close()
            del connection.data_connection
        for name in ("data_channel", "active_address"):
            if name in connection:
                del connection[name]


def quote_path(path: PurePosixPath | str) -> str:
    """A path inside a 257 reply: in quotes, with quotes doubled (RFC 959, appendix II)."""
    return '"' + str(path).replace('"', '""') + '"'


def mlsx_time(seconds: float) -> str:
    """RFC 3659 time-val, always UTC."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(seconds))


def ls_time(seconds: float, now: float) -> str:
    """``ls -l`` style in UTC: ``Nov 25 06:12`` within the last six months, ``Nov 25  2025`` otherwise.

    Formatted by hand: aioftp's version switches the process-wide locale, which threads share.
    """
    t = time.gmtime(seconds)
    month = MONTHS[t.tm_mon - 1]
    if now - HALF_YEAR_SECONDS < seconds <= now + 3600:
        return f"{month} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}"
    return f"{month} {t.tm_mday:2d}  {t.tm_year}"


def get(connection: aioftp.Connection, name: str, default: Any = None) -> Any:
    """A value set on the connection, or ``default``: aioftp's ``Connection`` raises for unset names."""
    future = connection.get(name)
    return future.result() if future is not None and future.done() else default


def attach_data_connection(
    connection: aioftp.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Make a new connection the session's data connection (as aioftp does), unless it already has one."""
    if connection.future.data_connection.done():
        writer.close()
        return
    connection.data_connection = ThrottleStreamIO(
        reader,
        writer,
        throttles=connection.command_connection.throttles,
        timeout=connection.socket_timeout,
    )


def take_data_connection(connection: aioftp.Connection) -> ThrottleStreamIO:
    """The data connection of this transfer; the next transfer command waits for a new one."""
    stream: ThrottleStreamIO = connection.data_connection
    del connection.data_connection
    return stream


Handler = Callable[[aioftp.Connection, Any], Awaitable[bool]]


def in_order(handler: Handler) -> Handler:
    """Run a session's command handlers one at a time, in the order the commands arrived.

    aioftp's dispatcher starts a task per command as soon as it is read, so when a client sends several
    commands at once (lftp and curl pipeline), a slow one (PASV opening a port) could answer after a fast
    one that came later (SIZE): the client then pairs replies with the wrong commands. The tasks start in
    arrival order and an asyncio.Lock is fair, so taking one lock per session restores the order. Transfers
    run in workers, outside the lock, so ABOR is not held up by them.
    """

    @functools.wraps(handler)
    async def ordered(connection: aioftp.Connection, rest: Any) -> bool:
        lock = get(connection, "command_lock")
        if lock is None:
            lock = connection.command_lock = asyncio.Lock()
        async with lock:
            return await handler(connection, rest)

    return ordered


F = TypeVar("F", bound=Callable[..., Awaitable[bool]])


def checks(*decorators: Any) -> Callable[[F], F]:
    """aioftp's ``ConnectionConditions``, ``PathConditions`` and ``PathPermissions``, outermost first.

    Each sends its own 503/550 and skips the handler. aioftp types them for methods of ``Server`` itself, which
    mypy rejects on a subclass's method; applied through here, the handler keeps its own type.
    """

    def apply(handler: F) -> F:
        for decorator in reversed(decorators):
            handler = decorator(handler)
        return handler

    return apply
