"""PASV and EPSV (passive), PORT and EPRT (active): the commands that set up the next transfer's data connection
(``gateway.datachannel`` makes it, and releases it after the transfer).

``EPSV 1``/``EPSV 2`` and ``EPSV ALL`` are understood (RFC 2428). Active mode goes only to the client's own address
and to a port of 1024 or more (RFC 2577: no FTP bounce).
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import PurePosixPath

import aioftp

from gateway.commands.base import LOGGED_IN, CommandBase, checks
from gateway.datachannel import plain_ip
from gateway.session import SessionState

logger = logging.getLogger(__name__)


def parse_port(rest: str) -> tuple[str, int]:
    """``h1,h2,h3,h4,p1,p2`` (RFC 959) to ``("h1.h2.h3.h4", p1 * 256 + p2)``; ValueError if malformed."""
    numbers = [int(part) for part in rest.split(",")]
    if len(numbers) != 6 or not all(0 <= n <= 255 for n in numbers):
        raise ValueError(rest)
    return ".".join(map(str, numbers[:4])), numbers[4] * 256 + numbers[5]


def parse_eprt(rest: str) -> tuple[str, str, int]:
    """``|1|132.235.1.2|6275|`` (RFC 2428) to ``("1", "132.235.1.2", 6275)``; ValueError if malformed."""
    if len(rest) < 7:
        raise ValueError(rest)
    delimiter = rest[0]
    parts = rest.split(delimiter)
    if len(parts) != 5 or parts[0] or parts[4]:
        raise ValueError(rest)
    protocol, host, port = parts[1], parts[2], int(parts[3])
    if not 0 < port < 65536:
        raise ValueError(rest)
    ipaddress.ip_address(host)
    return protocol, host, port


class DataChannelCommands(CommandBase):
    NEW_COMMANDS = {"port": "port", "eprt": "eprt"}

    def features(self, session: SessionState) -> list[str]:
        return [*super().features(session), "EPRT", "EPSV", "PASV"]

    # -- passive -----------------------------------------------------------------------------------------

    async def _listen(self, connection: aioftp.Connection, session: SessionState) -> int | None:
        """The port the session's passive listener has; None, after a 425, if no port is free."""
        port = await session.data.listen()
        if port is None:
            logger.warning("no passive port free in %s", self.settings.passive.ports)
            connection.response("425", "No data port free; try again shortly.")
        return port

    @checks(LOGGED_IN)
    async def pasv(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        session = self.session(connection)
        if session.data.epsv_all:
            connection.response("522", "EPSV ALL was sent: use EPSV.")
            return True
        server_ip = plain_ip(connection.server_host)
        if server_ip.version != 4:
            connection.response("522", "PASV is for IPv4; use EPSV.")
            return True
        port = await self._listen(connection, session)
        if port is None:
            return True
        masquerade = self.settings.passive.masquerade_address
        numbers = [*str(masquerade or server_ip).split("."), str(port >> 8), str(port & 0xFF)]
        connection.response("227", f"Entering Passive Mode ({','.join(numbers)}).")
        return True

    @checks(LOGGED_IN)
    async def epsv(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        session = self.session(connection)
        argument = str(rest).strip().upper()
        family = "1" if plain_ip(connection.server_host).version == 4 else "2"
        if argument == "ALL":
            session.data.epsv_all = True
            connection.response("200", "EPSV ALL ok: only EPSV from now on.")
            return True
        if argument not in ("", family):
            if argument in ("1", "2"):
                connection.response("522", f"Network protocol not supported, use ({family}).")
            else:
                connection.response("501", f"EPSV takes 1, 2 or ALL, not {rest!r}.")
            return True
        port = await self._listen(connection, session)
        if port is not None:
            connection.response("229", f"Entering Extended Passive Mode (|||{port}|).")
        return True

    # -- active ------------------------------------------------------------------------------------------

    def _accept_active(self, connection: aioftp.Connection, host: str, port: int) -> bool:
        """RFC 2577: only to the client itself, and not to a privileged port (no FTP bounce)."""
        session = self.session(connection)
        if session.data.epsv_all:
            connection.response("522", "EPSV ALL was sent: use EPSV.")
            return False
        if plain_ip(host) != session.data.client_ip or port < 1024:
            logger.warning("active mode to %s:%s refused (client is %s)", host, port, session.data.client_ip)
            connection.response("504", "Only your own address and a port of 1024 or more are accepted.")
            return False
        session.data.use_active(host, port)
        return True

    @checks(LOGGED_IN)
    async def port(self, connection: aioftp.Connection, rest: str) -> bool:
        try:
            host, port = parse_port(rest)
        except ValueError:
            connection.response("501", "PORT needs h1,h2,h3,h4,p1,p2.")
            return True
        if self._accept_active(connection, host, port):
            connection.response("200", "PORT command successful.")
        return True

    @checks(LOGGED_IN)
    async def eprt(self, connection: aioftp.Connection, rest: str) -> bool:
        try:
            protocol, host, port = parse_eprt(rest)
        except ValueError:
            connection.response("501", "EPRT needs |protocol|address|port|.")
            return True
        if protocol not in ("1", "2") or plain_ip(host).version != int(protocol) * 2 + 2:
            connection.response("522", "Network protocol not supported, use (1,2).")
            return True
        if self._accept_active(connection, host, port):
            connection.response("200", "EPRT command successful.")
        return True
