"""Bulk transfers between a data connection and a local file, in a worker thread with blocking system calls.

Through asyncio, each uploaded byte is copied four times in Python (socket to bytes, into the StreamReader's
buffer, out of it, joined into a block) on the one event-loop thread. vsftpd does ``recv`` + ``write`` and
``sendfile``. For a backend that can hand over a file descriptor (local disk), the pump does the same: it
borrows the data socket from its transport (reading paused, so the event loop has no interest in it), puts
it in blocking mode with kernel send/receive timeouts, and runs ``recv_into`` + ``write`` (uploads) or
``sendfile`` (downloads) in a worker thread. The event loop only waits; ABOR or a closed session shuts the
socket down, which ends the blocked call at once.

Transfers under a speed limit, and any transfer when all pump threads are busy, take the asyncio path.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import queue
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from aioftp.common import ThrottleStreamIO

from gateway import aioftp_compat
from gateway.errors import DataConnectionError, QuotaExceeded

T = TypeVar("T")
# Socket errors that mean the data connection is gone (or timed out), not that the file failed.
CONNECTION_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EAGAIN, errno.ENOTCONN}
SENDFILE_CHUNK = 1 << 30
IOV_MAX = 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class TransferPump:
    def __init__(self, threads: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ftp-transfer")
        self._free = threads

    def usable(self, stream: ThrottleStreamIO, direction: str) -> bool:
        """A thread is free, the transport is a plain socket (not TLS), and no speed limit applies."""
        if self._free <= 0 or stream.writer.transport.get_extra_info("sslcontext") is not None:
            return False
        if not aioftp_compat.has_buffer(stream.reader):
            return False
        return not any(getattr(throttle, direction).limit for throttle in stream.throttles.values())

    async def upload(
        self, stream: ThrottleStreamIO, fd: int, block_size: int, idle_seconds: float | None, room: int | None = None
    ) -> int:
        """Copy the data connection into ``fd`` until the client closes it; returns the byte count. More than
        ``room`` bytes (a quota) fail with QuotaExceeded, having taken at most one byte more from the socket."""
        cast(asyncio.Transport, stream.writer.transport).pause_reading()
        # What the transport read before the pause is in the StreamReader: it goes first.
        first, at_eof = aioftp_compat.take_buffered(stream.reader)
        limit = _Limit(room)
        return await self._run(
            stream, idle_seconds, lambda sock: _receive_into(sock, fd, first, at_eof, block_size, limit)
        )

    async def download(self, stream: ThrottleStreamIO, fd: int, offset: int, idle_seconds: float | None) -> int:
        """Send ``fd`` from ``offset`` to its end over the data connection; returns the byte count."""
        cast(asyncio.Transport, stream.writer.transport).pause_reading()
        return await self._run(stream, idle_seconds, lambda sock: _send_file(sock, fd, offset))

    async def send_blocks(
        self, stream: ThrottleStreamIO, blocks: AsyncIterator[list[bytes]], idle_seconds: float | None
    ) -> int:
        """Send blocks made on the event loop (say, read from S3) from a worker thread: the loop fetches the
        next block while the thread copies this one into the socket. At most two blocks wait in between.
        A block is a list of pieces, sent with one ``sendmsg`` rather than joined (a copy) first."""
        loop = asyncio.get_running_loop()
        handoff: queue.Queue[list[bytes] | None] = queue.Queue()
        room = asyncio.Semaphore(2)

        def sent_one() -> None:
            loop.call_soon_threadsafe(room.release)

        def consume(sock: socket.socket) -> int:
            total = 0
            while (block := handoff.get()) is not None:
                try:
                    total += _send_pieces(sock, block)
                except OSError as exc:
                    raise _connection_error(exc) from exc
                finally:
                    sent_one()
            return total

        cast(asyncio.Transport, stream.writer.transport).pause_reading()

        async def produce(consumer: asyncio.Future[int]) -> None:
            try:
                async for block in blocks:
                    await room.acquire()
                    if consumer.done():
                        return  # the thread stopped: its error is the one to report
                    handoff.put(block)
            finally:
                handoff.put(None)

        return await self._run(stream, idle_seconds, consume, produce)

    async def _run(
        self,
        stream: ThrottleStreamIO,
        idle_seconds: float | None,
        work: Callable[[socket.socket], T],
        feed: Callable[[asyncio.Future[T]], Awaitable[None]] | None = None,
    ) -> T:
        transport_socket = stream.writer.transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(transport_socket.fileno()))
        self._free -= 1
        try:
            # The same open file description as the transport's: blocking for the thread, restored below.
            sock.setblocking(True)
            if idle_seconds:
                # Kernel timeouts: a stalled connection fails the blocked call like the asyncio path's timeout.
                seconds = int(idle_seconds)
                value = struct.pack("ll", seconds, int((idle_seconds - seconds) * 1_000_000))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
            future = asyncio.get_running_loop().run_in_executor(self._executor, work, sock)
            try:
                if feed is not None:
                    await feed(future)
                return await asyncio.shield(future)
            except BaseException:
                # ABOR, the end of the session, or a failed feed: end the blocked call, let the thread finish.
                _shutdown(sock)
                await asyncio.wait({future})
                if not future.cancelled():
                    future.exception()
                raise
        finally:
            self._free += 1
            sock.setblocking(False)
            sock.close()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _connection_error(exc: OSError) -> DataConnectionError:
    if isinstance(exc, BlockingIOError):
        return DataConnectionError("data connection timed out")
    return DataConnectionError(f"data connection failed: {exc!r}")


def _send_pieces(sock: socket.socket, pieces: list[bytes]) -> int:
    views = [memoryview(piece) for piece in pieces if piece]
    total = sum(len(view) for view in views)
    while views:
        sent = sock.sendmsg(views[:IOV_MAX])
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if views and sent:
            views[0] = views[0][sent:]
    return total


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Limit:
    """The most bytes an upload may take (a quota's room), or none: how much to ask the socket for next."""

    def __init__(self, room: int | None) -> None:
        self.room = room

    def take(self, total: int, block_size: int) -> int:
        """Raise QuotaExceeded once ``total`` passed the room; else ask for a block, or one byte past the room."""
        if self.room is None:
            return block_size
        if total > self.room:
            raise QuotaExceeded(f"upload passed the byte quota ({self.room} bytes left)")
        return min(block_size, self.room + 1 - total)


def _receive_into(sock: socket.socket, fd: int, first: bytes, at_eof: bool, block_size: int, limit: _Limit) -> int:
    total = len(first)
    limit.take(total, block_size)
    if first:
        _write_all(fd, first)
    if at_eof:
        return total
    if hasattr(os, "splice"):
        return total + _splice_into(sock, fd, block_size, limit, total)
    buffer = bytearray(block_size)
    view = memoryview(buffer)
    while True:
        wanted = limit.take(total, block_size)
        filled = 0
        ended = False
        while filled < wanted and not ended:
            try:
                count = sock.recv_into(view[filled:wanted])
            except OSError as exc:
                raise _connection_error(exc) from exc
            ended = count == 0
            filled += count
        if filled:
            _write_all(fd, view[:filled])
            total += filled
        if ended:
            return total


def _splice_into(sock: socket.socket, fd: int, block_size: int, limit: _Limit, before: int) -> int:
    """socket -> pipe -> file inside the kernel: the bytes never cross into Python (Linux splice). ``before``
    bytes were written already (they count towards the limit)."""
    read_end, write_end = os.pipe()
    try:
        try:
            fcntl.fcntl(write_end, F_SETPIPE_SZ, block_size)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default size works, with more calls
        total = 0
        while True:
            wanted = limit.take(before + total, block_size)
            try:
                count = os.splice(sock.fileno(), write_end, wanted)
            except OSError as exc:
                raise _connection_error(exc) from exc
            if count == 0:
                return total
            left = count
            while left:
                left -= os.splice(read_end, fd, left)
            total += count
    finally:
        os.close(read_end)
        os.close(write_end)


def _send_file(sock: socket.socket, fd: int, offset: int) -> int:
    end = os.fstat(fd).st_size
    position = offset
    while position < end:
        try:
            sent = os.sendfile(sock.fileno(), fd, position, min(end - position, SENDFILE_CHUNK))
        except OSError as exc:
            if isinstance(exc, BlockingIOError) or exc.errno in CONNECTION_ERRNOS:
                raise _connection_error(exc) from exc
            raise
        if sent == 0:
            break  # the file shrank meanwhile
        position += sent
    return position - offset
