"""STOR, APPE, STOU, REST and RETR: aioftp's shape (150, then a worker), with uploads that commit only when whole.

Each transfer's whole life is in its handler (``CommandBase.transfer`` runs it): the file is opened before the
150 (a path that cannot be used gets 550, not a 451 after the client started sending), then one ``try``/``finally``
owns it until the 226. An upload is published by ``commit()`` only when its data ended cleanly and the client is
still there; anything else (ABOR, a reset or stalled data connection, a storage error, a client found gone at
the end of the data) reaches the ``finally``, whose ``abort()`` leaves no trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import PurePosixPath
from typing import TypeVar

import aioftp
from aioftp.common import ThrottleStreamIO

from gateway import aioftp_compat
from gateway.commands.base import LOGGED_IN, CommandBase, checks, data_channel_ready
from gateway.datachannel import AsciiConverter, BlockReceiver, send
from gateway.errors import DataConnectionError, QuotaExceeded, RestartOffsetError, reply_for
from gateway.session import SessionState
from gateway.users.manager import GatewayUser
from pathio_backends.base import Download, Upload

logger = logging.getLogger(__name__)
T = TypeVar("T")


class TransferCommands(CommandBase):
    NEW_COMMANDS = {"stou": "stou"}

    def features(self, session: SessionState) -> list[str]:
        return [*super().features(session), "REST STREAM"]

    # -- uploads ---------------------------------------------------------------------------------------

    @checks(LOGGED_IN, data_channel_ready, aioftp.PathPermissions(aioftp.PathPermissions.writable))
    async def stor(
        self,
        connection: aioftp.Connection,
        rest: str | PurePosixPath,
        mode: str = "wb",
        ready: str = "Ready to receive data.",
    ) -> bool:
        session = self.session(connection)
        settings = self.settings.transfer
        offset = session.take_restart_offset()
        real_path, virtual_path = self.get_paths(connection, rest)
        user: GatewayUser = connection.user  # set at login (LOGGED_IN)
        # Watched from before the first stat of the file replaced to the commit (``receive`` keeps it): see
        # ``gateway.quota``.
        watched = self.quotas.watch(user, real_path)
        if offset:
            # One stat (a missing file is a 550 from the errors table), not is_file and then stat.
            st = await session.path_io.stat(real_path)
            if not stat.S_ISREG(st.st_mode):
                connection.response("550", "Not a file to restart.")
                return True
            if offset > st.st_size:
                raise RestartOffsetError(offset, st.st_size)
            old_size: int | None = st.st_size
        else:
            # The file replaced, if any (its size, and whether the upload makes a new file): for the quota.
            old_size = await session.path_io.file_size(real_path)
        plan = await self.quotas.plan_upload(user, old_size, offset=offset, append=mode == "ab")  # 552 if at a quota

        watch = TransferWatch(self, session, "upload", virtual_path)

        async def receive(upload: Upload) -> None:
            try:
                started = time.monotonic()
                async with await session.data.connect(connection.command_connection.throttles) as stream:
                    received, stored = await self._receive(session, stream, upload, plan.room)
                    watch.bytes = received
                # Looked at once the data connection is closed (work done anyway, during which a dying client's
                # last sockets close too), then watched for a share of the upload's duration.
                grace = min(settings.close_grace, settings.close_grace_fraction * (time.monotonic() - started))
                if await control_connection_lost(connection, grace):
                    raise DataConnectionError("control connection closed before the upload ended")
                # The size of the file replaced, the commit and the count are one critical section of the path. The
                # first stat still holds unless a change of the path took effect since (two uploads over one file).
                async with watched.changing():
                    if watched.changed:
                        session.path_io.forget_listed()
                        final = plan.replacing(await session.path_io.file_size(real_path))
                    else:
                        final = plan
                    await upload.commit()
                    await self.quotas.record(user, *final.change(stored), f"upload of {virtual_path}")
            finally:
                await upload.abort()  # nothing, once committed
            logger.info("stored %s (%d bytes%s)", virtual_path, received, f" at {offset}" if offset else "")
            connection.response("226", "Transfer complete.")

        # A missing directory or a directory in the way is found when the upload begins (550 before the 150):
        # asking here as well would cost S3 two more requests per file.
        begin = session.path_io.begin_upload
        await self.transfer(
            connection,
            session,
            "APPE" if mode == "ab" else "STOR",
            lambda: begin(real_path, offset=offset, append=mode == "ab"),
            ready,
            watch.running(receive),
        )
        return True

    async def _receive(
        self, session: SessionState, stream: ThrottleStreamIO, upload: Upload, room: int | None
    ) -> tuple[int, int]:
        """Store what the data connection brings until it ends: in a pump thread (splice) where the storage
        has a descriptor and no speed limit applies, else block by block on the event loop. Bytes received and
        stored (they differ in ASCII mode); QuotaExceeded (552) as the stored bytes pass ``room``."""
        fd = None if session.ascii else upload.fileno()
        if fd is not None and self.pump is not None and self.pump.usable(stream, "read"):
            received = await self.pump.upload(stream, fd, self.block_size, self.socket_timeout, room)
            return received, received
        receiver = BlockReceiver(stream, self.block_size)
        converter = AsciiConverter() if session.ascii else None
        stored = 0

        async def store(data: bytes) -> None:
            nonlocal stored
            stored += len(data)
            if room is not None and stored > room:
                raise QuotaExceeded(f"upload passed the byte quota ({room} bytes left)")
            await upload.write(data)

        async for block in receiver:
            await store(converter.to_storage(block) if converter else block)
        if converter and (tail := converter.flush()):
            await store(tail)
        return receiver.received, stored

    async def stou(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        """STOR under a name no file has yet (RFC 959); the 150 reply names it (RFC 1123 4.1.2.9)."""
        wanted = PurePosixPath(str(rest).strip() or f"ftp-upload-{time.strftime('%Y%m%d-%H%M%S')}")
        path_io = self.session(connection).path_io
        for attempt in range(1000):
            candidate = wanted if attempt == 0 else wanted.with_name(f"{wanted.name}.{attempt}")
            real_path, _ = self.get_paths(connection, candidate)
            if not await path_io.exists(real_path):
                return await self.stor(connection, candidate, "wb", ready=f"FILE: {candidate}")
        connection.response("553", "No unique name found.")
        return True

    async def appe(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        return await self.stor(connection, rest, "ab")

    @checks(LOGGED_IN)
    async def rest(self, connection: aioftp.Connection, rest: str) -> bool:
        """REST: kept under a name of the session's for the next transfer, even across TYPE or PASV (vsftpd keeps
        it too); aioftp's dispatcher clears its own ``restart_offset`` on any other command."""
        session = self.session(connection)
        if rest.isdigit():
            session.restart_offset = int(rest)
            connection.response("350", f"Restarting at {int(rest)}. Send STOR or RETR to start the transfer.")
        else:
            session.restart_offset = 0
            connection.response("501", f"REST needs a byte offset, not {rest!r}.")
        return True

    # -- downloads -------------------------------------------------------------------------------------

    @checks(LOGGED_IN, data_channel_ready, aioftp.PathPermissions(aioftp.PathPermissions.readable))
    async def retr(self, connection: aioftp.Connection, rest: str | PurePosixPath) -> bool:
        session = self.session(connection)
        offset = session.take_restart_offset()
        real_path, virtual_path = self.get_paths(connection, rest)
        st = await self.regular_file(connection, real_path)  # where aioftp would ask exists, is_file, stat
        if st is None:
            return True
        if offset > st.st_size:
            raise RestartOffsetError(offset, st.st_size)

        watch = TransferWatch(self, session, "download", virtual_path)

        async def send_file(download: Download) -> None:
            try:
                async with await session.data.connect(connection.command_connection.throttles) as stream:
                    sent = watch.bytes = await self._send(session, stream, download)
            finally:
                await download.close()
            logger.info("sent %s (%d bytes%s)", virtual_path, sent, f" from {offset}" if offset else "")
            connection.response("226", "Transfer complete.")

        begin = session.path_io.begin_download
        await self.transfer(
            connection,
            session,
            "RETR",
            lambda: begin(real_path, offset=offset),
            "Opening data connection.",
            watch.running(send_file),
        )
        return True

    async def _send(self, session: SessionState, stream: ThrottleStreamIO, download: Download) -> int:
        """Send the file to its end: ``sendfile`` in a pump thread where the storage has a descriptor, the blocks
        read on the event loop sent from a pump thread otherwise (S3), all on the event loop under a speed limit
        or in ASCII mode."""
        if not session.ascii and self.pump is not None and self.pump.usable(stream, "write"):
            fd = download.fileno()
            if fd is not None:
                return await self.pump.download(stream, fd, download.position, self.socket_timeout)
            async with contextlib.aclosing(gathered(download, self.block_size)) as batches:
                return await self.pump.send_blocks(stream, batches, self.socket_timeout)
        converter = AsciiConverter() if session.ascii else None
        sent = 0
        while block := await download.read(self.block_size):
            await send(stream, converter.to_network(block) if converter else block)
            sent += len(block)
        return sent


