"""argon2id password hashes (argon2-cffi). Hashing runs in the threads of one small pool, a few at a time.

Parameters follow OWASP's argon2id recommendation (19 MiB, 2 passes, 1 lane): a login costs tens of
milliseconds of one core and 19 MiB, and :class:`Passwords` runs at most ``concurrency`` of them at once,
so a burst of logins cannot exhaust the server's memory.

The trap this module avoids: through asyncio's default executor a verification could land on any of its
threads (up to 32), and glibc keeps a freed 19 MiB block in the freeing thread's arena once its dynamic mmap
threshold has risen above it, so each of those threads ended up holding 19 MiB for good. Here the hashing
has threads of its own, as many as may hash at once, and :func:`unmap_large_blocks` (called once when a
server starts) makes blocks that large come from ``mmap`` and go back to the system when freed.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import platform
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

TIME_COST = 2
MEMORY_COST_KIB = 19 * 1024
PARALLELISM = 1

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks of this size and more are mmapped, and unmapped when freed: argon2id's 19 MiB is above it, the 1 MiB
# transfer blocks and the first S3 parts (8 MiB) below it, so they keep being reused from the heap.
LARGE_BLOCK = 16 * 1024 * 1024


def make_hasher() -> PasswordHasher:
    return PasswordHasher(time_cost=TIME_COST, memory_cost=MEMORY_COST_KIB, parallelism=PARALLELISM, type=Type.ID)


def unmap_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Have glibc's malloc serve blocks of ``threshold`` bytes and more from ``mmap`` for the rest of the process,
    so that they return to the system when freed; False where this is not glibc (nothing is changed there).

    By default glibc raises its mmap threshold to the size of the largest mmapped block freed so far (up to
    32 MiB): after the first argon2id verification, its 19 MiB come from the heap of the thread that hashes and
    stay there. Setting the threshold turns that adjustment off, so the trim threshold (how much free memory a
    heap keeps at its top) is set too, to twice the mmap threshold, which is where glibc's own adjustment would
    have put it: smaller blocks are reused as before. The setting is for the whole process and the same for
    every server in it.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * threshold))


class Passwords:
    """Hashes and checks passwords. Its threads start with the first hash and end with :meth:`close`."""

    def __init__(self, concurrency: int | None = None) -> None:
        self._hasher = make_hasher()
        self.concurrency = concurrency or os.cpu_count() or 2
        # The semaphore holds back what the pool cannot start at once: a client that leaves while waiting for
        # a slot costs nothing, while a job queued in the pool itself would still be run.
        self._slots = asyncio.Semaphore(self.concurrency)
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="ftp-password")
        self._dummy_hash: str | None = None
        # argon2id verifications run (unknown users' included): the work a password cache saves, for tests and
        # metrics.
        self.verifications = 0

    def close(self) -> None:
        """Wait for the hashes under way (each a few tens of ms) and end the threads."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def hash_now(self, password: str) -> str:
        """Blocking: for the CLI, which has no event loop to keep responsive."""
        return self._hasher.hash(password)

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """True if ``password`` matches. With no hash (unknown user) the same work is done and False returned,
        so the reply time does not tell which user names exist."""
        if password_hash is None:
            if self._dummy_hash is None:
                self._dummy_hash = await self.hash(os.urandom(16).hex())
            await self._verify(self._dummy_hash, password)
            return False
        return await self._verify(password_hash, password)

    async def _verify(self, password_hash: str, password: str) -> bool:
        async with self._slots:
            self.verifications += 1
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._check, password_hash, password)

    def _check(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True
