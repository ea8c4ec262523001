"""LIST, NLST, MLSD and MLST.

Entries are streamed to the client as the backend lists them; the backend answers the per-entry ``stat``
from what its listing just returned, so a listing costs one pass over the directory, not one call per entry.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path, PurePosixPath

import aioftp
from aioftp.common import END_OF_LINE

from gateway.commands.base import LOGGED_IN, CommandBase, checks, data_channel_ready, ls_time, mlsx_time
from gateway.datachannel import send
from gateway.session import MLST_FACTS, SessionState

# aioftp's checks for a listing: logged in, PASV/EPSV sent, the path readable (whether it exists: one stat).
listing_command = checks(LOGGED_IN, data_channel_ready, aioftp.PathPermissions(aioftp.PathPermissions.readable))
NOT_FOUND = ("550", "No such file or directory.")


STAT_MAX_ENTRIES = 10_000


async def nothing() -> None:
    """A listing opens nothing before its 150: the listing is read as it is sent."""


def split_list_arguments(rest: str) -> tuple[str, str]:
    """``-la /dir`` to ``("la", "/dir")``: clients send ``ls`` options that LIST itself does not define."""
    flags = ""
    words = rest.split(" ")
    while words and words[0].startswith("-") and len(words[0]) > 1:
        flags += words.pop(0)[1:]
    return flags, " ".join(words)


def mlsx_perm(st: os.stat_result, permission: aioftp.Permission) -> str:
    """RFC 3659 ``perm`` fact from the user's permission on the path."""
    if stat.S_ISDIR(st.st_mode):
        return ("el" if permission.readable else "") + ("cmpdf" if permission.writable else "")
    return ("r" if permission.readable else "") + ("awdf" if permission.writable else "")


# What ls shows for a directory; the storage's own figure (4096 on ext4, 0 on S3) would tell backends apart.
DIRECTORY_SIZE = 4096


def list_line(path: Path, st: os.stat_result, now: float) -> str:
    size = DIRECTORY_SIZE if stat.S_ISDIR(st.st_mode) else st.st_size
    return (
        f"{stat.filemode(st.st_mode)} {st.st_nlink:3d} ftp      ftp      {size:>13d} "
        f"{ls_time(st.st_mtime, now)} {path.name}"
    )


def split_glob(path: str) -> tuple[str, str | None]:
    """``sub/*.txt`` to ``("sub", "*.txt")``: clients expand ``mget *`` with ``NLST *`` and expect the server to
    (as vsftpd does). Only the last component may hold ``*``, ``?`` or ``[...]``."""
    directory, _, name = path.rpartition("/")
    if any(char in name for char in "*?["):
        return directory or ("/" if path.startswith("/") else ""), name
    return path, None


