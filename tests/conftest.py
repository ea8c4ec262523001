from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import DatabaseSettings
from gateway.users.db import create_engine, upgrade
from tests.helpers import (
    GatewayThread,
    create_test_bucket,
    gateway_settings,
    missing,
    reset_moto,
    running,
    scratch_postgres,
)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayThread]:
    """A gateway on 127.0.0.1 with users in SQLite and files under tmp_path/data/<user>."""
    with running(gateway_settings(tmp_path)) as gw:
        yield gw


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on a loopback port for the whole run (HTTP, as a real S3 endpoint is reached)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        missing("moto's server (pip install 'ftp-gateway[dev]')")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_endpoint(moto_server: str) -> str:
    """The moto server, emptied, with the test bucket."""
    reset_moto(moto_server)
    create_test_bucket(moto_server)
    return moto_server


@pytest.fixture(params=["local", "s3"])
def backend_gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GatewayThread]:
    """A gateway once on local disk and once on S3 (moto over HTTP)."""
    endpoint = request.getfixturevalue("s3_endpoint") if request.param == "s3" else None
    with running(gateway_settings(tmp_path, s3_endpoint=endpoint)) as gw:
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
