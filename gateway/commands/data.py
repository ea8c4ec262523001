"""Data connections: PASV and EPSV (passive), PORT and EPRT (active), and their release after each transfer.

Unlike aioftp's PASV/EPSV:
* a passive port accepts its data connection only from the client's own IP (anyone who guessed the port
  could otherwise read or write the transfer), and goes back to the pool when the transfer ends, so a range
  of 20 ports serves any number of sessions whose transfers do not overlap;
* when no passive port is free the client gets 425 and keeps its session (aioftp answers 421 and hangs up);
* ``EPSV 1``/``EPSV 2`` and ``EPSV ALL`` are understood (RFC 2428);
* active mode connects only to the client's own address and to a port of 1024 or more (RFC 2577: no FTP
  bounce), from an unprivileged source port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from pathlib import PurePosixPath

import aioftp

from gateway.commands.base import LOGGED_IN, CommandBase, attach_data_connection, checks, get, plain_ip

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

    # -- passive -----------------------------------------------------------------------------------------

    def _passive_handler(self, connection: aioftp.Connection) -> object:
        client = plain_ip(connection.client_host)

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")
            if get(connection, "data_channel") is None:
                writer.close()
            elif peer is None or plain_ip(peer[0]) != client:
                logger.warning("data connection from %s refused: the session's client is %s", peer, client)
                writer.close()
            else:
                attach_data_connection(connection, reader, writer)

        return accept

    async def _listen(self, connection: aioftp.Connection) -> socket.socket | None:
        """The session's passive listening socket, opened if needed; None (after a 425) if no port is free."""
        if get(connection, "passive_server") is None:
            self._release_data_channel(connection)
        elif connection.future.data_connection.done():
            # A second PASV: the connection made after the first one belongs to no transfer.
            connection.data_connection.close()
            del connection.data_connection
        if get(connection, "passive_server") is None:
            try:
                connection.passive_server = await self._start_passive_server(
                    connection,
                    self._passive_handler(connection),  # type: ignore[arg-type]
                )
            except aioftp.errors.NoAvailablePort:
                logger.warning("no passive port free in %s", self.settings.passive.ports)
                connection.response("425", "No data port free; try again shortly.")
                return None
        connection.data_channel = "passive"
        sockets: list[socket.socket] = list(connection.passive_server.sockets)
        return sockets[0]

    @checks(LOGGED_IN)
    async def pasv(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        if get(connection, "epsv_all"):
            connection.response("522", "EPSV ALL was sent: use EPSV.")
            return True
        if plain_ip(connection.server_host).version != 4:
            connection.response("522", "PASV is for IPv4; use EPSV.")
            return True
        listener = await self._listen(connection)
        if listener is None:
            return True
        host, port = listener.getsockname()[:2]
        masquerade = self.ipv4_pasv_forced_response_address
        numbers = [*str(masquerade or plain_ip(host)).split("."), str(port >> 8), str(port & 0xFF)]
        connection.response("227", f"Entering Passive Mode ({','.join(numbers)}).")
        return True

    @checks(LOGGED_IN)
    async def epsv(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        argument = str(rest).strip().upper()
        family = "1" if plain_ip(connection.server_host).version == 4 else "2"
        if argument == "ALL":
            connection.epsv_all = True
            connection.response("200", "EPSV ALL ok: only EPSV from now on.")
            return True
        if argument not in ("", family):
            if argument in ("1", "2"):
                connection.response("522", f"Network protocol not supported, use ({family}).")
            else:
                connection.response("501", f"EPSV takes 1, 2 or ALL, not {rest!r}.")
            return True
        listener = await self._listen(connection)
        if listener is None:
            return True
        port = listener.getsockname()[1]
        connection.response("229", f"Entering Extended Passive Mode (|||{port}|).")
        return True

    # -- active ------------------------------------------------------------------------------------------

    def _accept_active(self, connection: aioftp.Connection, host: str, port: int) -> bool:
        """RFC 2577: only to the client itself, and not to a privileged port (no FTP bounce)."""
        if get(connection, "epsv_all"):
            connection.response("522", "EPSV ALL was sent: use EPSV.")
            return False
        if plain_ip(host) != plain_ip(connection.client_host) or port < 1024:
            logger.warning("active mode to %s:%s refused (client is %s)", host, port, connection.client_host)
            connection.response("504", "Only your own address and a port of 1024 or more are accepted.")
            return False
        self._release_data_channel(connection)
        connection.active_address = (host, port)
        connection.data_channel = "active"
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
