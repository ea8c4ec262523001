"""STOR, APPE and RETR: aioftp's shape (150, then a worker) with uploads that commit only when complete.

An upload goes through the backend's ``open()`` context, which publishes the file when the block ends
without an exception and aborts it otherwise: on ABOR, on a reset or stalled data connection, on a storage
error, and when the control connection is found closed at the end of the data (a killed client's data
connection ends like a finished upload).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from pathlib import Path, PurePosixPath
from typing import cast

import aioftp
from aioftp import AbstractPathIO
from aioftp.common import ThrottleStreamIO
from aioftp.pathio import AsyncPathIOContext

from gateway.commands.base import (
    DATA_CHANNEL_READY,
    LOGGED_IN,
    CommandBase,
    checks,
    get,
    take_data_connection,
)
from gateway.commands.basic import AsciiConverter, ascii_mode
from gateway.errors import DataConnectionError, RestartOffsetError, transfer_errors
from pathio_backends.base import Entered, FileHandle, TransactionalPathIO, run_to_completion

logger = logging.getLogger(__name__)

DATA_CONNECTION = aioftp.ConnectionConditions(
    aioftp.ConnectionConditions.data_connection_made,
    wait=True,
    fail_code="425",
    fail_info="Can't open data connection.",
)


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
        raise DataConnectionError(f"data connection failed: {exc!r}") from exc
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
        self._eof = False

    def __aiter__(self) -> BlockReceiver:
        return self

    async def __anext__(self) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while size < self.block_size and not self._eof:
            chunk = await receive(self.stream, self.block_size - size)
            if not chunk:
                self._eof = True
                break
            chunks.append(chunk)
            size += len(chunk)
        if not chunks:
            raise StopAsyncIteration
        self.received += size
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def control_connection_lost(connection: aioftp.Connection, grace: float) -> bool:
    """Does the client close its control connection within ``grace`` seconds (having sent nothing more)?

    Asked when an upload's data ends: a client that is killed closes both connections, and the data
    connection's end then looks like a complete file. The control connection tells the two apart, but its
    end may come a little later: the dying process closes its sockets one by one and can be preempted in
    between (gaps of up to 6 ms measured on this 2-core machine under full load).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while not _control_closed(connection):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(min(0.002, max(0.0, deadline - loop.time())))
    return True


def _control_closed(connection: aioftp.Connection) -> bool:
    """Has the client closed its control connection, as far as the kernel knows now?"""
    reader = connection.command_connection.reader
    if reader.at_eof():
        return True
    if getattr(reader, "_buffer", None):
        return False  # commands are waiting to be read: the client is still there
    transport = connection.command_connection.writer.transport
    if transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        # Peek on a duplicate descriptor: asyncio's own socket object must not be read from.
        with socket.socket(fileno=os.dup(sock.fileno())) as peer:
            return peer.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def open_upload(path_io: AbstractPathIO[Path], real_path: Path, mode: str, offset: int) -> AsyncPathIOContext:
    """Open and start the upload before the 150 reply: a path that cannot be written gets 550 (or 553)
    instead of a 451 after the client has started sending."""
    file = path_io.open(real_path, mode=mode)
    await file.__aenter__()
    try:
        if offset:
            await file.seek(offset)
        if isinstance(path_io, TransactionalPathIO):
            await path_io.begin(cast(FileHandle, file.file))
    except BaseException as exc:
        await file.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    return file


async def gathered(blocks: AsyncIterable[bytes], size: int) -> AsyncIterator[list[bytes]]:
    """Pieces read from a backend (an HTTP body comes 64 KiB at a time) in lists of about ``size`` bytes."""
    pieces: list[bytes] = []
    total = 0
    async for piece in blocks:
        pieces.append(piece)
        total += len(piece)
        if total >= size or len(pieces) >= 512:
            yield pieces
            pieces, total = [], 0
    if pieces:
        yield pieces


async def native_fd(path_io: AbstractPathIO[Path], file: AsyncPathIOContext) -> int | None:
    if isinstance(path_io, TransactionalPathIO):
        return await path_io.native_fd(cast(FileHandle, file.file))
    return None


async def closing(path_io: AbstractPathIO[Path], file: AsyncPathIOContext, worker: Awaitable[object]) -> None:
    """Run a transfer worker, then make sure its file is closed: aioftp's data-connection check answers 425
    without running the worker at all when the client never connects."""
    try:
        await worker
    finally:
        if file.close is not None:
            await run_to_completion(file.close())


def take_restart_offset(connection: aioftp.Connection) -> int:
    """The offset of the last REST, for this transfer only.

    Kept under a name of our own: aioftp's dispatcher clears ``restart_offset`` on any other command, which
    loses the REST of clients that send TYPE or PASV between REST and RETR (vsftpd keeps it, and so do we).
    """
    offset: int = get(connection, "pending_rest", 0)
    connection.pending_rest = 0
    return offset


