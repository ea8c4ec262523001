#!/usr/bin/env python3
"""A loopback TCP proxy that limits each connection, in each direction, to a rate: S3 serves each HTTP
connection at a bounded speed (tens of MB/s), and only several connections reach an instance's bandwidth.

    python bench/throttle_proxy.py --upstream 127.0.0.1:PORT [--rate-mbs 50] [--port 0]

Prints ``listening on PORT`` once it accepts connections; runs until killed. Each direction of each
connection has a token bucket of ``rate`` bytes/s holding at most ``BURST`` bytes, so a keep-alive connection
that sat idle does not save up credit for a burst.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

CHUNK = 256 * 1024
BURST = 256 * 1024


class Bucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = float(BURST)
        self.stamp = asyncio.get_running_loop().time()

    async def take(self, count: int) -> None:
        now = asyncio.get_running_loop().time()
        self.tokens = min(BURST, self.tokens + (now - self.stamp) * self.rate) - count
        self.stamp = now
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float) -> None:
    bucket = Bucket(rate)
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(CHUNK):
            await bucket.take(len(data))
            writer.write(data)
            await writer.drain()


async def serve(upstream_host: str, upstream_port: int, port: int, rate: float) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(upstream_host, upstream_port)
        except OSError:
            client_writer.close()
            return
        try:
            # When either side ends, the connection ends (HTTP/1.1 needs nothing finer).
            done, pending = await asyncio.wait(
                {
                    asyncio.create_task(pipe(client_reader, server_writer, rate)),
                    asyncio.create_task(pipe(server_reader, client_writer, rate)),
                },
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        finally:
            for writer in (client_writer, server_writer):
                writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rate-mbs", type=float, default=50.0, help="MB/s (10^6 bytes) per connection and direction")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, int(port), args.port, args.rate_mbs * 1e6))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
