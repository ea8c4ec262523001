"""Data connections (RFC 959 3.2), from PASV/EPSV/PORT/EPRT to the end of the transfer, and the bytes on them.

Unlike aioftp's:
* a passive port accepts its data connection only from the client's own IP (anyone who guessed the port could
  otherwise read or write the transfer), and goes back to the server's pool when the transfer ends, so a range
  of 20 ports serves any number of sessions whose transfers do not overlap (aioftp keeps a port per session);
* when no passive port is free the client gets 425 and keeps its session (aioftp answers 421 and hangs up);
* active mode connects from an unprivileged port of the address the client talks to (the PORT/EPRT handlers
  accept only the client's own address and ports of 1024 or more: RFC 2577, no FTP bounce);
* reads and writes are bounded with ``asyncio.timeout``, not ``asyncio.wait_for`` (see :func:`receive`).

A transfer worker calls :meth:`DataChannel.connect` for its connection and the server calls
:meth:`DataChannel.release` when the worker ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

from aioftp.common import StreamThrottle, ThrottleStreamIO

from gateway import aioftp_compat
from gateway.errors import DataConnectionError, NoDataConnection, SessionNotResumed
from gateway.proxy_protocol import ProxyHeaderError, ProxyPolicy
from gateway.tls import without_tickets

logger = logging.getLogger(__name__)
# Hands a data connection to the session waiting on its port, with the client address it came from (the
# peer's, or the one its PROXY header carried).
Deliver = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], None]


class Listener(Protocol):
    def close(self) -> None: ...


class Ports(Protocol):
    """Where a session's passive port comes from: :class:`PassivePorts` (one replica) or
    ``gateway.cluster.ClusterPorts`` (several, sharing the range through Redis)."""

    @property
    def in_use(self) -> int: ...

    async def open(self, host: str, client_ip: str, deliver: Deliver) -> tuple[int, Listener] | None: ...

    def give_back(self, port: int) -> None: ...


def plain_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as compared here: an IPv4-mapped IPv6 address is its IPv4 address."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def peer_of(writer: asyncio.StreamWriter) -> tuple[str, int]:
    peer = writer.get_extra_info("peername")
    return (peer[0], peer[1]) if peer else ("", 0)


async def client_or_close(
    policy: ProxyPolicy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, what: str
) -> tuple[str, int] | None:
    """The client address of a connection (through its PROXY header when the peer is trusted), or None (logged)
    when a header was due and did not come: the caller refuses the connection."""
    peer = peer_of(writer)
    try:
        return await policy.client_of(reader, peer)
    except ProxyHeaderError as exc:
        logger.warning("%s from %s refused: %s", what, peer[0], exc)
        return None


class PassivePorts:
    """A server's passive range, shared by its sessions: a port is taken for one transfer and given back when it
    ends. A port another program holds is skipped, and tried again later. ``policy``: PROXY protocol on the
    passive ports (None: off, and the accept path stays synchronous)."""

    def __init__(self, ports: range, policy: ProxyPolicy | None = None) -> None:
        self._free = collections.deque(ports)
        self._size = len(ports)
        self._policy = policy

    @property
    def in_use(self) -> int:
        return self._size - len(self._free)

    async def open(self, host: str, client_ip: str, deliver: Deliver) -> tuple[int, Listener] | None:
        """A listener on a free port of the range, or None when every port is taken."""
        accept = self._accepter(deliver)
        for _ in range(len(self._free)):
            port = self._free.popleft()
            try:
                listener = await asyncio.start_server(accept, host, port)
            except OSError as exc:
                self._free.append(port)
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            return port, listener
        return None

    def _accepter(
        self, deliver: Deliver
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]:
        policy = self._policy
        if policy is None:

            def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                deliver(reader, writer, peer_of(writer)[0])

            return accept

        async def accept_proxied(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            client = await client_or_close(policy, reader, writer, "data connection")
            if client is None:
                writer.close()
            else:
                deliver(reader, writer, client[0])

        return accept_proxied

    def give_back(self, port: int) -> None:
        self._free.append(port)


class DataChannel:
    """One session's data channel: the passive listener or the active address set by PASV, EPSV, PORT or EPRT,
    and the connection made for the next transfer."""

    # Every session has one, idle ones too: no per-object __dict__.
    __slots__ = (
        "_ports",
        "client_ip",
        "server_host",
        "_connect_timeout",
        "_socket_timeout",
        "epsv_all",
        "mode",
        "_port",
        "_listener",
        "_accepted",
        "_active",
        "tls",
        "tls_reuse",
        "tls_session_id",
    )

    def __init__(
        self,
        ports: Ports,
        *,
        client_host: str,
        server_host: str,
        connect_timeout: float,
        socket_timeout: float | None,
    ) -> None:
        self._ports = ports
        self.client_ip = plain_ip(client_host)
        self.server_host = server_host
        self._connect_timeout = connect_timeout
        self._socket_timeout = socket_timeout
        # EPSV ALL (RFC 2428): from then on only EPSV sets up data connections.
        self.epsv_all = False
        self.mode: Literal["passive", "active"] | None = None
        self._port: int | None = None
        self._listener: Listener | None = None
        # The connection the client made to the passive port, for the next transfer.
        self._accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        self._active: tuple[str, int] | None = None
        # PROT P (RFC 4217): data connections are TLS with this context (the control connection's), and must
        # resume its session when ``tls_reuse``. None: PROT C, plain.
        self.tls: ssl.SSLContext | None = None
        self.tls_reuse = True
        # The control connection's TLS session id, which a resumed data connection carries (the server issues no
        # stateless tickets, so every session has one in its cache: ``gateway.tls``); None: the control connection
        # reported none, and then only a resumption is required.
        self.tls_session_id: bytes | None = None

    @property
    def ready(self) -> bool:
        """PASV, EPSV, PORT or EPRT was sent for the next transfer."""
        return self.mode is not None

    async def listen(self) -> int | None:
        """PASV/EPSV: the port to announce, or None when no port is free. A second PASV keeps the port but drops
        a connection made after the first: it belongs to no transfer."""
        if self._listener is None:
            self.release()
            opened = await self._ports.open(self.server_host, str(self.client_ip), self.deliver)
            if opened is None:
                return None
            self._port, self._listener = opened
        self._drop_accepted()
        self._accepted = asyncio.get_running_loop().create_future()
        self.mode = "passive"
        return self._port

    def deliver(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client_host: str) -> None:
        """A connection to this session's passive port, from ``client_host`` (as its PROXY header said, if any)."""
        if self._accepted is None or self._accepted.done():
            writer.close()  # no transfer waits for it, or one connection came already
        elif not client_host or plain_ip(client_host) != self.client_ip:
            logger.warning("data connection from %s refused: the session's client is %s", client_host, self.client_ip)
            writer.close()
        else:
            self._accepted.set_result((reader, writer))

    def use_active(self, host: str, port: int) -> None:
        """PORT/EPRT (already checked against the client's address): connect there for the next transfer."""
        self.release()
        self._active = (host, port)
        self.mode = "active"

    async def connect(self, throttles: dict[str, StreamThrottle]) -> ThrottleStreamIO:
        """This transfer's data connection, throttled by ``throttles``: the one the client made to the passive
        port, or one opened to its active address. :class:`NoDataConnection` (425) when none comes within the
        data-connection timeout."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await self._connection()
                if self.tls is not None:
                    await self._secure(reader, writer, self.tls)
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, NoDataConnection):
                raise
            raise NoDataConnection(f"no data connection ({self.mode or 'no PASV/PORT'}): {exc!r}") from exc
        return ThrottleStreamIO(reader, writer, throttles=throttles, timeout=self._socket_timeout)

    async def _secure(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
    ) -> None:
        """PROT P: this side is the TLS server (active connections too), and the client must resume the control
        connection's session (``tls.session_reuse``): a session is only known to who holds the control
        connection, so a stranger who connected to the passive port first gets nothing; where the control
        connection's session id is known it must be that one, not another session of the same server."""
        with without_tickets():  # the client would not read them (see ``gateway.tls.ServerContext``)
            await aioftp_compat.start_tls(reader, writer, context, handshake_timeout=self._connect_timeout, early=True)
        if self.tls_reuse and not resumes(writer.get_extra_info("ssl_object"), self.tls_session_id):
            writer.close()
            logger.warning("TLS data connection refused: it did not resume the control connection's TLS session")
            raise SessionNotResumed("the data connection did not resume the control connection's TLS session")

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.mode == "passive" and self._accepted is not None:
            # Shielded: an ABOR while waiting leaves the future to release(), which closes a late connection.
            connection = await asyncio.shield(self._accepted)
            self._accepted = None
            return connection
        if self.mode == "active" and self._active is not None:
            host, port = self._active
            try:
                return await asyncio.open_connection(host, port, local_addr=(self.server_host, 0))
            except OSError as exc:
                logger.warning("active data connection to %s:%s failed: %r", host, port, exc)
                raise
        raise OSError(errno.ENOTCONN, "no PASV, EPSV, PORT or EPRT before the transfer")

    def release(self) -> None:
        """The transfer is over (or the session): close the listener and give its port back, drop a connection
        no transfer took, forget an active address. The next transfer needs PASV, EPSV, PORT or EPRT again."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._port is not None:
            self._ports.give_back(self._port)
            self._port = None
        self._drop_accepted()
        self._accepted = None
        self._active = None
        self.mode = None

    def _drop_accepted(self) -> None:
        if self._accepted is None:
            return
        if self._accepted.done() and not self._accepted.cancelled():
            _, writer = self._accepted.result()
            writer.close()
        else:
            self._accepted.cancel()


def resumes(ssl_object: ssl.SSLObject | None, session_id: bytes | None) -> bool:
    """Did this TLS connection resume a session, and the one with ``session_id`` if it is known?"""
    if ssl_object is None or not ssl_object.session_reused:
        return False
    if session_id is None:
        return True
    session = ssl_object.session
    return session is not None and session.id == session_id


# -- the bytes on a data connection ---------------------------------------------------------------------------


async def receive(stream: ThrottleStreamIO, count: int) -> bytes:
    """``stream.read(count)``, throttled as aioftp does, but bounded with ``asyncio.timeout``: aioftp's
    ``wait_for`` on Python 3.11 can swallow the cancellation of an ABOR when data arrives at the same moment,
    and it costs a task per read."""
    await stream.wait("read")
    start = asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout(stream.read_timeout):
            data = await stream.reader.read(count)
    except (OSError, asyncio.IncompleteReadError) as exc:
        tail = aioftp_compat.ended_before_reset(stream.reader) if isinstance(exc, ConnectionResetError) else None
        if tail is None:
            raise DataConnectionError(f"data connection failed: {exc!r}") from exc
        data = tail  # the data had ended before the reset (see ``ended_before_reset``); the next read gives b""
    stream.append("read", data, start)
    return data


async def send(stream: ThrottleStreamIO, data: bytes) -> None:
    """``stream.write(data)`` with the same changes as :func:`receive`."""
    await stream.wait("write")
    start = asyncio.get_running_loop().time()
    try:
        stream.writer.write(data)
        async with asyncio.timeout(stream.write_timeout):
            await stream.writer.drain()
    except OSError as exc:
        raise DataConnectionError(f"data connection failed: {exc!r}") from exc
    stream.append("write", data, start)


class BlockReceiver:
    """Reads a data connection in blocks of ``block_size``: a socket read returns at most what the kernel has
    (often 64 KiB), and storing fewer, larger blocks costs fewer thread hops or S3 requests."""

    def __init__(self, stream: ThrottleStreamIO, block_size: int) -> None:
        self.stream = stream
        self.block_size = block_size
        self.received = 0
        self._ended = False

    def __aiter__(self) -> BlockReceiver:
        return self

    async def __anext__(self) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while size < self.block_size and not self._ended:
            chunk = await receive(self.stream, self.block_size - size)
            if not chunk:
                self._ended = True
                break
            chunks.append(chunk)
            size += len(chunk)
        if not chunks:
            raise StopAsyncIteration
        self.received += size
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class AsciiConverter:
    """TYPE A: line endings of one transfer, fed block by block (a CR LF may straddle two blocks)."""

    def __init__(self) -> None:
        self._last = b""

    def to_network(self, data: bytes) -> bytes:
        """LF at rest -> CRLF on the wire; an existing CRLF stays as it is."""
        out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if data.startswith(b"\n") and self._last == b"\r":
            out = out[1:]
        self._last = data[-1:] or self._last
        return out

    def to_storage(self, data: bytes) -> bytes:
        """CRLF on the wire -> LF at rest; a CR that ends a block waits for the next one."""
        data = self._last + data
        self._last = b""
        if data.endswith(b"\r"):
            data, self._last = data[:-1], b"\r"
        return data.replace(b"\r\n", b"\n")

    def flush(self) -> bytes:
        """What is left at the end of an upload (a lone CR)."""
        left, self._last = self._last, b""
        return left
