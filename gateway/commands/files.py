"""PWD, MKD, DELE, RNTO, SIZE, MDTM and MFMT (aioftp's CWD, CDUP, RMD and RNFR are used as they are). DELE and
RNTO count what they remove in the user's usage (``gateway.quota``)."""

from __future__ import annotations

import stat
from pathlib import PurePosixPath

import aioftp

from gateway.commands.base import LOGGED_IN, CommandBase, checks, mlsx_time, parse_time_val, quote_path
from gateway.session import SessionState


class FileCommands(CommandBase):
    NEW_COMMANDS = {"size": "size", "mdtm": "mdtm", "mfmt": "mfmt"}

    def features(self, session: SessionState) -> list[str]:
        return [*super().features(session), "MDTM", "MFMT", "SIZE", "TVFS"]

    @checks(LOGGED_IN)
    async def pwd(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        connection.response("257", f"{quote_path(connection.current_directory)} is the current directory.")
        return True

    @checks(
        aioftp.ConnectionConditions(aioftp.ConnectionConditions.login_required),
        aioftp.PathConditions(aioftp.PathConditions.path_must_not_exists),
        aioftp.PathPermissions(aioftp.PathPermissions.writable),
    )
    async def mkd(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        # Unlike aioftp, no parents are made: MKD a/b/c needs a/b (as in RFC 959 servers such as vsftpd).
        real_path, virtual_path = self.get_paths(connection, rest)
        await self.session(connection).path_io.mkdir(real_path)
        connection.response("257", f"{quote_path(virtual_path)} created.")
        return True

    @checks(LOGGED_IN, aioftp.PathPermissions(aioftp.PathPermissions.writable))
    async def dele(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        # aioftp's asks exists, then is_file; one stat gives that and the size the usage loses.
        # The stat, the delete and the count are one critical section: of two sessions deleting a file at once, the
        # second finds nothing (on S3 its delete would succeed all the same, and count the file twice).
        session = self.session(connection)
        real_path, virtual_path = self.get_paths(connection, rest)
        async with self.quotas.changing(connection.user, real_path):
            session.path_io.forget_listed()
            st = await self.regular_file(connection, real_path)
            if st is not None:
                await session.path_io.unlink(real_path)
                await self.quotas.record(connection.user, -st.st_size, -1, f"delete of {virtual_path}")
                connection.response("250", "File deleted.")
        return True

    @checks(
        aioftp.ConnectionConditions(
            aioftp.ConnectionConditions.login_required,
            aioftp.ConnectionConditions.rename_from_required,
        ),
        aioftp.PathPermissions(aioftp.PathPermissions.writable),
    )
    async def rnto(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        # Unlike aioftp, an existing *file* is replaced, as on a Unix rename and in vsftpd: clients upload to a
        # temporary name and rename over the old file (its size leaves the usage). A directory is never replaced.
        session = self.session(connection)
        real_path, virtual_path = self.get_paths(connection, rest)
        source = connection.rename_from
        del connection.rename_from
        path_io = session.path_io
        if real_path == source:
            connection.response("250", "Rename successful (same name).")
            return True
        # Source and target locked as DELE locks its file: a rename over a file counts it once, and two renames of
        # one file at once (on S3 a copy and a delete each) do not both copy it.
        async with self.quotas.changing(connection.user, source, real_path):
            path_io.forget_listed()
            target = await self.stat_or_none(session, real_path)
            if target is not None and stat.S_ISDIR(target.st_mode):
                connection.response("550", "Destination is a directory.")
            elif target is not None and await path_io.is_dir(source):
                connection.response("550", "Destination exists.")
            elif real_path.is_relative_to(source):
                connection.response("550", "Cannot move a directory into itself.")
            else:
                await path_io.rename(source, real_path)
                if target is not None:
                    await self.quotas.record(connection.user, -target.st_size, -1, f"rename over {virtual_path}")
                connection.response("250", "Rename successful.")
        return True

    @checks(LOGGED_IN, aioftp.PathPermissions(aioftp.PathPermissions.readable))
    async def size(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        if self.session(connection).ascii:
            # The size on the wire would differ from the stored one (vsftpd refuses it as well).
            connection.response("550", "SIZE is not available in ASCII mode; use TYPE I.")
            return True
        st = await self.regular_file(connection, self.get_paths(connection, rest)[0])
        if st is not None:
            connection.response("213", str(st.st_size))
        return True

    async def mdtm(self, connection: aioftp.Connection, rest: str) -> bool:
        # "MDTM YYYYMMDDHHMMSS path" sets the time (vsftpd, Pure-FTPd and the clients that use them), unless
        # the whole argument names an existing file (a file may be called "20240101000000 x").
        when, _, path = rest.partition(" ")
        mtime = parse_time_val(when)
        if mtime is not None and path:
            real_path, _ = self.get_paths(connection, rest)
            if not await self.session(connection).path_io.exists(real_path):
                return await self.set_mtime(connection, path, mtime, "213", f"Modify={when}; {path}")
        return await self._mdtm(connection, rest)

    @checks(aioftp.PathPermissions(aioftp.PathPermissions.readable))
    async def _mdtm(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        st = await self.regular_file(connection, self.get_paths(connection, rest)[0])
        if st is not None:
            connection.response("213", mlsx_time(st.st_mtime))
        return True

    async def mfmt(self, connection: aioftp.Connection, rest: str) -> bool:
        """MFMT YYYYMMDDHHMMSS[.sss] path (draft-somers-ftp-mfxx): set a file's modification time."""
        when, _, path = rest.partition(" ")
        mtime = parse_time_val(when)
        if mtime is None or not path:
            connection.response("501", "Syntax: MFMT YYYYMMDDHHMMSS path (UTC, years 1970 to 2106).")
            return True
        return await self.set_mtime(connection, path, mtime, "213", f"Modify={when}; {path}")
