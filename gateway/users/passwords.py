"""argon2id password hashes (argon2-cffi). Hashing runs in a worker thread, a few at a time.

Parameters follow OWASP's argon2id recommendation (19 MiB, 2 passes, 1 lane): a login costs tens of
milliseconds of one core and 19 MiB, and :class:`Passwords` runs at most ``concurrency`` of them at once,
so a burst of logins cannot exhaust the server's memory.
"""

from __future__ import annotations

import asyncio
import os

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

TIME_COST = 2
MEMORY_COST_KIB = 19 * 1024
PARALLELISM = 1


def make_hasher() -> PasswordHasher:
    return PasswordHasher(time_cost=TIME_COST, memory_cost=MEMORY_COST_KIB, parallelism=PARALLELISM, type=Type.ID)


class Passwords:
    def __init__(self, concurrency: int | None = None) -> None:
        self._hasher = make_hasher()
        self._slots = asyncio.Semaphore(concurrency or os.cpu_count() or 2)
        self._dummy_hash: str | None = None

    def hash_now(self, password: str) -> str:
        """Blocking: for the CLI, which has no event loop to keep responsive."""
        return self._hasher.hash(password)

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, password)

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
            try:
                return await asyncio.to_thread(self._hasher.verify, password_hash, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True
