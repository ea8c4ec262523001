"""STOR, APPE and RETR: aioftp's shape (150, then a worker) with uploads that commit only when complete.

An upload goes through the backend's ``open()`` context, which publishes the file when the block ends
without an exception and aborts it otherwise: on ABOR, on a reset or stalled data connection, on a storage
error, and when the control connection is found closed at the end of the data (a killed client's data
connection ends like a finished upload).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import PurePosixPath

import aioftp
from aioftp.common import StreamIO

from gateway.commands.base import CommandBase, checks, start_worker
from gateway.errors import DataConnectionError, RestartOffsetError, transfer_errors

logger = logging.getLogger(__name__)

DATA_CONNECTION = aioftp.ConnectionConditions(
    aioftp.ConnectionConditions.data_connection_made,
    wait=True,
    fail_code="425",
    fail_info="Can't open data connection.",
)


class BlockReceiver:
    """Reads a data connection in blocks of ``block_size``: a socket read returns at most what the kernel has
    (often 64 KiB), and storing fewer, larger blocks costs fewer thread hops or S3 requests."""

    def __init__(self, stream: StreamIO, block_size: int) -> None:
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
            try:
                chunk = await self.stream.read(self.block_size - size)
            except (OSError, asyncio.IncompleteReadError) as exc:
                raise DataConnectionError(f"data connection failed: {exc!r}") from exc
            if not chunk:
                self._eof = True
                break
            chunks.append(chunk)
            size += len(chunk)
        if not chunks:
            raise StopAsyncIteration
        self.received += size
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send(stream: StreamIO, data: bytes) -> None:
    try:
        await stream.write(data)
    except OSError as exc:
        raise DataConnectionError(f"data connection failed: {exc!r}") from exc


def control_connection_lost(connection: aioftp.Connection) -> bool:
    """Has the client closed its control connection (and sent nothing more)?

    Checked when an upload's data ends: a client that is killed closes both connections, and the data
    connection's end then looks like a complete file. The control connection tells the two apart.
    """
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


def take_restart_offset(connection: aioftp.Connection) -> int:
    """REST applies to the next transfer only (aioftp would keep it for the one after as well)."""
    offset: int = connection.restart_offset
    connection.restart_offset = 0
    return offset


class TransferCommands(CommandBase):
    @checks(
        aioftp.ConnectionConditions(
            aioftp.ConnectionConditions.login_required,
            aioftp.ConnectionConditions.passive_server_started,
        ),
        aioftp.PathPermissions(aioftp.PathPermissions.writable),
    )
    async def stor(self, connection: aioftp.Connection, rest: str | PurePosixPath, mode: str = "wb") -> bool:
        @DATA_CONNECTION
        @aioftp.server.worker
        @transfer_errors
        async def stor_worker(self: TransferCommands, connection: aioftp.Connection, rest: str) -> None:
            stream = connection.data_connection
            del connection.data_connection
            async with stream, connection.path_io.open(real_path, mode=mode) as file:
                if offset:
                    await file.seek(offset)
                receiver = BlockReceiver(stream, connection.block_size)
                async for block in receiver:
                    await file.write(block)
                if control_connection_lost(connection):
                    raise DataConnectionError("control connection closed before the upload ended")
            logger.info("stored %s (%d bytes%s)", virtual_path, receiver.received, f" at {offset}" if offset else "")
            connection.response("226", "Transfer complete.")

        offset = take_restart_offset(connection)
        real_path, virtual_path = self.get_paths(connection, rest)
        path_io = connection.path_io
        if not await path_io.is_dir(real_path.parent):
            connection.response("550", "No such directory.")
            return True
        if await path_io.is_dir(real_path):
            connection.response("550", "Is a directory.")
            return True
        if offset:
            if not await path_io.is_file(real_path):
                connection.response("550", "No such file to restart.")
                return True
            size = (await path_io.stat(real_path)).st_size
            if offset > size:
                raise RestartOffsetError(offset, size)
        start_worker(connection, stor_worker(self, connection, rest))
        connection.response("150", "Ready to receive data.")
        return True

    async def appe(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        return await self.stor(connection, rest, "ab")

    @checks(
        aioftp.ConnectionConditions(
            aioftp.ConnectionConditions.login_required,
            aioftp.ConnectionConditions.passive_server_started,
        ),
        aioftp.PathConditions(aioftp.PathConditions.path_must_exists, aioftp.PathConditions.path_must_be_file),
        aioftp.PathPermissions(aioftp.PathPermissions.readable),
    )
    async def retr(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        @DATA_CONNECTION
        @aioftp.server.worker
        @transfer_errors
        async def retr_worker(self: TransferCommands, connection: aioftp.Connection, rest: str) -> None:
            stream = connection.data_connection
            del connection.data_connection
            sent = 0
            async with stream, connection.path_io.open(real_path, mode="rb") as file:
                if offset:
                    await file.seek(offset)
                async for block in file.iter_by_block(connection.block_size):
                    await send(stream, block)
                    sent += len(block)
            logger.info("sent %s (%d bytes%s)", virtual_path, sent, f" from {offset}" if offset else "")
            connection.response("226", "Transfer complete.")

        offset = take_restart_offset(connection)
        real_path, virtual_path = self.get_paths(connection, rest)
        if offset:
            size = (await connection.path_io.stat(real_path)).st_size
            if offset > size:
                raise RestartOffsetError(offset, size)
        start_worker(connection, retr_worker(self, connection, rest))
        connection.response("150", "Opening data connection.")
        return True
