from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import DatabaseSettings
from gateway.users.db import create_engine, upgrade
from tests.helpers import GatewayThread, gateway_settings, running, scratch_postgres


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayThread]:
    """A gateway on 127.0.0.1 with users in SQLite and files under tmp_path/data/<user>."""
    with running(gateway_settings(tmp_path)) as gw:
        yield gw


async def _migrate(url: str) -> None:
    engine = create_engine(DatabaseSettings(url=url))
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The user database, once on SQLite and once on the PostgreSQL server (schema already migrated)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'users.db'}"
        return
    with scratch_postgres() as url:
        asyncio.run(_migrate(url))
        yield url


@pytest.fixture
def db_gateway(tmp_path: Path, database_url: str) -> Iterator[GatewayThread]:
    with running(gateway_settings(tmp_path, database_url)) as gw:
        yield gw
