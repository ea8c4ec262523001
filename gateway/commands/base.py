"""What every group of command handlers shares: the server's own attributes, declared and set here, and helpers.

The handler groups (``basic``, ``control``, ``login``, ``data``, ``transfer``, ``listing``, ``files``, ``checksums``)
are methods of the server, as aioftp's are: its path decorators call ``self.get_paths``. Each group adds verbs
aioftp lacks in ``NEW_COMMANDS`` and may extend :meth:`CommandBase.features` (FEAT) and :meth:`CommandBase.option`
(OPTS) through ``super()``; no group imports another.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import stat
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import PurePath, PurePosixPath
from typing import Any, ClassVar, TypeVar

import aioftp
from aioftp.common import StreamThrottle

from gateway import runtime
from gateway.audit import AuditLog
from gateway.bans import Bans
from gateway.config import Settings
from gateway.datachannel import PassivePorts, Ports
from gateway.errors import answer, transfer_errors, unwrap
from gateway.metrics import Metrics
from gateway.proxy_protocol import ProxyPolicy
from gateway.pump import TransferPump
from gateway.quota import Quotas
from gateway.session import SessionState
from gateway.tls import ServerTLS
from gateway.users.manager import DatabaseUserManager, GatewayUser

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
HALF_YEAR_SECONDS = 182.5 * 24 * 3600

LOGGED_IN = aioftp.ConnectionConditions(aioftp.ConnectionConditions.login_required)

# RFC 3659 time-val: YYYYMMDDHHMMSS[.sss], UTC.
TIME_VAL = re.compile(r"(\d{14})(?:\.(\d{1,9}))?")

# Times a client may set: what every storage keeps as given (ext4 and S3 metadata alike), 1970 to 2106.
SETTABLE_SECONDS = range(0, 2**32)

F = TypeVar("F", bound=Callable[..., Awaitable[bool]])
T = TypeVar("T")


class CommandBase(aioftp.Server):
    """aioftp's ``Server`` built from the gateway's settings, with the attributes every handler group uses."""

    NEW_COMMANDS: ClassVar[dict[str, str]] = {}

    def __init__(self, settings: Settings, user_manager: DatabaseUserManager) -> None:
        max_connections = settings.limits.max_connections or runtime.connections_for(
            runtime.open_files_limit(), len(settings.passive.ports)
        )
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
            maximum_connections=max_connections,
            encoding="utf-8",
            welcome_message=settings.welcome_message,
        )
        self.settings = settings
        # This server's Prometheus metrics (its own registry), served by the admin endpoint.
        self.metrics = Metrics()
        # Set on SIGTERM: new transfers get 421, /readyz answers 503, running transfers may finish.
        self.draining = False
        # Set when the drain's time is up (or at a second signal): a transfer cancelled now is told 426 and why.
        self.aborting_transfers = False
        # Transfers that ended (finished, failed or aborted) while the server drained; for the drain's last log line.
        self.transfers_ended_draining = 0
        # Set when the last session has ended while the server drains.
        self.sessions_closed = asyncio.Event()
        # Control connections at once (the next one gets 421): the setting, or what the open-files limit allows.
        self.max_connections = max_connections
        # Implicit FTPS handshakes under way: they count against max_connections before their session exists.
        self.handshakes = 0
        self.user_manager: DatabaseUserManager = user_manager
        # Users' byte and file quotas, and the usage every change of their files is counted in.
        self.quotas = Quotas(user_manager.store, settings.database.timeout)
        threads = settings.transfer.pump_threads
        self.pump = TransferPump(threads) if threads else None
        proxy = settings.proxy_protocol
        # PROXY protocol on the control and passive listeners; None when no network is trusted (the default).
        self.proxy_policy = (
            ProxyPolicy(proxy.trusted, required=proxy.required, timeout=proxy.header_timeout) if proxy.trusted else None
        )
        # The passive range: this process's own pool, or the cluster's (``gateway.cluster``, set up by
        # ``running_gateway`` when ``cluster.redis_url`` is set).
        self.passive_ports: Ports = PassivePorts(settings.passive.ports, self.proxy_policy)
        self.metrics.passive_ports_in_use.set_function(lambda: self.passive_ports.in_use)
        # Audit events (login, transfers, changes); written once ``running_gateway`` has entered it.
        self.audit = AuditLog(settings.log.audit)
        # Failed logins, banned IPs, slowed user names, connections per IP; in memory until ``running_gateway`` gives
        # it the Redis store (``bans.redis_url``).
        self.bans = Bans(settings, self.metrics, self.audit)
        # FTPS (``gateway.tls``): the context new TLS connections get (SIGHUP makes a new one); None: no certificate.
        self.tls = ServerTLS(settings.tls) if settings.tls.enabled else None
        # The implicit FTPS listener and its port once it listens (``running_gateway``); None: none.
        self.implicit_server: asyncio.Server | None = None
        self.implicit_port: int | None = None
        # The admin endpoint's URL once it serves (None: admin.listen = "off").
        self.admin_url: str | None = None
        # One per control connection, keyed by its writer: made and dropped by ``GatewayServer.dispatcher``.
        self.sessions: dict[asyncio.StreamWriter, SessionState] = {}
        # One throttle per user object, shared by its sessions; weakly keyed, so it goes with its last session.
        self.user_throttles: weakref.WeakKeyDictionary[GatewayUser, StreamThrottle] = weakref.WeakKeyDictionary()

    def session(self, connection: aioftp.Connection) -> SessionState:
        return self.sessions[connection.command_connection.writer]

    # -- extended by the handler groups ----------------------------------------------------------------

    def features(self, session: SessionState) -> list[str]:
        """This group's FEAT lines (RFC 2389); each group adds its own through ``super()``."""
        return []

    def option(self, connection: aioftp.Connection, session: SessionState, name: str, value: str) -> bool:
        """Answer ``OPTS name value`` and return True if this group knows the option (else ask ``super()``)."""
        return False

    def login_refusal(self, session: SessionState, user: GatewayUser | None) -> str | None:
        """Why this session may not log in (as ``user``, once its password is checked; None at USER): a 530's
        text, or None."""
        return None

    def data_refusal(self, session: SessionState) -> str | None:
        """Why this session's next transfer may not use its data connection as it is set up: a 521's text, or None."""
        return None

    # -- transfers -------------------------------------------------------------------------------------

    async def transfer(
        self,
        connection: aioftp.Connection,
        session: SessionState,
        verb: str,
        start: Callable[[], Awaitable[T]],
        ready: str,
        run: Callable[[T], Awaitable[None]],
    ) -> None:
        """Run one transfer as a worker of the dispatcher; return once it has answered 150, or why not.

        The worker goes to ``connection.extra_workers``, which ABOR cancels. It calls ``start()`` to open the
        file (a path that cannot be used gets its 550 now, before any 150), answers ``150 ready``, then
        ``run(opened)``, which owns what ``start`` opened until its 226. After the 150, errors become 4xx replies
        (``errors.transfer_errors``) and a cancellation 426 + 226 (aioftp's ``worker``). The handler waits for the
        150 so that replies keep the order of the commands; the data channel is released when the worker ends,
        however it ends.
        """
        answered = asyncio.Event()

        @aioftp.server.worker
        async def worker(server: aioftp.Server, connection: aioftp.Connection, rest: str) -> None:
            try:
                opened = await start()
            except Exception as exc:
                answer(connection, exc, verb)  # no 150 went out: the command's own reply
                return
            else:
                connection.response("150", ready)
            finally:
                answered.set()
            try:
                await transfer_errors(connection, verb, run(opened))
            except asyncio.CancelledError:
                if not self.aborting_transfers:
                    raise  # ABOR or a dropped session: aioftp's 426 + 226
                # The drain ran out of time: what ``run`` opened is already cleaned up (its ``finally``); the
                # session gets its 421 next, so no "226 abort successful" that a client could take for a success.
                connection.response("426", "Transfer aborted: server shutting down.")

        task = asyncio.ensure_future(worker(self, connection, verb))

        def ended(_: asyncio.Task[None]) -> None:
            session.transfers.discard(task)
            session.data.release()
            answered.set()  # also when the task was cancelled before it started
            if self.draining:
                self.transfers_ended_draining += 1
                session.wake()  # the session can now be closed (``ControlConnection.parse_command``)

        task.add_done_callback(ended)
        session.transfers.add(task)
        connection.extra_workers.add(task)
        await answered.wait()

    # -- helpers ---------------------------------------------------------------------------------------

    async def stat_or_none(self, session: SessionState, real_path: PurePath) -> os.stat_result | None:
        """One stat of a path, or None if there is nothing there. Handlers ask this once instead of aioftp's
        ``exists`` then ``is_file``/``is_dir`` then ``stat``: on S3 each of those is a request or two."""
        try:
            return await session.path_io.stat(real_path)  # type: ignore[arg-type]
        except aioftp.PathIOError as exc:
            if isinstance(unwrap(exc), FileNotFoundError):
                return None
            raise

    async def regular_file(
        self, connection: aioftp.Connection, real_path: PurePath, not_a_file: str = "550"
    ) -> os.stat_result | None:
        """The stat of a regular file, or None after answering 550 (missing) or ``not_a_file`` (a directory)."""
        st = await self.stat_or_none(self.session(connection), real_path)
        if st is None:
            connection.response("550", "No such file.")
        elif not stat.S_ISREG(st.st_mode):
            connection.response(not_a_file, "Not a regular file.")
        else:
            return st
        return None

    async def set_mtime(self, connection: aioftp.Connection, path: str, mtime: float, code: str, text: str) -> bool:
        """Set the time of ``path`` if the user may write there; used by MFMT, MDTM with a time and SITE UTIME."""
        session = self.session(connection)
        real_path, virtual_path = self.get_paths(connection, path)
        if not (await connection.user.get_permissions(virtual_path)).writable:
            connection.response("550", "Permission denied.")
        elif not await session.path_io.exists(real_path):
            connection.response("550", "No such file or directory.")
        else:
            await session.path_io.set_mtime(real_path, mtime)
            connection.response(code, text)
        return True


