"""The object facts store (``pathio_backends.facts.ObjectFacts``) in the gateway's database.

Shared by every replica that shares the database, so a time set by MFMT through one replica shows in a
listing through another. Each call is one short transaction; the S3 backend treats failures as "no facts".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.users.models import ObjectFactRow
from pathio_backends.facts import FactMove, ObjectFact

# Keys per query: under SQLite's 999 bound parameters of builds before 3.32 (newer ones and PostgreSQL allow
# about 32,766); a listing page of 1,000 keys takes two queries.
LOOKUP_BATCH = 900


class DatabaseObjectFacts:
    def __init__(self, engine: AsyncEngine) -> None:
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._dialect = engine.dialect.name

    async def lookup(self, container: str, keys: Sequence[str]) -> dict[str, ObjectFact]:
        async with self._sessions() as session:
            rows = await self._rows(session, container, keys)
        return {key: ObjectFact(etag=row.etag, sha256=row.sha256, mtime=row.mtime) for key, row in rows.items()}

    def _upsert(self, container: str, key: str, fact: ObjectFact) -> Any:
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        values = {"etag": fact.etag, "sha256": fact.sha256, "mtime": fact.mtime}
        statement = insert(ObjectFactRow).values(container=container, key=key, **values)
        return statement.on_conflict_do_update(index_elements=["container", "key"], set_=values)

    async def record(self, container: str, key: str, fact: ObjectFact) -> None:
        async with self._sessions.begin() as session:
            await session.execute(self._upsert(container, key, fact))

    async def move(self, container: str, moves: Sequence[FactMove]) -> None:
        if not moves:
            return
        async with self._sessions.begin() as session:
            old = await self._rows(session, container, [move[0] for move in moves])
            replaced = []
            for old_key, old_etag, new_key, new_etag in moves:
                row = old.get(old_key)
                if row is not None and row.etag == old_etag:
                    fact = ObjectFact(etag=new_etag, sha256=row.sha256, mtime=row.mtime)
                    await session.execute(self._upsert(container, new_key, fact))
                else:
                    replaced.append(new_key)  # what the destination had said no longer holds
            await self._delete(session, container, [move[0] for move in moves] + replaced)

    async def forget(self, container: str, keys: Sequence[str]) -> None:
        async with self._sessions.begin() as session:
            await self._delete(session, container, keys)

    @staticmethod
    async def _rows(session: AsyncSession, container: str, keys: Sequence[str]) -> dict[str, ObjectFactRow]:
        found: dict[str, ObjectFactRow] = {}
        for start in range(0, len(keys), LOOKUP_BATCH):
            rows = await session.execute(
                select(ObjectFactRow).where(
                    ObjectFactRow.container == container, ObjectFactRow.key.in_(keys[start : start + LOOKUP_BATCH])
                )
            )
            found.update((row.key, row) for row in rows.scalars())
        return found

    @staticmethod
    async def _delete(session: AsyncSession, container: str, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), LOOKUP_BATCH):
            await session.execute(
                delete(ObjectFactRow).where(
                    ObjectFactRow.container == container, ObjectFactRow.key.in_(keys[start : start + LOOKUP_BATCH])
                )
            )
