"""FTPS (RFC 4217): AUTH TLS, PBSZ, PROT and CCC, and who must use them (``tls.required``, a user's own ``tls``).

AUTH TLS answers 234 and the control connection becomes TLS in place: the same reader and writer, the same
session. The traps: aioftp's dispatcher would read the next command while AUTH runs, so no line is read until AUTH
has finished (``SessionState.auth_pending``), and what came in clear before the handshake is dropped, never taken
as sent under TLS (a man in the middle's injection); and the client's handshake follows the 234 at once, so the
socket stops being read in the very step that writes the 234 (``ControlConnection.write_response``). Data connections
follow PROT (``DataChannel.tls``): with ``P`` each is a TLS connection, this side the server, that must resume the
control connection's TLS session while ``tls.session_reuse`` is on.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import PurePosixPath

import aioftp

from gateway import aioftp_compat
from gateway.commands.base import CommandBase
from gateway.session import SessionState
from gateway.users.manager import GatewayUser

logger = logging.getLogger(__name__)

# AUTH's argument: TLS (RFC 4217), and SSL, which older clients send and which means the same here.
MECHANISMS = ("TLS", "SSL", "TLS-C")


class SecurityCommands(CommandBase):
    NEW_COMMANDS = {"auth": "auth", "pbsz": "pbsz", "prot": "prot", "ccc": "ccc"}

    def features(self, session: SessionState) -> list[str]:
        extra = ["AUTH TLS", "PBSZ", "PROT"] if self.tls is not None else []
        return [*super().features(session), *extra]

    # -- policy ----------------------------------------------------------------------------------------

    def _user_requires_tls(self, user: GatewayUser | None) -> bool:
        """A user's own ``tls`` (``user add/set --tls``: ``required``/``optional``) wins over ``tls.required``.
        Before the password is checked (``user`` None: USER, and PASS on a connection whose USER was refused) only
        ``tls.required`` can decide: telling a name's setting before that would tell which names exist. So with
        ``tls.required`` on, ``optional`` lets a user's transfers go in clear (PROT C), not its login."""
        own = user.tls if user is not None else None
        if own is not None:
            return own == "required"
        return self.tls is not None and self.tls.required

    def login_refusal(self, session: SessionState, user: GatewayUser | None) -> str | None:
        if session.tls is None and self._user_requires_tls(user):
            return "TLS required: send AUTH TLS first."
        return super().login_refusal(session, user)

    def data_refusal(self, session: SessionState) -> str | None:
        if session.data.tls is None and self._user_requires_tls(session.user):
            return "Data connections must be protected: send PBSZ 0 and PROT P first."
        return super().data_refusal(session)

    # -- commands --------------------------------------------------------------------------------------

    async def auth(self, connection: aioftp.Connection, rest: str) -> bool:
        session = self.session(connection)
        if self.tls is None:
            connection.response("502", "TLS is not configured on this server.")
            return True
        if rest.strip().upper() not in MECHANISMS:
            connection.response("504", "Only AUTH TLS is supported.")
            return True
        if session.tls is not None:
            connection.response("503", "The control connection is already protected.")
            return True
        context = self.tls.context
        written = session.tls_reply_written = asyncio.get_running_loop().create_future()
        connection.response("234", "AUTH TLS successful; start the handshake.")
        stream = connection.command_connection
        try:
            # Bounded too: a 234 that is never written (the client vanished) must not hold the session forever.
            async with asyncio.timeout(self.settings.timeouts.socket):
                await written
            plaintext = await aioftp_compat.start_tls(
                stream.reader, stream.writer, context, handshake_timeout=self.settings.timeouts.socket, early=False
            )
        except (OSError, TimeoutError) as exc:
            logger.warning("TLS handshake on the control connection failed: %r", exc)
            return False  # no reply can reach a client whose handshake failed
        finally:
            session.tls_reply_written = None
        if plaintext:
            logger.warning("%d bytes sent after AUTH TLS before the handshake dropped", len(plaintext))
        session.tls = context
        # RFC 4217: a new security exchange resets PBSZ and PROT.
        session.pbsz = False
        session.data.tls = None
        ssl_object = stream.writer.get_extra_info("ssl_object")
        logger.info("control connection secured (%s, %s)", ssl_object.version(), ssl_object.cipher()[0])
        return True

    async def pbsz(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        session = self.session(connection)
        rest = str(rest)
        if session.tls is None:
            connection.response("503", "PBSZ needs a protected control connection: send AUTH TLS first.")
            return True
        if not rest.strip().isdigit():
            connection.response("501", "PBSZ needs a number (0 for TLS).")
            return True
        session.pbsz = True
        connection.response("200", "PBSZ=0")
        return True

    async def prot(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        session = self.session(connection)
        level = str(rest).strip().upper()
        if session.tls is None or not session.pbsz:
            connection.response("503", "PROT needs AUTH TLS and PBSZ first.")
        elif level == "P":
            self.protect(session, session.tls, connection.command_connection.writer)
            connection.response("200", "PROT now Private.")
        elif level == "C":
            session.data.tls = None
            connection.response("200", "PROT now Clear.")
        elif level in ("S", "E"):
            connection.response("536", f"PROT {level} is not supported; use P or C.")
        else:
            connection.response("504", "PROT takes C or P.")
        return True

    async def ccc(self, connection: aioftp.Connection, rest: str) -> bool:
        """Clearing the control connection would send the rest of the session in clear: refused (RFC 4217 12.3)."""
        if self.session(connection).tls is None:
            connection.response("533", "The control connection is not protected.")
        else:
            connection.response("534", "CCC refused: the control connection stays protected.")
        return True

    def protect(self, session: SessionState, context: ssl.SSLContext, control: asyncio.StreamWriter) -> None:
        """PROT P: data connections are TLS, with the control connection's context, and resume its session."""
        session.data.tls = context
        session.data.tls_reuse = self.tls is None or self.tls.session_reuse
        ssl_object = control.get_extra_info("ssl_object")
        tls_session = ssl_object.session if ssl_object is not None else None
        session.data.tls_session_id = tls_session.id if tls_session is not None and tls_session.id else None