class TransferCommands(CommandBase):
    NEW_COMMANDS = {"stou": "stou"}

    @checks(
        LOGGED_IN,
        DATA_CHANNEL_READY,
        aioftp.PathPermissions(aioftp.PathPermissions.writable),
    )
    async def stor(
        self,
        connection: aioftp.Connection,
        rest: str | PurePosixPath,
        mode: str = "wb",
        ready: str = "Ready to receive data.",
    ) -> bool:
        @DATA_CONNECTION
        @aioftp.server.worker
        @transfer_errors
        async def stor_worker(self: TransferCommands, connection: aioftp.Connection, rest: str) -> None:
            stream = take_data_connection(connection)
            async with stream, Entered(file):
                fd = None if ascii else await native_fd(path_io, file)
                if fd is not None and self.pump is not None and self.pump.usable(stream, "read"):
                    received = await self.pump.upload(stream, fd, connection.block_size, connection.socket_timeout)
                else:
                    receiver = BlockReceiver(stream, connection.block_size)
                    converter = AsciiConverter() if ascii else None
                    async for block in receiver:
                        await file.write(converter.to_storage(block) if converter else block)
                    if converter and (tail := converter.flush()):
                        await file.write(tail)
                    received = receiver.received
                if await control_connection_lost(connection, self.settings.transfer.close_grace):
                    raise DataConnectionError("control connection closed before the upload ended")
            logger.info("stored %s (%d bytes%s)", virtual_path, received, f" at {offset}" if offset else "")
            connection.response("226", "Transfer complete.")

        offset = take_restart_offset(connection)
        ascii = ascii_mode(connection)
        real_path, virtual_path = self.get_paths(connection, rest)
        path_io = connection.path_io
        # A missing directory or a directory in the way is found by the backend when the upload opens below
        # (550 before the 150): asking here as well would cost S3 two more requests per file.
        if offset:
            # One stat (a missing file is a 550 from the errors table), not is_file and then stat.
            st = await path_io.stat(real_path)
            if not stat.S_ISREG(st.st_mode):
                connection.response("550", "Not a file to restart.")
                return True
            if offset > st.st_size:
                raise RestartOffsetError(offset, st.st_size)
        file = await open_upload(path_io, real_path, mode, offset)
        self.start_transfer(connection, closing(path_io, file, stor_worker(self, connection, rest)))
        connection.response("150", ready)
        return True

    async def stou(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        """STOR under a name no file has yet (RFC 959); the 150 reply names it (RFC 1123 4.1.2.9)."""
        wanted = PurePosixPath(str(rest).strip() or f"ftp-upload-{time.strftime('%Y%m%d-%H%M%S')}")
        for attempt in range(1000):
            candidate = wanted if attempt == 0 else wanted.with_name(f"{wanted.name}.{attempt}")
            real_path, _ = self.get_paths(connection, candidate)
            if not await connection.path_io.exists(real_path):
                return await self.stor(connection, candidate, "wb", ready=f"FILE: {candidate}")
        connection.response("553", "No unique name found.")
        return True

    @checks(aioftp.ConnectionConditions(aioftp.ConnectionConditions.login_required))
    async def rest(self, connection: aioftp.Connection, rest: str) -> bool:
        if rest.isdigit():
            connection.pending_rest = int(rest)
            connection.response("350", f"Restarting at {int(rest)}. Send STOR or RETR to start the transfer.")
        else:
            connection.pending_rest = 0
            connection.response("501", f"REST needs a byte offset, not {rest!r}.")
        return True

    async def appe(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        return await self.stor(connection, rest, "ab")

    @checks(LOGGED_IN, DATA_CHANNEL_READY, aioftp.PathPermissions(aioftp.PathPermissions.readable))
    async def retr(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        @DATA_CONNECTION
        @aioftp.server.worker
        @transfer_errors
        async def retr_worker(self: TransferCommands, connection: aioftp.Connection, rest: str) -> None:
            stream = take_data_connection(connection)
            sent = 0
            async with stream, connection.path_io.open(real_path, mode="rb") as file:
                if offset:
                    await file.seek(offset)
                fd = await native_fd(connection.path_io, file)
                blocks = file.iter_by_block(connection.block_size)
                if ascii:
                    converter = AsciiConverter()
                    async for block in blocks:
                        await send(stream, converter.to_network(block))
                        sent += len(block)
                elif self.pump is not None and self.pump.usable(stream, "write"):
                    if fd is not None:
                        sent = await self.pump.download(stream, fd, offset, connection.socket_timeout)
                    else:
                        batches = gathered(blocks, connection.block_size)
                        async with contextlib.aclosing(batches):  # type: ignore[type-var]
                            sent = await self.pump.send_blocks(stream, batches, connection.socket_timeout)
                else:
                    async for block in blocks:
                        await send(stream, block)
                        sent += len(block)
            logger.info("sent %s (%d bytes%s)", virtual_path, sent, f" from {offset}" if offset else "")
            connection.response("226", "Transfer complete.")

        offset = take_restart_offset(connection)
        ascii = ascii_mode(connection)
        real_path, virtual_path = self.get_paths(connection, rest)
        st = await self.regular_file(connection, real_path)  # where aioftp would ask exists, is_file, stat
        if st is None:
            return True
        if offset > st.st_size:
            raise RestartOffsetError(offset, st.st_size)
        self.start_transfer(connection, retr_worker(self, connection, rest))
        connection.response("150", "Opening data connection.")
        return True
