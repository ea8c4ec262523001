"""A small TCP round-robin load balancer for the cluster tests and bench (not part of the product).

It listens on one host for the control port and every passive port, sends each new connection to the next
replica (one rotation for all ports, as a Kubernetes Service spreads connections), starts it with a PROXY header
carrying the client's address (v1 on the control port, v2 on the others, as balancers differ), and copies bytes
both ways, passing each side's end on (half-close). It counts, per client IP, which replica got the control
connection and which got each data connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence

from gateway.proxy_protocol import encode_v1, encode_v2


class Balancer:
    def __init__(
        self, host: str, control_port: int, passive: range, replicas: Sequence[str], *, headers: bool = True
    ) -> None:
        self.host = host
        self.headers = headers
        self.control_port = control_port
        self.passive = passive
        self.replicas = list(replicas)
        self._next = itertools.cycle(range(len(self.replicas)))
        # client IP -> replica index of its control connection(s) / of its data connections
        self.control: dict[str, list[int]] = defaultdict(list)
        self.data: dict[str, list[int]] = defaultdict(list)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="balancer", daemon=True)
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> Balancer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _listen(self) -> None:
        for port in [self.control_port, *self.passive]:
            self._servers.append(await asyncio.start_server(self._handler(port), self.host, port))

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    def _handler(self, port: int):  # type: ignore[no-untyped-def]
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self._forward(port, reader, writer)
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                self._tasks.discard(task)
                writer.close()

        return handle

    async def _forward(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")[:2]
        index = next(self._next)
        (self.control if port == self.control_port else self.data)[client[0]].append(index)
        replica = self.replicas[index]
        up_reader, up_writer = await asyncio.open_connection(replica, port)
        if self.headers:
            up_writer.write((encode_v1 if port == self.control_port else encode_v2)(client, (self.host, port)))
        try:
            await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
        finally:
            up_writer.close()

    def landed_elsewhere(self) -> tuple[int, int]:
        """(data connections that reached another replica than their client's control connection, all of them)."""
        elsewhere = total = 0
        for client, indexes in self.data.items():
            home = set(self.control.get(client, []))
            total += len(indexes)
            elsewhere += sum(1 for index in indexes if index not in home)
        return elsewhere, total


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 18):
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()


@contextlib.contextmanager
def balancing(
    host: str, control_port: int, passive: range, replicas: Sequence[str], *, headers: bool = True
) -> Iterator[Balancer]:
    balancer = Balancer(host, control_port, passive, replicas, headers=headers).start()
    try:
        yield balancer
    finally:
        balancer.stop()


def free_port_on(hosts: Sequence[str]) -> int:
    """A port free on every one of ``hosts`` (the replicas listen on the same port, each on its address)."""
    while True:
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
