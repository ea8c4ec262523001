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