class ListingCommands(CommandBase):
    NEW_COMMANDS = {"nlst": "nlst", "stat": "stat"}

    def features(self, session: SessionState) -> list[str]:
        return [*super().features(session), "MLST " + "".join(f"{fact}*;" for fact in MLST_FACTS)]

    def option(self, connection: aioftp.Connection, session: SessionState, name: str, value: str) -> bool:
        """OPTS MLST: unknown facts are dropped silently; the reply names the facts now in use (RFC 3659 7.9)."""
        if name != "MLST":
            return super().option(connection, session, name, value)
        wanted = {fact.lower() for fact in value.split(";") if fact}
        session.mlst_facts = tuple(fact for fact in MLST_FACTS if fact in wanted)
        connection.response("200", "MLST OPTS " + "".join(f"{fact};" for fact in session.mlst_facts))
        return True

    async def _target(
        self, connection: aioftp.Connection, rest: str, pattern: str | None
    ) -> tuple[Path, os.stat_result] | None:
        """The path a listing command names and its stat, or None after answering 550: it does not exist, or
        a pattern follows something that is not a directory."""
        real_path, _ = self.get_paths(connection, rest)
        st = await self.stat_or_none(self.session(connection), real_path)
        if st is None:
            connection.response(*NOT_FOUND)
            return None
        if pattern is not None and not stat.S_ISDIR(st.st_mode):
            connection.response("550", "Not a directory.")
            return None
        return real_path, st

    async def _entries(
        self, connection: aioftp.Connection, real_path: Path, st: os.stat_result, pattern: str | None = None
    ) -> AsyncIterator[tuple[Path, os.stat_result]]:
        """The entries of a directory with their stat (those matching ``pattern``), or the path itself when it
        is not a directory (as ``ls`` does); ``st`` is the path's own stat."""
        path_io = self.session(connection).path_io
        if not stat.S_ISDIR(st.st_mode):
            yield real_path, st
            return
        async for path in path_io.list(real_path):
            if pattern is None or fnmatch.fnmatchcase(path.name, pattern):
                yield path, await path_io.stat(path)

    async def _mlsx_line(self, connection: aioftp.Connection, path: Path, st: os.stat_result, name: str) -> str:
        """``type=file;size=3;modify=20261125061256;perm=rawdf; name`` with the facts OPTS MLST selected."""
        selected = self.session(connection).mlst_facts
        facts = []
        if "type" in selected:
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "OS.unix=other"
            facts.append(f"type={kind};")
        if "size" in selected and not stat.S_ISDIR(st.st_mode):
            # RFC 3659 7.5.5: size is a fact of files, not of directories.
            facts.append(f"size={st.st_size};")
        if "modify" in selected:
            facts.append(f"modify={mlsx_time(st.st_mtime)};")
        if "perm" in selected:
            virtual = PurePosixPath("/") / path.relative_to(connection.user.base_path)
            permission = await connection.user.get_permissions(virtual)
            facts.append(f"perm={mlsx_perm(st, permission)};")
        return "".join(facts) + " " + name

    async def _send_lines(
        self, connection: aioftp.Connection, verb: str, make_lines: Callable[[], AsyncIterator[str]], what: str
    ) -> None:
        """Stream ``make_lines()`` over the data connection, after a 150."""
        session = self.session(connection)

        async def send_lines(_: None) -> None:
            async with await session.data.connect(connection.command_connection.throttles) as stream:
                async for line in make_lines():
                    await send(stream, (line + END_OF_LINE).encode(self.encoding))
            connection.response("226", f"{what} sent.")

        await self.transfer(connection, session, verb, nothing, f"Here comes the {what.lower()}.", send_lines)

    async def list(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        _, path = split_list_arguments(str(rest))
        return await self._list(connection, *split_glob(path))

    @listing_command
    async def _list(self, connection: aioftp.Connection, rest: str, pattern: str | None) -> bool:
        target = await self._target(connection, rest, pattern)
        if target is None:
            return True

        async def lines() -> AsyncIterator[str]:
            now = time.time()
            async for path, st in self._entries(connection, *target, pattern):
                yield list_line(path, st, now)

        await self._send_lines(connection, "LIST", lines, "Directory listing")
        return True

    async def nlst(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        _, path = split_list_arguments(str(rest))
        return await self._nlst(connection, *split_glob(path))

    @listing_command
    async def _nlst(self, connection: aioftp.Connection, rest: str, pattern: str | None) -> bool:
        # With a directory before the pattern, names carry it, so that the client can RETR them (mget).
        prefix = f"{rest.rstrip('/')}/" if pattern is not None and rest else ""
        target = await self._target(connection, rest, pattern)
        if target is None:
            return True

        async def lines() -> AsyncIterator[str]:
            async for path, _ in self._entries(connection, *target, pattern):
                yield prefix + path.name

        await self._send_lines(connection, "NLST", lines, "Name list")
        return True

    async def stat(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        """STAT: the session's status, or with a path, its listing on the control connection (RFC 959)."""
        if not str(rest).strip():
            session = self.session(connection)
            user = session.user.login if session.user is not None else "-"
            mode = "ASCII" if session.ascii else "Binary"
            status = [
                "ftp-gateway status:",
                f"Connected from {session.client_host}",
                f"Logged in as {user}",
                f"TYPE: {mode}, MODE: Stream, STRU: File",
                f"{len(session.transfers)} transfer(s) in progress",
                "End of status",
            ]
            connection.response("211", status, True)
            return True
        _, path = split_list_arguments(str(rest))
        return await self._stat_path(connection, *split_glob(path))

    @checks(LOGGED_IN, aioftp.PathPermissions(aioftp.PathPermissions.readable))
    async def _stat_path(self, connection: aioftp.Connection, rest: str, pattern: str | None) -> bool:
        _, virtual_path = self.get_paths(connection, rest)
        target = await self._target(connection, rest, pattern)
        if target is None:
            return True
        now = time.time()
        # Replies are kept whole until sent, so a control-connection listing is bounded.
        lines = []
        async for path, st in self._entries(connection, *target, pattern):
            lines.append(list_line(path, st, now))
            if len(lines) >= STAT_MAX_ENTRIES:
                lines.append(f"(first {STAT_MAX_ENTRIES} entries only: use LIST for the rest)")
                break
        connection.response("213", [f"Status of {virtual_path}:", *lines, "End of status"], True)
        return True

    @listing_command
    async def mlsd(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        target = await self._target(connection, str(rest), None)
        if target is None:
            return True
        if not stat.S_ISDIR(target[1].st_mode):
            connection.response("501", "MLSD needs a directory.")
            return True

        async def lines() -> AsyncIterator[str]:
            async for path, st in self._entries(connection, *target):
                yield await self._mlsx_line(connection, path, st, path.name)

        await self._send_lines(connection, "MLSD", lines, "MLSD listing")
        return True

    @checks(LOGGED_IN, aioftp.PathPermissions(aioftp.PathPermissions.readable))
    async def mlst(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        real_path, virtual_path = self.get_paths(connection, rest)
        st = await self.stat_or_none(self.session(connection), real_path)
        if st is None:
            connection.response(*NOT_FOUND)
            return True
        line = await self._mlsx_line(connection, real_path, st, str(virtual_path))
        connection.response("250", ["Listing " + str(virtual_path), line, "End"], True)
        return True