class TransferWatch:
    """One upload or download as metrics and the audit log see it: its result (``ok``; ``aborted`` by ABOR or the
    session's end; ``failed``, with the reply code), bytes and duration from the 150 to the final reply. A
    transfer refused before its 150 (a file that cannot be opened: 550) is audited by ``GatewayServer._command``
    and is no transfer in the metrics.

    The bytes of a transfer that did not end well are not known (the pump threads count only to the end): 0."""

    def __init__(self, server: CommandBase, session: SessionState, direction: str, path: PurePosixPath | str) -> None:
        self.server = server
        self.direction = direction
        self.path = str(path)
        uri = session.user.storage.uri if session.user is not None else ""
        self.backend = "s3" if uri.startswith("s3:") else "file"
        self.bytes = 0

    def running(self, run: Callable[[T], Awaitable[None]]) -> Callable[[T], Awaitable[None]]:
        async def watched(opened: T) -> None:
            started = time.monotonic()
            try:
                await run(opened)
            except asyncio.CancelledError:
                self._end("aborted", started, "426")
                raise
            except Exception as exc:
                self._end("failed", started, reply_for(exc, transfer=True)[0])
                raise
            self._end("ok", started)

        return watched

    def _end(self, result: str, started: float, code: str | None = None) -> None:
        seconds = time.monotonic() - started
        nbytes = self.bytes if result == "ok" else 0
        self.server.metrics.transfer(self.direction, self.backend, result, nbytes, seconds)
        self._audit(result, seconds, code)

    def _audit(self, result: str, seconds: float, code: str | None) -> None:
        fields = {"code": code} if code else {}
        self.server.audit.event(
            self.direction,
            path=self.path,
            bytes=self.bytes if result == "ok" else 0,
            duration=round(seconds, 6),
            result="ok" if result == "ok" else result,
            **fields,
        )


async def gathered(download: Download, size: int) -> AsyncGenerator[list[bytes], None]:
    """What a backend gives (an HTTP body comes 64 KiB at a time) in lists of about ``size`` bytes."""
    pieces: list[bytes] = []
    total = 0
    while piece := await download.read(size):
        pieces.append(piece)
        total += len(piece)
        if total >= size or len(pieces) >= 512:
            yield pieces
            pieces, total = [], 0
    if pieces:
        yield pieces


async def control_connection_lost(connection: aioftp.Connection, grace: float) -> bool:
    """Does the client close its control connection within ``grace`` seconds (having sent nothing more)?

    Asked when an upload's data ends: a client that is killed closes both connections, and the data
    connection's end then looks like a complete file. The control connection tells the two apart, but its
    end may come a little later: a dying process closes its sockets newest first (the data connection before
    the control connection), and the server, woken by the first, can run before the second (gaps of 0.6 to 3 ms
    measured on this 2-core machine, up to 6 ms under full load). A live client is held up by ``grace``, so
    it is a share of the upload's duration (see ``TransferSettings.close_grace_fraction``).
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
    if aioftp_compat.buffered(reader):
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
