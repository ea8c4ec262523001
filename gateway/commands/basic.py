"""The rest of RFC 959 that clients send: TYPE, MODE, STRU, ALLO, HELP, SITE, NOOP, CLNT, the X* aliases of
RFC 775, and FEAT and OPTS (RFC 2389), whose lines and options each handler group adds for itself."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath

import aioftp

from gateway.commands.base import LOGGED_IN, CommandBase, checks, parse_time_val
from gateway.session import SessionState

logger = logging.getLogger(__name__)

# Verbs that answer before login; every other one gets 530 until PASS succeeded.
PUBLIC_VERBS = frozenset(
    {"user", "pass", "quit", "feat", "help", "noop", "syst", "opts", "clnt", "auth", "pbsz", "prot", "ccc"}
)
# Verbs whose argument may not be empty (501 otherwise).
NEEDS_ARGUMENT = frozenset(
    {"user", "cwd", "xcwd", "mkd", "xmkd", "rmd", "xrmd", "dele", "retr", "stor", "appe", "rnfr", "rnto",
     "size", "mdtm", "mfmt", "rest", "type", "mode", "stru", "port", "eprt", "site", "opts",
     "hash", "xsha256", "xsha1", "xmd5", "xcrc"}
)  # fmt: skip
ALIASES = {"xmkd": "mkd", "xrmd": "rmd", "xpwd": "pwd", "xcup": "cdup", "xcwd": "cwd"}
SYNTAX = {
    "user": "USER <name>",
    "pass": "PASS <password>",
    "cwd": "CWD <directory>",
    "mkd": "MKD <directory>",
    "rmd": "RMD <directory>",
    "dele": "DELE <file>",
    "retr": "RETR <file>",
    "stor": "STOR <file>",
    "appe": "APPE <file>",
    "rest": "REST <byte offset>",
    "rnfr": "RNFR <path>",
    "rnto": "RNTO <path>",
    "list": "LIST [-options] [path]",
    "nlst": "NLST [-options] [path]",
    "mlsd": "MLSD [directory]",
    "mlst": "MLST [path]",
    "size": "SIZE <file>",
    "mdtm": "MDTM <file> | MDTM YYYYMMDDHHMMSS <file>",
    "mfmt": "MFMT YYYYMMDDHHMMSS[.sss] <path>",
    "hash": "HASH <file> (algorithm: OPTS HASH)",
    "xsha256": "XSHA256 <file>",
    "xsha1": "XSHA1 <file>",
    "xmd5": "XMD5 <file>",
    "xcrc": "XCRC <file>",
    "type": "TYPE {A|I|L 8}",
    "mode": "MODE S",
    "stru": "STRU F",
    "port": "PORT h1,h2,h3,h4,p1,p2",
    "eprt": "EPRT |protocol|address|port|",
    "epsv": "EPSV [1|2|ALL]",
    "opts": "OPTS UTF8 ON | OPTS MLST <facts> | OPTS HASH [SHA-256|SHA-1|MD5|CRC32]",
    "site": "SITE HELP | SITE CHMOD <mode> <path> | SITE UTIME YYYYMMDDHHMM[SS] <path>",
    "help": "HELP [command]",
    "stat": "STAT [path]",
    "stou": "STOU [name]",
}


class BasicCommands(CommandBase):
    NEW_COMMANDS = {
        "mode": "mode",
        "stru": "stru",
        "allo": "allo",
        "help": "help",
        "site": "site",
        "clnt": "clnt",
        "feat": "feat",
        "opts": "opts",
        "noop": "noop",
    }

    def features(self, session: SessionState) -> list[str]:
        return [*super().features(session), "UTF8"]

    def option(self, connection: aioftp.Connection, session: SessionState, name: str, value: str) -> bool:
        if name == "UTF8" and value.upper() in ("ON", ""):
            connection.response("200", "UTF-8 is always on.")
            return True
        return super().option(connection, session, name, value)

    async def feat(self, connection: aioftp.Connection, rest: str) -> bool:
        features = sorted(self.features(self.session(connection)))
        connection.response("211", ["Features:", *features, "End"], True)
        return True

    async def opts(self, connection: aioftp.Connection, rest: str) -> bool:
        option, _, value = rest.partition(" ")
        if not self.option(connection, self.session(connection), option.upper(), value):
            connection.response("501", f"Option {option.upper()!r} not understood.")
        return True

    async def noop(self, connection: aioftp.Connection, rest: str) -> bool:
        connection.response("200", "NOOP ok.")
        return True

    @checks(LOGGED_IN)
    async def type(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        words = str(rest).upper().split()
        session = self.session(connection)
        if words in (["I"], ["L", "8"]):
            session.transfer_type = "I"
            connection.response("200", "Switching to Binary mode.")
        elif words in (["A"], ["A", "N"]):
            session.transfer_type = "A"
            connection.response("200", "Switching to ASCII mode.")
        elif words and words[0] in ("A", "E", "I", "L"):
            connection.response("504", f"TYPE {' '.join(words)} is not implemented.")
        else:
            connection.response("501", f"TYPE {rest} is not a type.")
        return True

    async def mode(self, connection: aioftp.Connection, rest: str) -> bool:
        return self._only(connection, "MODE", rest, "S", "BC")

    async def stru(self, connection: aioftp.Connection, rest: str) -> bool:
        return self._only(connection, "STRU", rest, "F", "RP")

    @staticmethod
    def _only(connection: aioftp.Connection, verb: str, rest: str, supported: str, known: str) -> bool:
        value = rest.strip().upper()
        if value == supported:
            connection.response("200", f"{verb} set to {supported}.")
        elif len(value) == 1 and value in known:
            connection.response("504", f"{verb} {value} is not implemented; use {supported}.")
        else:
            connection.response("501", f"{verb} {rest} is not understood.")
        return True

    async def clnt(self, connection: aioftp.Connection, rest: str) -> bool:
        """CLNT (NcFTP and others say which client they are): noted in the log."""
        logger.info("client says it is %r", rest[:200])
        connection.response("200", "Noted.")
        return True

    async def allo(self, connection: aioftp.Connection, rest: str) -> bool:
        connection.response("202", "ALLO is not needed; storage is allocated as data arrives.")
        return True

    async def help(self, connection: aioftp.Connection, rest: str) -> bool:
        if rest.strip():
            verb = rest.split()[0].lower()
            if verb in self.commands_mapping and not verb.startswith(" "):
                syntax = SYNTAX.get(ALIASES.get(verb, verb), verb.upper())
                connection.response("214", f"Syntax: {syntax}")
            else:
                connection.response("502", f"Unknown command {rest.split()[0]!r}.")
            return True
        verbs = sorted(verb.upper() for verb in self.commands_mapping if not verb.startswith(" "))
        rows = [" ".join(f"{verb:<5}" for verb in verbs[start : start + 10]) for start in range(0, len(verbs), 10)]
        connection.response("214", ["The following commands are recognized:", *rows, "Help OK."], True)
        return True

    @checks(LOGGED_IN)
    async def site(self, connection: aioftp.Connection, rest: str) -> bool:
        words = rest.split(" ", 2)
        command = words[0].upper()
        if command == "HELP":
            connection.response("214", "SITE commands: CHMOD <mode> <path>, UTIME <time> <path>, HELP.")
        elif command == "CHMOD":
            await self._chmod(connection, words[1:])
        elif command == "UTIME":
            await self._utime(connection, rest.partition(" ")[2])
        else:
            connection.response("500", f"Unknown SITE command {words[0]!r}.")
        return True

    async def _utime(self, connection: aioftp.Connection, arguments: str) -> None:
        """SITE UTIME as ProFTPD's mod_site_misc has it: ``<YYYYMMDDhhmm[ss]> <path>`` or
        ``<path> <atime> <mtime> <ctime> UTC`` (NcFTP sends the latter). Only the modification time is kept."""
        when, _, path = arguments.partition(" ")
        words = arguments.rsplit(" ", 4)
        if len(words) == 5 and words[4].upper() == "UTC" and parse_time_val(words[2]) is not None:
            path, when = words[0], words[2]
        elif len(when) == 12 and when.isdigit():
            when += "00"
        mtime = parse_time_val(when)
        if mtime is None or not path:
            connection.response("501", "Syntax: SITE UTIME YYYYMMDDhhmm[ss] <path> (UTC, years 1970 to 2106).")
            return
        await self.set_mtime(connection, path, mtime, "200", "SITE UTIME command ok.")

    async def _chmod(self, connection: aioftp.Connection, arguments: list[str]) -> None:
        if len(arguments) != 2 or not arguments[1] or not all(c in "01234567" for c in arguments[0]):
            connection.response("501", "SITE CHMOD needs an octal mode and a path.")
            return
        mode = int(arguments[0], 8)
        if mode > 0o7777:
            connection.response("501", "SITE CHMOD needs an octal mode of at most 7777.")
            return
        real_path, virtual_path = self.get_paths(connection, arguments[1])
        path_io = self.session(connection).path_io
        if not (await connection.user.get_permissions(virtual_path)).writable:
            connection.response("550", "Permission denied.")
            return
        if not await path_io.exists(real_path):
            connection.response("550", "No such file or directory.")
            return
        await path_io.chmod(real_path, mode)  # a no-op where the storage has no modes (S3)
        connection.response("200", "SITE CHMOD command ok.")
