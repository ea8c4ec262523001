"""What the gateway knows of stored objects beyond what the storage says of them, and where that is kept.

The S3 backend keeps an upload's SHA-256 and a time set by MFMT here (``gateway.users.facts`` stores them in
the gateway's database); a fact counts only while its object still has the ETag it was recorded for.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectFact:
    """One object's SHA-256 (computed while it was uploaded) and a modification time set by MFMT; valid only
    while the object still has ``etag``."""

    etag: str
    sha256: str | None = None
    mtime: float | None = None


class FactMove(NamedTuple):
    """An object renamed (copied, then the source deleted): its facts follow it if they were still valid."""

    old_key: str
    old_etag: str
    new_key: str
    new_etag: str


class ObjectFacts(Protocol):
    """Where the facts of a storage's objects are kept, keyed by container (bucket) and key."""

    async def lookup(self, container: str, keys: Sequence[str]) -> dict[str, ObjectFact]: ...

    async def record(self, container: str, key: str, fact: ObjectFact) -> None: ...

    async def move(self, container: str, moves: Sequence[FactMove]) -> None: ...

    async def forget(self, container: str, keys: Sequence[str]) -> None: ...


class FactsIndex:
    """One container's facts as a backend uses them: a help, never a reason to fail. Without a store, or when
    it fails (logged), there are no facts and the backend answers from the objects alone."""

    def __init__(self, store: ObjectFacts | None, container: str, scheme: str) -> None:
        self._store = store
        self._container = container
        self._where = f"{scheme}://{container}"

    async def lookup(self, keys: Sequence[str]) -> dict[str, ObjectFact]:
        if self._store is None or not keys:
            return {}
        try:
            return await self._store.lookup(self._container, keys)
        except Exception as exc:  # noqa: BLE001 - the objects stay usable without their facts
            logger.warning("could not read object facts for %s: %s", self._where, exc)
            return {}

    async def valid(self, key: str, etag: str) -> ObjectFact | None:
        """The fact of ``key`` if it was recorded for the object's current ``etag``."""
        fact = (await self.lookup([key])).get(key)
        return fact if fact is not None and fact.etag == etag else None

    async def record(self, key: str, fact: ObjectFact) -> None:
        if self._store is not None:
            await self._quietly("record", self._store.record(self._container, key, fact))

    async def move(self, moves: Sequence[FactMove]) -> None:
        if self._store is not None and moves:
            await self._quietly("move", self._store.move(self._container, moves))

    async def forget(self, keys: Sequence[str]) -> None:
        if self._store is not None and keys:
            await self._quietly("forget", self._store.forget(self._container, keys))

    async def _quietly(self, what: str, change: Awaitable[None]) -> None:
        try:
            await change
        except Exception as exc:  # noqa: BLE001 - a change the index misses makes its facts invalid, not wrong
            logger.warning("could not %s object facts for %s: %s", what, self._where, exc)
