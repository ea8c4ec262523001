"""What the gateway takes from aioftp and asyncio beyond their documented interfaces (``gateway/aioftp_compat.py``),
checked against the installed releases: an upgrade that changes any of it fails here first, by name."""

from __future__ import annotations

import asyncio
from typing import Any

import aioftp
import pytest

from gateway import aioftp_compat
from gateway.errors import unwrap

PINNED_AIOFTP = (0, 28)


def test_aioftp_is_the_pinned_release() -> None:
    assert aioftp.version[:2] == PINNED_AIOFTP, (
        f"aioftp {aioftp.__version__}: re-check gateway/aioftp_compat.py and this file, then move the pin"
    )


async def test_stream_reader_internals() -> None:
    """The pump takes what a StreamReader read ahead; the killed-client check looks at it."""
    reader = asyncio.StreamReader()
    assert aioftp_compat.has_buffer(reader)
    assert aioftp_compat.buffered(reader) == b""
    reader.feed_data(b"NOOP\r\n")
    assert aioftp_compat.buffered(reader) == b"NOOP\r\n"
    reader.feed_eof()
    assert aioftp_compat.take_buffered(reader) == (b"NOOP\r\n", True)
    assert aioftp_compat.buffered(reader) == b""
    assert reader.at_eof()


async def test_waiting_for_data_takes_nothing() -> None:
    """PROXY protocol's optional header is looked for in the first bytes, which stay for the session otherwise."""
    reader = asyncio.StreamReader()
    waiting = asyncio.ensure_future(aioftp_compat.wait_for_data(reader))
    await asyncio.sleep(0)
    assert not waiting.done()
    reader.feed_data(b"USER x\r\n")
    await asyncio.wait_for(waiting, 1)
    assert await reader.readline() == b"USER x\r\n"
    reader.feed_eof()
    await asyncio.wait_for(aioftp_compat.wait_for_data(reader), 1)  # the end counts too


async def test_the_dispatcher_as_the_gateway_uses_it() -> None:
    """The gateway keys a session's state by the control connection's writer (what ``dispatcher`` is given, and
    what ``parse_command``'s stream carries), runs ``greeting`` first, ends a session when a handler returns
    False, cancels ``extra_workers`` at the end, and counts on ``commands_mapping`` holding bound methods."""
    seen: dict[str, Any] = {}
    ended = asyncio.Event()

    class Probe(aioftp.Server):
        def __init__(self) -> None:
            super().__init__()
            assert self.commands_mapping["pwd"] == self.pwd
            self.commands_mapping["long"] = self.long
            self.commands_mapping["stop"] = self.stop

        async def dispatcher(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen["writer"] = writer
            await super().dispatcher(reader, writer)
            ended.set()

        async def greeting(self, connection: aioftp.Connection, rest: str) -> bool:
            seen["greeted before any command"] = "command" not in seen
            return await super().greeting(connection, rest)

        async def parse_command(self, stream: Any, censor_commands: tuple[str] = ("pass",)) -> tuple[str, str]:
            seen["stream writer"] = stream.writer
            command = await super().parse_command(stream)
            seen["command"] = command
            return command

        async def long(self, connection: aioftp.Connection, rest: str) -> bool:
            async def work() -> None:
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    seen["worker cancelled"] = True
                    raise

            connection.extra_workers.add(asyncio.ensure_future(work()))
            connection.response("200", "started")
            return True

        async def stop(self, connection: aioftp.Connection, rest: str) -> bool:
            connection.response("221", "bye")
            return False

    server = Probe()
    await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.server_port)
        assert (await reader.readline()).startswith(b"220")
        writer.write(b"LONG\r\nSTOP\r\n")
        assert (await reader.readline()).startswith(b"200")
        assert (await reader.readline()).startswith(b"221")
        assert await reader.read() == b""  # the session ended
        writer.close()
        await asyncio.wait_for(ended.wait(), 10)
    finally:
        await server.close()
    assert seen["stream writer"] is seen["writer"]
    assert seen["greeted before any command"]
    assert seen["worker cancelled"]


