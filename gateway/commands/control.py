"""The control connection itself: reading commands, and what its end, its silence or a garbled line get.

aioftp's dispatcher ends a session on any exception, so :meth:`ControlConnection.parse_command` never raises: the
end of the connection, an idle timeout, an overlong line or bytes that are not UTF-8 come back as pseudo-verbs
whose handlers answer properly (a verb never contains a space, so no client can send them).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from pathlib import PurePosixPath

import aioftp

from gateway.commands.base import CommandBase
from gateway.log import log_context
from gateway.metrics import OTHER_VERB

logger = logging.getLogger(__name__)

TELNET_COMMAND = re.compile(rb"\xff[\xf0-\xff]")

EOF = " eof"
IDLE = " idle"
LINE_TOO_LONG = " line-too-long"
NOT_UTF8 = " not-utf8"
# The server drains (SIGTERM) and this session has no transfer running: it gets 421 and is closed.
DRAIN = " drain"
PROXY_HEADER = " proxy-header"
# No login within ``timeouts.login`` of connecting: 421 and close, after a PASS that is running.
LOGIN_LATE = " login-late"
# A verb no handler knows (its argument is the verb): 502 in its turn. aioftp's dispatcher would answer it at once,
# ahead of the replies of the commands before it, and even after the 221 of a QUIT before it.
UNKNOWN = " unknown"
# The third line of a PROXY v2 signature (``\r\n\r\n\x00\r\nQUIT\n``), never an FTP command.
PROXY_V2_LINE = b"\x00\r\n"


class ControlConnection(CommandBase):
    NEW_COMMANDS = {
        EOF: "control_closed",
        IDLE: "control_idle",
        LINE_TOO_LONG: "line_too_long",
        NOT_UTF8: "not_utf8",
        DRAIN: "control_draining",
        PROXY_HEADER: "proxy_header",
        LOGIN_LATE: "login_late",
        UNKNOWN: "unknown_command",
    }

    async def parse_command(self, stream: aioftp.StreamIO, censor_commands: tuple[str] = ("pass",)) -> tuple[str, str]:
        """Read one command. A session with a transfer or a command running (HASH of a large file) is not idle.

        While the server drains, a session without a running transfer gets :data:`DRAIN` instead (once): the drain
        wakes the read by moving its deadline to now (``SessionState.wake``), so an idle session needs no task of
        its own to be told. Before the login the read's deadline is also bounded by the login's, which hands the
        session :data:`LOGIN_LATE` (once) without a timer task either.
        """
        session = self.sessions.get(stream.writer)
        if session is not None and session.auth_pending is not None:
            # Nothing is read while AUTH runs: a line the client sent before its handshake would otherwise be taken
            # as sent under TLS (the STARTTLS command injection); what is left unread then is dropped by AUTH.
            await session.auth_pending
        line = b""
        loop = asyncio.get_running_loop()
        idle_at: float | None = None
        # Part of a line over the length limit was dropped: the rest of it goes too, up to its end.
        too_long = False
        while True:
            if self.draining and session is not None and not session.transfers and not session.closing:
                session.closing = True
                return DRAIN, ""
            if idle_at is None and stream.read_timeout is not None:
                idle_at = loop.time() + stream.read_timeout
            wake_at = idle_at
            if session is not None and session.user is None and session.login_deadline is not None:
                if loop.time() >= session.login_deadline:
                    session.login_deadline = None
                    return LOGIN_LATE, ""
                wake_at = session.login_deadline if wake_at is None else min(wake_at, session.login_deadline)
            try:
                # The StreamReader itself under asyncio.timeout: aioftp's ``readline`` adds a throttle (none applies
                # to commands) and a ``wait_for``, which on Python 3.11 is one more task per line, alive all the
                # time a session is idle.
                async with asyncio.timeout_at(wake_at) as deadline:
                    if session is not None:
                        session.read_deadline = deadline
                    line = await stream.reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                # asyncio's readline would drop only what it holds and hand out the rest of the line later as a
                # command of its own (after a pause, ``<64 KiB of padding>DELE file`` ran the DELE).
                await stream.reader.readexactly(exc.consumed)
                too_long = True
                continue
            except asyncio.IncompleteReadError as exc:
                line = b"" if too_long else exc.partial  # the end of the connection (after a last unended line)
            except TimeoutError:
                if self.draining or (session is not None and session.busy):
                    idle_at = None  # the idle time starts again
                    continue
                if idle_at is None or loop.time() < idle_at:
                    continue  # the login's deadline, not the idle one: a session logged in since is not idle
                return IDLE, ""
            except OSError:
                return EOF, ""
            finally:
                if session is not None:
                    session.read_deadline = None
            break
        if not line:
            return EOF, ""
        if too_long:
            return LINE_TOO_LONG, ""
        if line.startswith(b"PROXY ") or line == PROXY_V2_LINE:
            # A header that was not read as one: the peer is not trusted (or sent a second one). Never honoured.
            return PROXY_HEADER, ""
        if b"\xff" in line:
            # Telnet commands (IAC IP, IAC DM before an ABOR); UTF-8 never has a 0xff byte.
            line = TELNET_COMMAND.sub(lambda m: b"\xff" if m.group() == b"\xff\xff" else b"", line)
        try:
            text = line.decode(self.encoding)
        except UnicodeDecodeError:
            return NOT_UTF8, ""
        # Only the line ending goes: a trailing space can be part of a file name.
        verb, _, rest = text.rstrip("\r\n").partition(" ")
        verb = verb.lower()
        if verb == "auth" and session is not None:
            session.auth_pending = asyncio.get_running_loop().create_future()  # ended by ``GatewayServer._command``
        if logger.isEnabledFor(logging.DEBUG):
            if session is not None:
                # Each read is a task of the dispatcher's, whose context is from before the login: the user, for
                # the debug line of the command.
                log_context.set(session.log_context())
            logger.debug("%s %s", verb.upper(), "***" if verb in censor_commands else rest)
        if verb not in self.commands_mapping:
            # Counted under one label whatever the client sent.
            self.metrics.command(OTHER_VERB, "502")
            return UNKNOWN, verb
        return verb, rest

    async def write_response(
        self, stream: aioftp.StreamIO, code: str, lines: str | Iterable[str] = "", list: bool = False
    ) -> None:
        """aioftp's reply format (``code-`` before all lines but the last; ``list`` indents the middle lines), sent
        with one write; waits only when the client does not read its replies (aioftp waits on every line with
        ``wait_for``, a task each). A reply to a client that is already gone is dropped: uvloop raises on a write
        to a closed transport, which aioftp's dispatcher would log as a traceback (a client that connects and
        closes at once, such as a port probe, then gets the drain's 421)."""
        *head, tail = [lines] if isinstance(lines, str) else lines
        if list and head:
            first, *body = head
            text = [f"{code}-{first}", *(f" {line}" for line in body)]
        else:
            text = [f"{code}-{line}" for line in head]
        text.append(f"{code} {tail}\r\n")
        logger.debug("%s", text)
        writer = stream.writer
        if writer.transport.is_closing():
            if code == "234":
                self._tls_reply_lost(writer)
            return
        writer.write("\r\n".join(text).encode(self.encoding))
        if code == "234":
            self._tls_reply_written(writer)
        if writer.transport.get_write_buffer_size():
            async with asyncio.timeout(stream.write_timeout):
                await writer.drain()

    async def greeting(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        """aioftp's 220, or its ``421 Too many connections`` past ``limits.max_connections`` (then the dispatcher
        sends it and closes): that refusal is logged and counted here."""
        if await super().greeting(connection, rest):
            return True
        logger.warning("connection refused: %d connections open (limits.max_connections)", self.max_connections)
        self.metrics.connection_refused("max_connections")
        self.audit.event("refused", reason="max_connections", code="421")
        return False

    def _tls_reply_written(self, writer: asyncio.StreamWriter) -> None:
        """AUTH TLS's 234 is written: stop reading at once, in the same step (the client's handshake may be the
        next thing on the wire), and let AUTH's handler start the handshake."""
        session = self.sessions.get(writer)
        if session is not None and session.tls_reply_written is not None and not session.tls_reply_written.done():
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            session.tls_reply_written.set_result(None)

    def _tls_reply_lost(self, writer: asyncio.StreamWriter) -> None:
        """AUTH TLS's 234 could not be written (the client is gone): AUTH's handler ends instead of waiting for it."""
        session = self.sessions.get(writer)
        if session is not None and session.tls_reply_written is not None and not session.tls_reply_written.done():
            session.tls_reply_written.set_exception(ConnectionResetError("the control connection closed before 234"))

    async def control_closed(self, connection: aioftp.Connection, rest: str) -> bool:
        logger.info("client closed the control connection")
        return False

    async def login_late(self, connection: aioftp.Connection, rest: str) -> bool:
        """421 and close a session not logged in within ``timeouts.login``. This runs after the commands read
        before it (``server.in_order``), so a PASS that was checking the password when time ran out finishes
        first, and a session it logged in stays open."""
        if self.session(connection).user is not None:
            return True
        logger.info("no login within %g seconds", self.settings.timeouts.login)
        connection.response("421", f"Login timed out after {self.settings.timeouts.login:g} seconds; closing.")
        return False

    async def control_idle(self, connection: aioftp.Connection, rest: str) -> bool:
        connection.response("421", f"Idle for {self.idle_timeout:g} seconds; closing control connection.")
        return False

    async def control_draining(self, connection: aioftp.Connection, rest: str) -> bool:
        """421 and close, once what the session was doing is done (this runs after the commands before it). A
        transfer started by a command that was already running when the drain began keeps the session open; its
        end wakes the session again."""
        session = self.session(connection)
        if session.transfers:
            session.closing = False
            return True
        connection.response("421", "Server shutting down; closing control connection.")
        return False

    async def unknown_command(self, connection: aioftp.Connection, verb: str) -> bool:
        connection.response("502", f"{verb!r} not implemented")
        return True

    async def line_too_long(self, connection: aioftp.Connection, rest: str) -> bool:
        connection.response("500", "Command line too long.")
        return True

    async def not_utf8(self, connection: aioftp.Connection, rest: str) -> bool:
        connection.response("501", "Command is not valid UTF-8.")
        return True

    async def proxy_header(self, connection: aioftp.Connection, rest: str) -> bool:
        logger.warning("PROXY protocol header from an untrusted address refused")
        connection.response("421", "PROXY protocol header not accepted from this address; closing.")
        return False
