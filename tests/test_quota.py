"""Per-user quotas (issue 13 item 4) and the user columns they and the per-user TLS setting live in."""

from __future__ import annotations

import asyncio

import pytest
from alembic import command
from sqlalchemy import Connection, text

from gateway.config import DatabaseSettings
from gateway.users.db import alembic_config, create_engine, schema_revisions, upgrade
from gateway.users.store import UserStore

# -- the schema ------------------------------------------------------------------------------------------------


def _alembic(connection: Connection, action: str, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    getattr(command, action)(config, revision)


async def _migrate_from_0002(url: str) -> None:
    engine = create_engine(DatabaseSettings(url=url))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_alembic, "upgrade", "head")
            await connection.run_sync(_alembic, "downgrade", "0002")
        # A user (with a permission row, which SQLite's table copy could cascade away) made before 0003.
        async with engine.begin() as connection:
            await connection.execute(text("INSERT INTO ftp_users (name, password_hash) VALUES ('old', 'h')"))
            await connection.execute(
                text(
                    "INSERT INTO ftp_user_permissions (user_id, path, readable, writable) "
                    "SELECT id, '/', true, false FROM ftp_users WHERE name = 'old'"
                )
            )
        assert (await schema_revisions(engine))[0] == "0002"
        await upgrade(engine)
        assert (await schema_revisions(engine))[0] == "0003"
        old = await UserStore(engine).info("old")
        assert (old.tls, old.quota_bytes, old.quota_files, old.used_bytes, old.used_files) == (None, None, None, 0, 0)
        assert old.permissions == {"/": "r"}
        new = await UserStore(engine).add("new", "h", tls="required", quota_bytes=10 << 30, quota_files=5)
        assert (new.tls, new.quota_bytes, new.quota_files, new.used_bytes) == ("required", 10 << 30, 5, 0)
        # And back: the columns go, the users and their permissions stay.
        async with engine.begin() as connection:
            await connection.run_sync(_alembic, "downgrade", "0002")
        async with engine.connect() as connection:
            names = (await connection.execute(text("SELECT name FROM ftp_users ORDER BY name"))).scalars().all()
            perms = (await connection.execute(text("SELECT count(*) FROM ftp_user_permissions"))).scalar_one()
        assert (names, perms) == (["new", "old"], 2)
    finally:
        await engine.dispose()


def test_migration_0003_keeps_users_and_adds_the_columns(database_url: str) -> None:
    asyncio.run(_migrate_from_0002(database_url))


@pytest.mark.parametrize("value", ["always", ""])
def test_tls_mode_is_checked(database_url: str, value: str) -> None:
    async def main() -> None:
        engine = create_engine(DatabaseSettings(url=database_url))
        try:
            await upgrade(engine)
            with pytest.raises(ValueError, match="invalid TLS mode"):
                await UserStore(engine).add("x", "h", tls=value)
        finally:
            await engine.dispose()

    asyncio.run(main())
