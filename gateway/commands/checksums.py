"""HASH (draft-bryan-ftpext-hash) and the older XSHA256, XSHA1, XMD5 and XCRC: a file's digest over the
control connection, so a client can check a transfer without downloading the file again.

The storage computes the digest (``TransactionalPathIO.digest``): local disk reads the file in a worker
thread; S3 answers SHA-256 from what the upload stored and streams the object otherwise. ``OPTS HASH`` picks the
session's algorithm, which FEAT marks with ``*``.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import aioftp

from gateway.commands.base import CommandBase
from gateway.session import SessionState

# FTP name (IANA "Hash Function Textual Names") -> the storage's algorithm name.
ALGORITHMS = {"SHA-256": "sha256", "SHA-1": "sha1", "MD5": "md5", "CRC32": "crc32"}


def split_x_arguments(rest: str) -> tuple[str, list[str]]:
    """``XCRC "name with spaces" [start end]`` or ``XCRC name``: the path and any range words."""
    text = rest.strip()
    if text.startswith('"') and '"' in text[1:]:
        end = text.index('"', 1)
        return text[1:end], text[end + 1 :].split()
    words = text.rsplit(" ", 2)
    if len(words) == 3 and words[1].isdigit() and words[2].isdigit():
        return words[0], words[1:]
    return text, []


class ChecksumCommands(CommandBase):
    NEW_COMMANDS = {
        "hash": "hash",
        "rang": "rang",
        "xsha256": "xsha256",
        "xsha1": "xsha1",
        "xmd5": "xmd5",
        "xcrc": "xcrc",
    }

    def features(self, session: SessionState) -> list[str]:
        """Every algorithm, the one HASH uses now marked with ``*``."""
        line = "HASH " + ";".join(name + ("*" if name == session.hash_algorithm else "") for name in ALGORITHMS)
        return [*super().features(session), line]

    def option(self, connection: aioftp.Connection, session: SessionState, name: str, value: str) -> bool:
        """OPTS HASH [algorithm]: without one, name the algorithm in use; with one, switch to it."""
        if name != "HASH":
            return super().option(connection, session, name, value)
        algorithm = value.strip().upper()
        if not algorithm:
            connection.response("200", session.hash_algorithm)
        elif algorithm in ALGORITHMS:
            session.hash_algorithm = algorithm
            connection.response("200", algorithm)
        else:
            connection.response("501", f"Unknown algorithm {value.strip()!r}; the selection is unchanged.")
        return True

    async def _digest(
        self, connection: aioftp.Connection, path: str | PurePosixPath, name: str, not_a_file: str
    ) -> tuple[str, int] | None:
        """The digest and size of a file, or None after answering why not (``not_a_file``: the reply code
        for a directory, 553 for HASH as the draft says, 550 for the X commands)."""
        real_path, virtual_path = self.get_paths(connection, path)
        if not (await connection.user.get_permissions(virtual_path)).readable:
            connection.response("550", "Permission denied.")
            return None
        st = await self.regular_file(connection, real_path, not_a_file)
        if st is None:
            return None
        return await self.session(connection).path_io.digest(real_path, ALGORITHMS[name]), st.st_size

    async def hash(self, connection: aioftp.Connection, rest: str) -> bool:
        name = self.session(connection).hash_algorithm
        found = await self._digest(connection, rest, name, "553")
        if found is not None:
            digest, size = found
            connection.response("213", f"{name} 0-{size} {digest} {rest}")
        return True

    async def rang(self, connection: aioftp.Connection, rest: str) -> bool:
        connection.response("504", "RANG is not supported: HASH covers whole files.")
        return True

    async def xsha256(self, connection: aioftp.Connection, rest: str) -> bool:
        return await self._x_digest(connection, rest, "SHA-256")

    async def xsha1(self, connection: aioftp.Connection, rest: str) -> bool:
        return await self._x_digest(connection, rest, "SHA-1")

    async def xmd5(self, connection: aioftp.Connection, rest: str) -> bool:
        return await self._x_digest(connection, rest, "MD5")

    async def xcrc(self, connection: aioftp.Connection, rest: str) -> bool:
        return await self._x_digest(connection, rest, "CRC32")

    async def _x_digest(self, connection: aioftp.Connection, rest: str, name: str) -> bool:
        """The de-facto X commands (Serv-U, ProFTPD's mod_digest): ``250 <HEX DIGEST>``. A start and end
        offset may follow the path; only the whole file (0 and its size) is supported."""
        path, bounds = split_x_arguments(rest)
        if bounds and bounds[0] != "0":
            connection.response("504", "Only whole files can be hashed.")
            return True
        found = await self._digest(connection, path, name, "550")
        if found is not None:
            digest, size = found
            if bounds and int(bounds[1]) != size:
                connection.response("504", "Only whole files can be hashed.")
            else:
                connection.response("250", digest.upper())
        return True
