"""Every use of a private name of aioftp or asyncio, in one place, each with why it is needed.

``tests/test_aioftp_compat.py`` checks each of them, and the behaviour of aioftp the gateway builds on, against
the installed releases, so an upgrade that changes them fails there first, by name. aioftp is pinned to one
minor release in ``pyproject.toml`` for the same reason.

What the gateway no longer touches, because it has its own: the passive port pool (aioftp's
``available_data_ports`` and ``_start_passive_server``: ``gateway.datachannel.PassivePorts``), the map of sessions
(aioftp's ``connections``: ``GatewayServer.sessions``), and the per-user throttles (aioftp's ``throttle_per_user``,
never pruned: ``GatewayServer.user_throttles``, weakly keyed).

Public names of aioftp that its ``__all__`` does not list are imported where they are used:
``aioftp.pathio.universal_exception``, ``defend_file_methods`` and ``AsyncPathIOContext`` (the path-io contract),
``aioftp.common.ThrottleStreamIO`` and ``AbstractAsyncLister``, ``aioftp.server.worker``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable


def buffered(reader: asyncio.StreamReader) -> bytes | bytearray:
    """What a StreamReader has received but not handed out yet. asyncio offers no way to look without taking
    (``read`` would wait when there is nothing): the killed-client check asks whether commands are waiting on the
    control connection, and the pump whether a socket can be handed to a thread (a reader it cannot look into is
    not one asyncio made)."""
    data: bytes | bytearray | None = getattr(reader, "_buffer", None)
    return b"" if data is None else data


def has_buffer(reader: asyncio.StreamReader) -> bool:
    """Is this asyncio's own StreamReader, whose buffer :func:`take_buffered` can take?"""
    return isinstance(getattr(reader, "_buffer", None), bytearray)


def take_buffered(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Take what the reader holds, and whether the peer's end of data came with it: the pump reads the socket
    itself from then on (in a worker thread), so the bytes asyncio read ahead of the pause must come first."""
    data: bytearray = getattr(reader, "_buffer")  # noqa: B009 - a private name, on purpose (see above)
    at_eof = bool(getattr(reader, "_eof"))  # noqa: B009
    taken = bytes(data)
    data.clear()
    return taken, at_eof


async def wait_for_data(reader: asyncio.StreamReader) -> None:
    """Wait until the reader holds at least a byte, or the end of data, without taking anything: PROXY protocol's
    optional header (``proxy_protocol.required = false``) is looked for in the first bytes and, when there is
    none, they belong to the session."""
    if buffered(reader) or reader.at_eof():
        return
    await getattr(reader, "_wait_for_data")("proxy_protocol")  # noqa: B009 - private, on purpose (see above)


async def start_tls(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    context: ssl.SSLContext,
    *,
    handshake_timeout: float,
    early: bool,
) -> bytes:
    """Make the connection TLS in place, this side the server (FTPS: the server is the TLS server of the control
    and of every data connection, active ones included, which ``StreamWriter.start_tls`` would make the client).
    The reader and writer stay the same objects (sessions are keyed by the writer) and speak TLS afterwards.

    Bytes the reader already holds come before the upgrade: with ``early`` they are the client's first TLS bytes (a
    data connection's ClientHello, read while the transfer was being set up, or after a PROXY header) and are
    handed to the TLS layer before anything else is read from the socket; otherwise (the control connection after
    AUTH) they are plaintext sent before the handshake, which must never count as protected, and are returned for
    the caller to drop (the STARTTLS command injection, CVE-2011-0411).

    Private names: the StreamWriter's ``_transport`` and the protocol's ``_replace_writer`` (what Python 3.11's
    ``StreamWriter.start_tls``, which only does the client side here, sets). The StreamReader keeps pausing the TCP
    transport for its flow control, on purpose: unread bytes then wait in the kernel, not undecrypted in the TLS
    layer (paused there, uploads were seen to lose their end under uvloop). Feeding early bytes relies on
    ``loop.start_tls`` (asyncio's and uvloop's alike) swapping in its TLS protocol, a ``BufferedProtocol``, in its
    first step, before any read.
    """
    loop = asyncio.get_running_loop()
    transport = writer.transport
    transport.pause_reading()  # type: ignore[attr-defined]
    first, _ = take_buffered(reader)
    protocol = transport.get_protocol()
    upgrade = asyncio.ensure_future(
        loop.start_tls(
            transport,
            protocol,
            context,
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,
        )
    )
    try:
        if early and first:
            await asyncio.sleep(0)  # the upgrade's first step runs: the TLS protocol is in place, nothing read yet
            tls_protocol = transport.get_protocol()
            # uvloop's TLS protocol is a BufferedProtocol in behaviour, not by class.
            if tls_protocol is protocol or not hasattr(tls_protocol, "buffer_updated"):
                raise ConnectionError("TLS upgrade did not start")
            view = memoryview(first)
            while view:
                buffer = memoryview(tls_protocol.get_buffer(len(view)))  # type: ignore[attr-defined]
                count = min(len(buffer), len(view))
                buffer[:count] = view[:count]
                tls_protocol.buffer_updated(count)
                view = view[count:]
        new_transport = await upgrade
    except BaseException:
        upgrade.cancel()
        transport.close()
        raise
    if new_transport is None:
        raise ConnectionError("TLS upgrade failed: the connection closed")
    setattr(writer, "_transport", new_transport)  # noqa: B010 - private, on purpose (see above)
    replace_writer = getattr(protocol, "_replace_writer", None)
    if replace_writer is not None:
        replace_writer(writer)
    return b"" if early else first


def ended_before_reset(reader: asyncio.StreamReader) -> bytes | None:
    """After a reset on a data connection: what the reader still holds if the peer had ended its data first (its
    TLS close_notify or FIN came before the reset), else None (the data was cut short).

    A TLS 1.3 server sends session tickets after the handshake; a client that only uploads never reads them, and
    a socket closed with unread bytes sends a reset instead of a FIN (curl and lftp do this). asyncio then hands
    the reset to the reader, whose ``read`` raises it before returning what it holds: the last block of a complete
    upload. Private names: the reader's ``_buffer`` and ``_eof`` (through :func:`take_buffered`).
    """
    if not getattr(reader, "_eof", False):
        return None
    data, _ = take_buffered(reader)
    return data


def defer_close(writer: asyncio.StreamWriter) -> Callable[[], None]:
    """Make ``writer.close()`` a half-close, and return the real close for later.

    aioftp's dispatcher ends every session with ``stream.close()``, which closes the control connection's writer at
    once. A socket closed while the client's input is still unread (a client that pipelined commands past QUIT, or
    past its third wrong password) makes the kernel send RST instead of FIN, and the client's kernel then drops the
    221 or 421 reply it had not read yet. Here that close only sends FIN after the last reply (``write_eof``) and
    leaves the reading side open: the caller drops what still comes (``server.linger``), then calls the real close.
    """
    real_close = writer.close

    def half_close() -> None:
        if writer.is_closing() or not writer.can_write_eof():
            real_close()
            return
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            real_close()

    writer.close = half_close  # type: ignore[method-assign]
    return real_close