def data_channel_ready(handler: F) -> F:
    """425 unless PASV, EPSV, PORT or EPRT came first, 521 when the data connection must be protected and is not
    (RFC 4217): a check of the shape of aioftp's ``ConnectionConditions``."""

    @functools.wraps(handler)
    async def checked(self: CommandBase, connection: aioftp.Connection, *args: Any, **kwargs: Any) -> bool:
        session = self.session(connection)
        if not session.data.ready:
            connection.response("425", "Use PASV, EPSV, PORT or EPRT first.")
            return True
        if (refusal := self.data_refusal(session)) is not None:
            connection.response("521", refusal)
            return True
        return await handler(self, connection, *args, **kwargs)

    return checked  # type: ignore[return-value]


def checks(*decorators: Any) -> Callable[[F], F]:
    """aioftp's ``ConnectionConditions``, ``PathConditions`` and ``PathPermissions`` (and the gateway's checks of the
    same shape), outermost first. Each sends its own reply and skips the handler. aioftp types them for methods of
    ``Server`` itself, which mypy rejects on a subclass's method; applied through here, the handler keeps its type.
    """

    def apply(handler: F) -> F:
        for decorator in reversed(decorators):
            handler = decorator(handler)
        return handler

    return apply


# -- formats ------------------------------------------------------------------------------------------------


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
