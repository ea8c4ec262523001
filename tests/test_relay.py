"""gateway.relay on its own, over loopback TCP: bytes both ways with half-close, and a reader that stops."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from gateway import relay


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        near = socket.create_connection(server.getsockname())
        far, _ = server.accept()
    return near, far


async def test_bytes_both_ways_and_the_end_passed_on() -> None:
    client_side, client = tcp_pair()  # the client's end, and the relay's socket towards it
    owner, owner_side = tcp_pair()  # the relay's socket towards the owner, and the owner's end
    data = os.urandom(8 << 20)
    reply = os.urandom(1 << 20)
    received = bytearray()

    def owner_works() -> None:
        while chunk := owner_side.recv(1 << 20):  # until the client's FIN comes through
            received.extend(chunk)
        owner_side.sendall(reply)
        owner_side.close()

    def client_works() -> bytes:
        client_side.sendall(data[1000:])
        client_side.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := client_side.recv(1 << 20):
            got.extend(chunk)
        client_side.close()
        return bytes(got)

    worker = threading.Thread(target=owner_works)
    worker.start()
    with ThreadPoolExecutor(4) as executor:
        client_done = asyncio.get_running_loop().run_in_executor(executor, client_works)
        moved = await relay.splice(executor, client, data[:1000], owner, idle=5.0)
        got = await client_done
    worker.join()
    client.close()
    owner.close()
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(reply).hexdigest()
    assert moved == len(data) + len(reply)


async def test_a_client_that_stops_reading_ends_the_relay() -> None:
    """A download whose client neither reads nor closes: the relay's write makes no progress for the idle timeout,
    fails, and both sockets are shut down, instead of a thread held until TCP gives up."""
    client_side, client = tcp_pair()
    owner, owner_side = tcp_pair()
    for sock in (client_side, client):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    stop = threading.Event()

    owner_side.settimeout(10)

    def owner_sends() -> None:
        block = b"x" * (1 << 20)
        try:
            while not stop.is_set():
                owner_side.sendall(block)
        except OSError:
            pass  # the relay shut its side down, or the test's end did

    worker = threading.Thread(target=owner_sends)
    worker.start()
    try:
        with ThreadPoolExecutor(4) as executor:
            async with asyncio.timeout(30):  # without the bound, the relay's write waits for ever
                moved = await relay.splice(executor, client, b"", owner, idle=0.5)
        assert moved == 0  # the direction that failed counts nothing; the silent one moved nothing
        assert client_side.recv(1 << 16)  # the bytes that did go out are still there, then the end
    finally:
        stop.set()
        owner_side.shutdown(socket.SHUT_RDWR)
        owner_side.close()
        worker.join()
        for sock in (client_side, client, owner):
            sock.close()
