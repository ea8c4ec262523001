from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """``cli.main`` sets the root logger's handlers as a process does (a stream on the stderr of the moment, which
    capsys closes after the test): put back what was there, so a later test's gateway threads do not log into a
    closed stream ("--- Logging error ---" in that test's stderr)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def local_gateway(tmp_path: Path) -> Iterator[GatewayThread]:
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


# Faults injected and hostile inputs thrown in this run (tests/test_faults.py, tests/test_fuzz.py), by kind;
# printed at the end. A test's counts travel on its teardown report, as the matrix's cells do (pytest-xdist).
FAULTS: Counter[str] = Counter()


@pytest.fixture
def fault_counts(request: pytest.FixtureRequest) -> Iterator[Counter[str]]:
    """Where a test counts the faults it injected; added to the run's summary."""
    counts: Counter[str] = Counter()
    yield counts
    request.node.user_properties.append(("faults", dict(counts)))


# -- the client compatibility matrix ---------------------------------------------------------------------------
# Tests marked ``matrix`` record their outcome under (client, backend); the table is printed at the end.

MATRIX: dict[tuple[str, str], str] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "matrix(client): a row of the client compatibility matrix")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A matrix test's report carries its (client, backend) cell: with pytest-xdist the report is made in a worker
    and read in the controller (``pytest_runtest_logreport``), which prints the table."""
    outcome = yield
    marker = item.get_closest_marker("matrix")
    if marker is None or call.when not in ("setup", "call"):
        return
    report = outcome.get_result()
    params = getattr(item, "callspec", None)
    values = params.params if params is not None else {}
    client = marker.kwargs.get("client") or str(values.get("client", item.name))
    backend = str(values.get("backend_gateway", values.get("backend", "local")))
    report.user_properties.append(("matrix", (client, backend)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":
        FAULTS.update(dict(report.user_properties).get("faults", {}))
    cell = dict(report.user_properties).get("matrix")
    if cell is None or report.when not in ("setup", "call"):
        return
    client, backend = cell
    if report.failed:
        MATRIX[client, backend] = "FAIL"
    elif report.skipped:
        MATRIX.setdefault((client, backend), "skipped")
    elif report.when == "call":
        MATRIX.setdefault((client, backend), "pass")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FAULTS:
        terminalreporter.write_sep("=", "faults injected and hostile inputs thrown (all survived unless a test failed)")
        terminalreporter.write_line(", ".join(f"{kind}: {count}" for kind, count in sorted(FAULTS.items())))
    if not MATRIX:
        return
    clients = sorted({client for client, _ in MATRIX})
    terminalreporter.write_sep("=", "FTP client compatibility (docs/compatibility.md)")
    terminalreporter.write_line(f"{'client':24} {'local disk':12} {'S3':12}")
    for client in clients:
        local, s3 = MATRIX.get((client, "local"), "-"), MATRIX.get((client, "s3"), "-")
        terminalreporter.write_line(f"{client:24} {local:12} {s3:12}")
