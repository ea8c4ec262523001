"""File digests for HASH and the X* commands, computed off the event loop with bounded memory.

Names are hashlib's (``sha256``, ``sha1``, ``md5``) plus ``crc32``; the FTP names live in
``gateway.commands.checksums``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import zlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from pathio_backends.tasks import run_to_completion

# Bytes hashed per worker-thread hop when a digest is computed from a stream.
HASH_BATCH = 8 * 1024 * 1024
HASH_READ = 1024 * 1024


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


class Crc32:
    """CRC-32 (zlib's, as in ZIP and Ethernet) with hashlib's interface."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes, /) -> None:
        self._value = zlib.crc32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


DIGESTS: dict[str, Callable[[], Hasher]] = {
    "sha256": hashlib.sha256,
    "sha1": hashlib.sha1,
    "md5": hashlib.md5,
    "crc32": Crc32,
}


def update_all(hasher: Hasher, blocks: Iterable[bytes]) -> None:
    """Feed blocks to a hasher; run in a worker thread (hashlib and zlib release the GIL on large buffers)."""
    for block in blocks:
        hasher.update(block)


async def hash_stream(read: Callable[[int], Awaitable[bytes]], hasher: Hasher) -> None:
    """Hash what ``read`` returns until it returns nothing, at most :data:`HASH_BATCH` bytes held at a time;
    the hashing runs in worker threads, off the event loop."""
    pending: list[bytes] = []
    size = 0
    while block := await read(HASH_READ):
        pending.append(block)
        size += len(block)
        if size >= HASH_BATCH:
            await asyncio.to_thread(update_all, hasher, pending)
            pending, size = [], 0
    if pending:
        await asyncio.to_thread(update_all, hasher, pending)


async def hash_fd(fd: int, offset: int, hasher: Hasher) -> None:
    """Hash a descriptor from ``offset`` to its end with positioned reads in a worker thread. If cancelled, the
    thread is told to stop and waited for, so the descriptor it reads is not closed (and perhaps reused) under
    it."""
    stop = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(_hash_fd, fd, offset, hasher, stop))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        await run_to_completion(asyncio.wait({task}))
        raise


def _hash_fd(fd: int, offset: int, hasher: Hasher, stop: threading.Event) -> None:
    while not stop.is_set():
        block = os.pread(fd, HASH_BATCH, offset)
        if not block:
            return
        hasher.update(block)
        offset += len(block)
