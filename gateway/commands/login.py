"""USER and PASS: the login, and the session it begins (the user's storage, throttles and home directory).

aioftp's own fields are set here, where its handlers and decorators read them (``connection.user``, ``logged``,
``path_io``, ``current_directory``), and the typed ones in the :class:`gateway.session.SessionState`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import PurePosixPath

import aioftp
from aioftp.common import StreamThrottle

from gateway.commands.base import CommandBase
from gateway.log import log_context, shown_name
from gateway.session import SessionState
from gateway.users.manager import GatewayUser, UserDatabaseUnavailable

logger = logging.getLogger(__name__)


class LoginCommands(CommandBase):
    async def user(self, connection: aioftp.Connection, rest: str) -> bool:
        """Every name gets 331 (the password decides, at PASS): the reply tells nobody which names exist."""
        session = self.session(connection)
        if session.user is not None:
            connection.response("530", "Can't change to another user.")
            return True
        if (refusal := self.login_refusal(session, None)) is not None:
            connection.response("530", refusal)
            return True
        session.login_name = rest
        log_context.set(session.log_context())
        connection.response("331", "Password required.")
        return True

    async def pass_(self, connection: aioftp.Connection, rest: str) -> bool:
        session = self.session(connection)
        if session.user is not None:
            connection.response("503", "Already logged in.")
            return True
        if (refusal := self.login_refusal(session, None)) is not None:
            connection.response("530", refusal)
            return True
        name = session.login_name
        if name is None:
            connection.response("503", "Send USER first.")
            return True
        shown = shown_name(name)
        # The client IP's turn, from the ban check until a failure is counted (gateway.bans.Bans.login_turn).
        async with self.bans.login_turn(session.client_host):
            banned, delay = await self.bans.before_login(session.client_host, name)
            if banned:
                logger.warning("login refused for %r: the client's address is banned", shown)
                self._login_refused(shown, "421", "address banned")
                connection.response("421", "Too many failed logins from your address; closing control connection.")
                return False
            if delay:
                # A user name under attack: every login for it waits, before the password is checked (gateway.bans).
                await asyncio.sleep(delay)
            try:
                outcome = await self.user_manager.login(name, rest)
            except UserDatabaseUnavailable:
                self._login_refused(shown, "421", "user database unreachable")
                connection.response("421", "Service not available: user database unreachable; try again later.")
                return False
            if outcome.user is None:
                logger.warning("login refused for %r: %s", shown, outcome.reason)
                self.metrics.login("failure")
                self.audit.event("login", user=shown, result="failed", code="530")
                # Counted per client IP (a ban) and per user name (slowed): gateway.bans.
                banned = await self.bans.failed(session.client_host, name)
        if outcome.user is None:
            return await self._login_failed(connection, session, banned)
        user = outcome.user
        if (refusal := self.login_refusal(session, user)) is not None:
            logger.warning("login of %r refused: %s", name, refusal)
            session.login_name = None
            self._login_refused(name, "530", "TLS required")
            connection.response("530", refusal)
            return True
        try:
            # A local directory that does not exist yet is made now, for a user's own storage (``user add --storage``)
            # as for the default one; ``user add`` warns when it could not be (``pathio_backends.probe``).
            await user.storage.prepare(create=True)
        except Exception as exc:
            logger.error("login of %r refused: storage %s unavailable: %r", name, user.storage.uri, exc)
            session.login_name = None
            self._login_refused(name, "530", "storage unavailable")
            connection.response("530", "Login refused: storage unavailable.")
            return True
        if not self.user_manager.acquire(user):
            logger.warning("login refused for %r: all %s sessions in use", name, user.maximum_connections)
            session.login_name = None
            self._login_refused(name, "530", "too many sessions")
            connection.response("530", f"Too many sessions for this user (at most {user.maximum_connections}).")
            return True
        self._begin_session(connection, session, user)
        connection.current_directory = await self._home(connection, session, user)
        await self.user_manager.record_login(user, outcome)
        log_context.set(session.log_context())
        logger.info("logged in")
        self.metrics.login("success")
        self.audit.event("login", user=name, result="ok")
        connection.response("230", "Login successful.")
        return True

    def _login_refused(self, name: str, code: str, reason: str) -> None:
        """A right password that still cannot log in (a limit, the storage, the database): counted apart from
        wrong passwords, which an alert on guessing looks at."""
        self.metrics.login("refused")
        self.audit.event("login", user=name, result="failed", code=code, reason=reason)

    async def _login_failed(self, connection: aioftp.Connection, session: SessionState, banned: bool) -> bool:
        """A wrong password, already counted (``banned``: its IP is banned, now or before)."""
        session.login_name = None
        session.login_failures += 1
        # Slows password guessing down; the session is closed after a few failures, or once its IP is banned.
        await asyncio.sleep(self.settings.limits.failed_login_delay)
        if banned:
            connection.response("421", "Too many failed logins from your address; closing control connection.")
            return False
        if session.login_failures >= self.settings.limits.max_login_failures:
            connection.response("421", "Too many failed logins; closing control connection.")
            return False
        connection.response("530", "Login incorrect.")
        return True

    def _begin_session(self, connection: aioftp.Connection, session: SessionState, user: GatewayUser) -> None:
        storage = user.storage(timeout=self.path_timeout, connection=connection)
        session.user, session.storage = user, storage
        # aioftp's handlers (CWD, RMD, DELE, RNFR ...) and decorators read these; the dispatcher tells the user
        # manager of the session's end (a session slot) because ``user`` is set.
        connection.user, connection.logged, connection.path_io = user, True, storage
        throttle = self.user_throttles.get(user)
        if throttle is None:
            throttle = StreamThrottle.from_limits(user.read_speed_limit, user.write_speed_limit)
            self.user_throttles[user] = throttle
        # A user's limits are over all its sessions (it has no per-connection ones, which would cost every
        # session a throttle of its own, idle ones too).
        connection.command_connection.throttles["user_global"] = throttle

    async def _home(self, connection: aioftp.Connection, session: SessionState, user: GatewayUser) -> PurePosixPath:
        root = PurePosixPath("/")
        if user.home_path == root:
            return root
        connection.current_directory = root
        real_path, virtual_path = self.get_paths(connection, user.home_path)
        try:
            if await session.path_io.is_dir(real_path):
                return virtual_path
        except aioftp.PathIOError as exc:
            logger.warning("home %s of %r unusable (%r); starting in /", user.home_path, user.login, exc.reason)
            return root
        logger.warning("home %s of %r does not exist; starting in /", user.home_path, user.login)
        return root
