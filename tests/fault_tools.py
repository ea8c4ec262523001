"""Faults on demand for tests/test_faults.py: an S3 endpoint (moto) in a process of its own that can be killed and
started again on the same port, and a TCP proxy in front of S3 that delays, resets or answers 503 or 500 for a while.
Each fault injected is counted (``counts``), for the run's summary."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

from tests.helpers import wait_until

T = TypeVar("T")
Mode = Literal["pass", "delay", "reset", "503", "500"]

# What the proxy answers itself in the modes named by a status: S3's status line and error.
ANSWERS = {
    "503": (b"503 Slow Down", b"SlowDown", b"Please reduce your request rate."),
    "500": (b"500 Internal Server Error", b"InternalError", b"We encountered an internal error. Please try again."),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class MotoProcess:
    """``python -m moto.server`` on one port: :meth:`kill` takes S3 away at once (every connection with it, as a
    crash or a network cut would; moto's in-thread server would go on serving its open keep-alive connections),
    :meth:`start` brings it back on the same port, empty."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, timeout=30, what=f"moto to listen on port {self.port}", interval=0.05)
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"moto exited with {self.process.returncode}")
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):  # noqa: S310 - loopback http
                return True
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


class S3FaultProxy:
    """A TCP proxy to an S3 endpoint, on its own event loop in a thread. In ``pass`` mode it forwards bytes as they
    come. The faults, each for the connections opened while it is set (switching to one cuts the connections open
    then with a reset, so the client's pooled keep-alive connections meet it too):

    * ``reset``: a new connection is reset (RST, SO_LINGER 0) as soon as its request starts;
    * ``delay``: a request reaches S3 only after ``delay`` seconds (and never, if the client gave up before);
    * ``503`` (or ``500``): the proxy answers ``503 Slow Down`` (``500 InternalError``) itself, to the next
      ``count`` requests, then forwards again.
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").rpartition(":")
        self.upstream = (host, int(port))
        self.mode: Mode = "pass"
        self.delay = 0.0
        self.left = 0
        self.counts: Counter[str] = Counter()
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s3-fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def start(self) -> S3FaultProxy:
        self._thread.start()
        self._server = self._run(self._listen())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    def close(self) -> None:
        self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    def set(self, mode: Mode, *, delay: float = 0.0, count: int = 0) -> None:
        """Switch to ``mode`` (from the test's thread)."""
        self._run(self._set(mode, delay, count))

    async def _set(self, mode: Mode, delay: float, count: int) -> None:
        self.mode, self.delay, self.left = mode, delay, count
        if mode != "pass":
            for writer in list(self._open):
                self.counts["connection cut"] += 1
                reset(writer)

    def answered(self, status: str) -> int:
        return self.counts[f"{status} answered"]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._open.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            mode = self.mode
            if mode == "reset":
                await reader.read(1)
                self.counts["connection reset"] += 1
                reset(writer)
                return
            if mode in ANSWERS and self.left > 0:
                self.left -= 1
                if self.left == 0:
                    self.mode = "pass"
                await self._answer(mode, reader, writer)
                return
            early = b""
            if mode == "delay":
                early = await self._delayed(reader)
                if early is None:
                    return
            up_reader, upstream = await asyncio.open_connection(*self.upstream)
            self._open.add(upstream)
            upstream.write(early)
            await pipe_both(reader, writer, up_reader, upstream)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            for end in (writer, upstream):
                if end is not None:
                    self._open.discard(end)
                    end.transport.abort()

    async def _delayed(self, reader: asyncio.StreamReader) -> bytes | None:
        """What the client sent during the delay, or None when it gave up (closed) meanwhile."""
        self.counts["request delayed"] += 1
        received = bytearray()
        ended = asyncio.Event()

        async def collect() -> None:
            with contextlib.suppress(OSError):
                while chunk := await reader.read(65536):
                    received.extend(chunk)
            ended.set()

        collector = asyncio.ensure_future(collect())
        await asyncio.sleep(self.delay)
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        return None if ended.is_set() else bytes(received)

    async def _answer(self, status: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read the request (its body too, unless the client waits for 100 Continue) and answer it with S3's
        error for ``status``."""
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        length = 0
        for line in head.split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip() == "content-length":
                length = int(value)
        if "expect: 100-continue" not in head and length:
            await reader.readexactly(length)
        self.counts[f"{status} answered"] += 1
        status_line, code, message = ANSWERS[status]
        body = b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>%s</Code><Message>%s</Message></Error>" % (
            code,
            message,
        )
        writer.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (status_line, len(body), body)
        )
        await writer.drain()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: SO_LINGER on with a zero timeout."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def pipe_both(
    client_reader: asyncio.StreamReader,
    client: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream: asyncio.StreamWriter,
) -> None:
    """Forward both ways until either side ends (HTTP needs no half-close)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()

    tasks = {asyncio.ensure_future(pipe(client_reader, upstream)), asyncio.ensure_future(pipe(upstream_reader, client))}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
