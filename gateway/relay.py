"""Splicing a data connection to the replica that holds its session: bytes both ways, inside the kernel.

Each direction runs in a thread of its own with blocking ``os.splice`` (socket -> pipe -> socket): the bytes never
cross into Python, back-pressure is the kernel's (a full socket buffer blocks the splice that feeds it), and the
event loop only waits. The end of one direction is passed on as it came (``shutdown(SHUT_WR)``: an upload ends by
the client's FIN, and the owner must see exactly that), and the other direction then has the data connection's
idle timeout to end too. An error on either side, or a cancellation (the server stopping), shuts both sockets
down, which ends the blocked calls at once. A write that makes no progress for the idle timeout fails
(``SO_SNDTIMEO``): a client that stops reading a download, or vanishes without a FIN or RST, would otherwise hold
its thread until the kernel gives the connection up (TCP retransmission, about 15 minutes). Reads get no such
bound: one direction of a transfer is silent for all of it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

from gateway.pump import F_SETPIPE_SZ

PIPE_SIZE = 1 << 20


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _one_way(src: socket.socket, dst: socket.socket, first: bytes) -> int:
    """Copy ``src`` to ``dst`` until ``src`` ends, then end ``dst``'s sending side; returns the byte count."""
    if first:
        dst.sendall(first)
    read_end, write_end = os.pipe()
    try:
        try:
            fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default size works, with more calls
        total = len(first)
        while count := os.splice(src.fileno(), write_end, PIPE_SIZE):
            left = count
            while left:
                left -= os.splice(read_end, dst.fileno(), left)
            total += count
        _shutdown(dst, socket.SHUT_WR)
        return total
    finally:
        os.close(read_end)
        os.close(write_end)


def _bound_writes(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


async def splice(
    executor: ThreadPoolExecutor, client: socket.socket, first: bytes, owner: socket.socket, idle: float | None
) -> int:
    """Relay between ``client`` (what it sent so far: ``first``) and ``owner`` until both directions end; both
    sockets are blocking and owned by the caller. Returns the bytes moved, both ways."""
    if idle is not None:
        _bound_writes(client, idle)
        _bound_writes(owner, idle)
    loop = asyncio.get_running_loop()
    up = loop.run_in_executor(executor, _one_way, client, owner, first)
    down = loop.run_in_executor(executor, _one_way, owner, client, b"")
    both = {up, down}
    try:
        done, pending = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        if any(future.exception() is not None for future in done):
            pending = both  # a side failed: end the other at once
        elif pending:
            _, pending = await asyncio.wait(pending, timeout=idle)
        if pending:
            _shutdown(client, socket.SHUT_RDWR)
            _shutdown(owner, socket.SHUT_RDWR)
            await asyncio.wait(pending)
    except BaseException:
        _shutdown(client, socket.SHUT_RDWR)
        _shutdown(owner, socket.SHUT_RDWR)
        await asyncio.wait(both)
        raise
    return sum(future.result() for future in both if future.exception() is None)
