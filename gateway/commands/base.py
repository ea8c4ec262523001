"""What every group of command handlers shares."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath
from typing import Any, ClassVar, TypeVar

import aioftp
from aioftp.common import ThrottleStreamIO

from gateway.config import Settings
from gateway.pump import TransferPump
from gateway.users.manager import DatabaseUserManager

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
HALF_YEAR_SECONDS = 182.5 * 24 * 3600


class CommandBase(aioftp.Server):
    """Base of the handler groups; ``NEW_COMMANDS`` maps verbs aioftp lacks to handler method names."""

    NEW_COMMANDS: ClassVar[dict[str, str]] = {}
    settings: Settings
    user_manager: DatabaseUserManager
    pump: TransferPump | None


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


def start_worker(connection: aioftp.Connection, worker: Awaitable[Any]) -> None:
    """Hand a transfer worker to the dispatcher, which waits on ``extra_workers`` (and ABOR cancels them)."""
    connection.extra_workers.add(asyncio.ensure_future(worker))


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
