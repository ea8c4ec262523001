"""Login and the session around it: USER, PASS, PWD, FEAT, OPTS, NOOP, and the control connection's end."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import PurePosixPath

import aioftp
from aioftp.common import StreamThrottle

from gateway.commands.base import CommandBase, checks, get, quote_path
from gateway.commands.checksums import hash_feature, opts_hash, selected_algorithm
from gateway.errors import describe_session
from gateway.log import session_context
from gateway.users.manager import GatewayUser, UserDatabaseUnavailable

logger = logging.getLogger(__name__)

TELNET_COMMAND = re.compile(rb"\xff[\xf0-\xff]")

# What parse_command returns instead of a verb when the control connection itself has something to say.
# A verb never contains a space, so no client can send these.
EOF = " eof"
IDLE = " idle"
LINE_TOO_LONG = " line-too-long"
NOT_UTF8 = " not-utf8"

# Facts MLST and MLSD can give (RFC 3659 7.8); OPTS MLST picks some of them for the session.
MLST_FACTS = ("type", "size", "modify", "perm")

FEATURES = (
    "EPRT",
    "EPSV",
    "MDTM",
    "MFMT",
    "MLST " + "".join(f"{fact}*;" for fact in MLST_FACTS),
    "PASV",
    "REST STREAM",
    "SIZE",
    "TVFS",
    "UTF8",
)


class SessionCommands(CommandBase):
    NEW_COMMANDS = {
        "feat": "feat",
        "opts": "opts",
        "noop": "noop",
        EOF: "control_closed",
        IDLE: "control_idle",
        LINE_TOO_LONG: "line_too_long",
        NOT_UTF8: "not_utf8",
    }

    # -- the control connection ------------------------------------------------------------------------

    async def parse_command(self, stream: aioftp.StreamIO, censor_commands: tuple[str] = ("pass",)) -> tuple[str, str]:
        """Read one command. Unlike aioftp's, it never raises: the dispatcher ends a session on any exception,
        so the end of the connection, an idle timeout, an overlong line or bytes that are not UTF-8 come back
        as pseudo-verbs whose handlers answer properly. A running transfer keeps the session from being idle."""
        line = b""
        while True:
            try:
                line = await stream.readline()
            except TimeoutError:
                connection = self.connections.get(stream)
                # A transfer or a long command (HASH of a large file) keeps the session from being idle.
                lock = get(connection, "command_lock") if connection is not None else None
                if connection is not None and (connection.extra_workers or (lock is not None and lock.locked())):
                    continue
                return IDLE, ""
            except ValueError:
                return LINE_TOO_LONG, ""
            except OSError:
                return EOF, ""
            break
        if not line:
            return EOF, ""
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
        logger.debug("%s %s", verb.upper(), "***" if verb in censor_commands else rest)
        return verb, rest

    async def control_closed(self, connection: aioftp.Connection, rest: str) -> bool:
        logger.info("client closed the control connection")
        return False

    async def control_idle(self, connection: aioftp.Connection, rest: str) -> bool:
        connection.response("421", f"Idle for {self.idle_timeout:g} seconds; closing control connection.")
        return False

    async def line_too_long(self, connection: aioftp.Connection, rest: str) -> bool:
        connection.response("500", "Command line too long.")
        return True

    async def not_utf8(self, connection: aioftp.Connection, rest: str) -> bool:
        connection.response("501", "Command is not valid UTF-8.")
        return True

    # -- login -----------------------------------------------------------------------------------------

    async def user(self, connection: aioftp.Connection, rest: str) -> bool:
        if get(connection, "logged"):
            connection.response("530", "Can't change to another user.")
            return True
        _, pending, _ = await self.user_manager.get_user(rest)
        connection.user = pending
        session_context.set(describe_session(connection))
        connection.response("331", "Password required.")
        return True

    @checks(
        aioftp.ConnectionConditions(aioftp.ConnectionConditions.user_required),
    )
    async def pass_(self, connection: aioftp.Connection, rest: str) -> bool:
        if get(connection, "logged"):
            connection.response("503", "Already logged in.")
            return True
        name = connection.user.login
        try:
            outcome = await self.user_manager.login(name, rest)
        except UserDatabaseUnavailable:
            connection.response("421", "Service not available: user database unreachable; try again later.")
            return False
        if outcome.user is None:
            logger.warning("login refused for %r: %s", name, outcome.reason)
            return await self._login_failed(connection, "Login incorrect.")
        user = outcome.user
        try:
            await user.storage.prepare(create=user.create_root)
        except Exception as exc:
            logger.error("login of %r refused: storage %s unavailable: %r", name, user.storage.uri, exc)
            del connection.user
            connection.response("530", "Login refused: storage unavailable.")
            return True
        if not self.user_manager.acquire(user):
            logger.warning("login refused for %r: all %s sessions in use", name, user.maximum_connections)
            del connection.user
            connection.response("530", f"Too many sessions for this user (at most {user.maximum_connections}).")
            return True
        self._begin_session(connection, user)
        connection.current_directory = await self._home(connection, user)
        await self.user_manager.record_login(user, outcome.new_password_hash)
        session_context.set(describe_session(connection))
        logger.info("logged in")
        connection.response("230", "Login successful.")
        return True

    async def _login_failed(self, connection: aioftp.Connection, message: str) -> bool:
        del connection.user
        failures = get(connection, "login_failures", 0) + 1
        connection.login_failures = failures
        # Slows password guessing down; the session is closed after a few failures.
        await asyncio.sleep(self.settings.limits.failed_login_delay)
        if failures >= self.settings.limits.max_login_failures:
            connection.response("421", "Too many failed logins; closing control connection.")
            return False
        connection.response("530", message)
        return True

    def _begin_session(self, connection: aioftp.Connection, user: GatewayUser) -> None:
        connection.user = user
        connection.logged = True
        connection.path_io = user.storage(timeout=self.path_timeout, connection=connection)
        # One throttle per user object, shared by its sessions; a weak key, so it goes with the user.
        throttle = self.throttle_per_user.get(user)
        if throttle is None:
            throttle = StreamThrottle.from_limits(user.read_speed_limit, user.write_speed_limit)
            self.throttle_per_user[user] = throttle
        connection.command_connection.throttles.update(
            user_global=throttle,
            user_per_connection=StreamThrottle.from_limits(
                user.read_speed_limit_per_connection, user.write_speed_limit_per_connection
            ),
        )

    async def _home(self, connection: aioftp.Connection, user: GatewayUser) -> PurePosixPath:
        root = PurePosixPath("/")
        if user.home_path == root:
            return root
        connection.current_directory = root
        real_path, virtual_path = self.get_paths(connection, user.home_path)
        try:
            if await connection.path_io.is_dir(real_path):
                return virtual_path
        except aioftp.PathIOError as exc:
            logger.warning("home %s of %r unusable (%r); starting in /", user.home_path, user.login, exc.reason)
            return root
        logger.warning("home %s of %r does not exist; starting in /", user.home_path, user.login)
        return root

    # -- small commands --------------------------------------------------------------------------------

    @checks(
        aioftp.ConnectionConditions(aioftp.ConnectionConditions.login_required),
    )
    async def pwd(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        connection.response("257", f"{quote_path(connection.current_directory)} is the current directory.")
        return True

    async def feat(self, connection: aioftp.Connection, rest: str) -> bool:
        features = sorted([*FEATURES, hash_feature(selected_algorithm(connection))])
        connection.response("211", ["Features:", *features, "End"], True)
        return True

    async def opts(self, connection: aioftp.Connection, rest: str) -> bool:
        option, _, value = rest.partition(" ")
        option = option.upper()
        if option == "UTF8" and value.upper() in ("ON", ""):
            connection.response("200", "UTF-8 is always on.")
        elif option == "HASH":
            opts_hash(connection, value)
        elif option == "MLST":
            # RFC 3659 7.9: unknown facts are dropped silently; the reply names the facts now in use.
            wanted = {fact.lower() for fact in value.split(";") if fact}
            facts = tuple(fact for fact in MLST_FACTS if fact in wanted)
            connection.mlst_facts = facts
            connection.response("200", "MLST OPTS " + "".join(f"{fact};" for fact in facts))
        else:
            connection.response("501", f"Option {option!r} not understood.")
        return True

    async def noop(self, connection: aioftp.Connection, rest: str) -> bool:
        connection.response("200", "NOOP ok.")
        return True