async def test_aioftp_worker_answers_an_abort_with_426_and_226() -> None:
    replies: list[tuple[Any, ...]] = []
    connection = aioftp.Connection(response=lambda *args: replies.append(args))

    @aioftp.server.worker
    async def transfer(server: Any, connection: aioftp.Connection, rest: str) -> None:
        await asyncio.sleep(60)

    task = asyncio.ensure_future(transfer(None, connection, ""))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    task.cancel()
    await task
    assert [reply[0] for reply in replies] == ["426", "226"]


async def test_path_io_errors_carry_the_backends_exception() -> None:
    """``errors.unwrap`` finds the backend's exception in ``PathIOError.reason``, however deep."""

    @aioftp.pathio.universal_exception
    async def inner() -> None:
        raise FileNotFoundError(2, "gone", "/x")

    @aioftp.pathio.universal_exception
    async def outer() -> None:
        await inner()

    with pytest.raises(aioftp.PathIOError) as excinfo:
        await outer()
    assert isinstance(unwrap(excinfo.value), FileNotFoundError)


async def test_connection_keeps_aioftps_fields_as_futures() -> None:
    """aioftp's decorators wait on ``Connection`` futures by name; the gateway sets ``user``, ``logged`` and
    ``path_io`` there at login and reads ``current_directory``, ``rename_from`` and ``command_connection``."""
    connection = aioftp.Connection(extra_workers=set())
    assert not connection.future.logged.done()
    connection.logged = True
    assert connection.future.logged.done() and connection.logged is True
    del connection.logged
    assert "logged" not in connection


async def test_start_tls_server_side_with_the_clients_first_bytes_already_read() -> None:
    """A data connection's ClientHello is often read before the upgrade (or after a PROXY header): it is handed to
    the TLS layer first; the reader and writer stay the same objects and speak TLS afterwards."""
    import socket
    import ssl

    import trustme

    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await aioftp_compat.wait_for_data(reader)  # the ClientHello, read as plain bytes
        assert aioftp_compat.buffered(reader)
        await aioftp_compat.start_tls(reader, writer, server_context, handshake_timeout=5, early=True)
        assert writer.get_extra_info("ssl_object") is not None
        line = await reader.readline()
        writer.write(line.upper())
        await writer.drain()
        done.set_result(line)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def client() -> bytes:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"hello\n")
            return tls.recv(100)

    assert await asyncio.to_thread(client) == b"HELLO\n"
    assert await asyncio.wait_for(done, 5) == b"hello\n"
    server.close()


async def test_ended_before_reset() -> None:
    """A reset after the peer's end of data leaves what the reader holds; a reset before it, nothing."""
    reader = asyncio.StreamReader()
    reader.feed_data(b"last block")
    assert aioftp_compat.ended_before_reset(reader) is None
    reader.feed_eof()
    reader.set_exception(ConnectionResetError())
    assert aioftp_compat.ended_before_reset(reader) == b"last block"
    assert aioftp_compat.ended_before_reset(reader) == b""


async def test_deferred_close_half_closes_then_closes() -> None:
    """aioftp's dispatcher ends a session with ``writer.close()``: after ``defer_close`` that sends FIN and keeps
    the reading side open, and the returned close really closes."""
    received = asyncio.Event()
    server_sides: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_sides.append((reader, writer))
        received.set()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    await received.wait()
    their_reader, their_writer = server_sides[0]
    close = aioftp_compat.defer_close(their_writer)
    their_writer.write(b"221 bye\r\n")
    their_writer.close()
    assert await reader.read() == b"221 bye\r\n"  # then EOF: the FIN
    writer.write(b"NOOP\r\n")
    assert await their_reader.readline() == b"NOOP\r\n"  # still read after the half-close
    close()
    await their_writer.wait_closed()
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
