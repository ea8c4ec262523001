"""What the gateway keeps for one control connection, typed, in one place.

aioftp keeps its own fields on its ``Connection`` (a dict of futures keyed by name): ``user`` and ``logged``,
``current_directory``, ``path_io`` and ``rename_from``, which its handlers and decorators read there. The gateway
sets those where aioftp expects them (at login, in ``commands/login.py``) and keeps everything else here; no
other name is set on a ``Connection``. ``GatewayServer`` makes one :class:`SessionState` when a control connection
is accepted and closes it when the connection ends.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

from gateway.datachannel import DataChannel
from gateway.log import LogContext, shown_name
from gateway.users.manager import GatewayUser
from pathio_backends.base import TransactionalPathIO

# Facts MLST and MLSD can give (RFC 3659 7.8); OPTS MLST picks some of them for the session.
MLST_FACTS = ("type", "size", "modify", "perm")
# HASH's algorithm until OPTS HASH picks another (draft-bryan-ftpext-hash).
DEFAULT_HASH = "SHA-256"


@dataclass(eq=False, slots=True)
class SessionState:
    client_host: str
    client_port: int
    data: DataChannel
    # Short and unique enough to find one session's lines among many (logs and audit events carry it).
    session_id: str = field(default_factory=lambda: secrets.token_hex(4))
    # Commands run one at a time, in the order they came (``server.in_order``); transfers run outside it.
    command_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Transfer workers running (their 150 sent, their 226 not yet): they keep an idle session open.
    transfers: set[asyncio.Task[None]] = field(default_factory=set)
    # The name given with USER, until PASS; then the user, and the storage (as aioftp's Connection has them).
    login_name: str | None = None
    login_failures: int = 0
    # Loop time by which the login must be done (``timeouts.login``); None once the session was told it is late.
    login_deadline: float | None = None
    user: GatewayUser | None = None
    storage: TransactionalPathIO | None = None
    transfer_type: Literal["A", "I"] = "I"
    # From REST, for the next transfer only (aioftp's dispatcher would clear its own on any other command).
    restart_offset: int = 0
    hash_algorithm: str = DEFAULT_HASH
    mlst_facts: tuple[str, ...] = MLST_FACTS
    # The deadline of the read waiting for the next command, while one waits: the drain moves it to now to wake
    # the session (``ControlConnection.parse_command``) without a task per idle session.
    read_deadline: asyncio.Timeout | None = None
    # Draining: the session was handed its closing pseudo-command (``control.DRAIN``) and is waiting for it to run.
    closing: bool = False
    # A command ended the session (its handler returned False): the commands read after it are not run.
    ended: bool = False
    # The FTP path RNFR named (aioftp keeps only the storage's path), for RNTO's audit event.
    rename_from: PurePosixPath | None = None
    # The replies of this session's commands are counted (``GatewayServer._command``).
    replies_counted: bool = False
    # FTPS: the TLS context the control connection was secured with (AUTH TLS, or the implicit listener); its data
    # connections use the same one (``gateway.tls``). None: plain.
    tls: ssl.SSLContext | None = None
    # PBSZ was answered (RFC 4217: it comes before PROT).
    pbsz: bool = False
    # AUTH TLS's 234 is on its way: resolved by ``write_response`` once it is written, with reading paused, so that
    # no byte of the handshake is read as a command.
    tls_reply_written: asyncio.Future[None] | None = None
    # An AUTH was read and has not finished: no further line is read until it has (``ControlConnection.parse_command``).
    auth_pending: asyncio.Future[None] | None = None

    @property
    def path_io(self) -> TransactionalPathIO:
        """The user's storage; every command that uses it needs a login first (``server.gate``)."""
        if self.storage is None:
            raise RuntimeError("no storage before login")
        return self.storage

    @property
    def ascii(self) -> bool:
        """TYPE A: line endings are converted on the wire."""
        return self.transfer_type == "A"

    @property
    def busy(self) -> bool:
        """A command or a transfer is running (so the session is not idle)."""
        return bool(self.transfers) or self.command_lock.locked()

    def wake(self) -> None:
        """Wake the read waiting for this session's next command (it then looks at the server's drain)."""
        if self.read_deadline is not None and not self.read_deadline.expired():
            self.read_deadline.reschedule(asyncio.get_running_loop().time())

    def end_auth(self) -> None:
        """AUTH has finished, however it ended: reading commands goes on."""
        if self.auth_pending is not None and not self.auth_pending.done():
            self.auth_pending.set_result(None)
        self.auth_pending = None

    def take_restart_offset(self) -> int:
        offset, self.restart_offset = self.restart_offset, 0
        return offset

    def log_context(self) -> LogContext:
        """The session for the log and the audit log (the USER name before PASS)."""
        # The USER name as sent is up to a line long (64 KiB): shortened, as every log line and event carries it.
        name = self.user.login if self.user is not None else self.login_name and shown_name(self.login_name)
        return LogContext(self.session_id, self.client_host, self.client_port, name)

    def describe(self) -> str:
        """``host:port user`` for the log (the USER name before PASS)."""
        return self.log_context().describe()
