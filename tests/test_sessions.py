"""Many sessions at once: idle logged-in sessions are cheap, and a new client is served beside them."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

from gateway import runtime
from tests.clients import ftp_login
from tests.helpers import gateway_settings, missing, random_bytes, running, sha256, wait_until

IDLE_SESSIONS = 2000


async def log_in_idle(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` sessions logged in as alice, 50 logging in at a time; what each got when it is not 230."""
    slots = asyncio.Semaphore(50)
    sessions: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    refused: list[bytes] = []

    async def one() -> None:
        async with slots:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            writer.write(b"USER alice\r\nPASS secret\r\n")
            await reader.readline()
            reply = await reader.readline()
            sessions.append((reader, writer))
            if not reply.startswith(b"230"):
                refused.append(reply)

    await asyncio.gather(*(one() for _ in range(count)))
    assert not refused, refused[:3]
    return sessions


async def quit_all(sessions: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> list[bytes]:
    """QUIT in every session: the replies."""

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        writer.write(b"QUIT\r\n")
        reply = await reader.readline()
        writer.close()
        await writer.wait_closed()
        return reply

    return await asyncio.gather(*(one(reader, writer) for reader, writer in sessions))


def test_thousands_of_idle_sessions_and_a_transfer_beside_them(tmp_path: Path) -> None:
    # Both ends of every session are in this process: 2 descriptors each, and the server's own.
    previous, limit = runtime.raise_open_files_limit()
    needed = 2 * IDLE_SESSIONS + 500
    if limit < needed:
        missing(f"an open-files limit of {needed} (hard limit {limit}; raise it with ulimit -Hn)")
    try:
        with running(gateway_settings(tmp_path)) as gateway:
            gateway.add_user("alice")
            assert gateway.server is not None
            assert gateway.server.max_connections > IDLE_SESSIONS
            loop = asyncio.new_event_loop()
            try:
                idle = loop.run_until_complete(log_in_idle(gateway.port, IDLE_SESSIONS))
                gateway.wait_for_sessions("alice", IDLE_SESSIONS)

                client = ftp_login(gateway.host, gateway.port, "alice")
                data = random_bytes(3_000_000)
                client.stor("beside.bin", data)
                assert sha256(client.retr("beside.bin")) == sha256(data)
                assert client.list() == {"beside.bin": ("file", len(data))}
                client.quit()

                replies = loop.run_until_complete(quit_all(idle))
                assert {reply[:3] for reply in replies} == {b"221"}
            finally:
                loop.close()
            gateway.wait_for_sessions("alice", 0, timeout=30)
            wait_until(lambda: not gateway.server.sessions, timeout=30, what="every session to end")  # type: ignore[union-attr]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (previous, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
