"""Test helpers: a real gateway on a loopback port in its own thread, scratch PostgreSQL databases, and the
rule that a missing real dependency fails the run under CI=true instead of skipping."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway import runtime
from gateway.config import Settings, load_settings
from gateway.server import GatewayServer, running_gateway
from gateway.users.passwords import Passwords
from gateway.users.store import UserInfo

T = TypeVar("T")
IN_CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_URL = os.environ.get("FTP_GATEWAY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
MiB = 1024 * 1024


def missing(what: str) -> None:
    """A real dependency of a test is absent: fail under CI (``.ci/run`` must have installed it), else skip."""
    if IN_CI:
        pytest.fail(f"{what} is missing; .ci/run must provide it", pytrace=False)
    pytest.skip(f"{what} is missing")


class WaitTimeout(AssertionError):
    """What :func:`wait_until` raises when its condition did not come true in time."""


def wait_until(condition: Callable[[], T], *, timeout: float, what: str, interval: float = 0.01) -> T:
    """Call ``condition`` until it returns a truthy value, which is returned; after ``timeout`` seconds raise
    AssertionError naming ``what`` and the last value seen. The pause between calls starts at ``interval`` and
    doubles up to 0.1 s (or ``interval``, if that is longer); the condition is asked once more at the deadline."""
    deadline = time.monotonic() + timeout
    longest = max(interval, 0.1)
    while True:
        value = condition()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(f"gave up after {timeout} s waiting for {what}; last seen: {value!r}")
        time.sleep(min(interval, remaining))
        interval = min(interval * 2, longest)


def stop_server(process: subprocess.Popen[str]) -> None:
    """Stop an ``ftp-gateway serve`` process a test started: SIGTERM (it drains, its workers with it), and SIGKILL
    of it and of its workers only if it has not ended after 30 s. A SIGKILL of ``serve --workers N`` alone would
    leave its workers running after the test."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=30)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        with open(f"/proc/{process.pid}/task/{process.pid}/children") as listing:
            workers = [int(child) for child in listing.read().split()]
    except FileNotFoundError:
        workers = []
    for pid in (process.pid, *workers):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"the {name!r} command")
    assert path is not None
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def free_passive_range(width: int = 50) -> tuple[int, int]:
    """A random passive range below the kernel's ephemeral ports, which outgoing connections (curl, moto,
    the S3 client) take: a port in both could be busy when a test needs it."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    low = random.SystemRandom().randrange(10000, ephemeral_low - width)
    return low, low + width - 1


S3_BUCKET = "ftp-gateway-test"
S3_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


def gateway_settings(
    tmp_path: Path, database_url: str | None = None, *, s3_endpoint: str | None = None, **overrides: Any
) -> Settings:
    """Settings for a test gateway: files under tmp_path/data/<user>, or in the test bucket when given the
    endpoint of a moto server."""
    low, high = free_passive_range()
    storage = f"s3://{S3_BUCKET}/users/{{username}}" if s3_endpoint else f"file://{tmp_path / 'data'}/{{username}}"
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "database": {"url": database_url or f"sqlite:///{tmp_path / 'users.db'}"},
        "storage": {"default_uri": storage},
        "s3": {"endpoint_url": s3_endpoint, **S3_CREDENTIALS} if s3_endpoint else {},
        "passive": {"port_min": low, "port_max": high},
        "limits": {"failed_login_delay": 0},
        "timeouts": {"data_connection": 10, "socket": 10},
        # Never the default 127.0.0.1:9090, which two gateways at once would both want.
        "admin": {"listen": "127.0.0.1:0"},
        "log": {"audit": "off"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    return load_settings(None, values)


class LocalFiles:
    """What a local-disk gateway stored, looked at on the disk."""

    def __init__(self, settings: Settings) -> None:
        self.template = settings.storage.default_uri.removeprefix("file://")

    def root(self, user: str) -> Path:
        return Path(self.template.replace("{username}", user))

    def files(self, user: str) -> dict[str, bytes]:
        root = self.root(user)
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    def put(self, user: str, relative: str, data: bytes) -> None:
        path = self.root(user) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def makedirs(self, user: str, relative: str) -> None:
        (self.root(user) / relative).mkdir(parents=True, exist_ok=True)

    def pending_uploads(self, user: str) -> list[str]:
        from pathio_backends.base import RESERVED_PREFIX

        return sorted(p.name for p in self.root(user).rglob("*") if p.name.startswith(RESERVED_PREFIX))

    def close(self) -> None:
        pass


class S3Files:
    """What an S3 gateway stored, looked at with boto3 over HTTP in the test bucket."""

    def __init__(self, settings: Settings) -> None:
        import boto3

        self.template = settings.storage.default_uri.removeprefix(f"s3://{S3_BUCKET}/")
        secret = settings.s3.secret_access_key
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.s3.endpoint_url,
            aws_access_key_id=settings.s3.access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            region_name=settings.s3.region,
        )

    def prefix(self, user: str) -> str:
        return self.template.replace("{username}", user) + "/"

    def files(self, user: str) -> dict[str, bytes]:
        prefix = self.prefix(user)
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    body = self.client.get_object(Bucket=S3_BUCKET, Key=item["Key"])["Body"]
                    found[item["Key"][len(prefix) :]] = body.read()
                    body.close()
        return found

    def put(self, user: str, relative: str, data: bytes) -> None:
        self.client.put_object(Bucket=S3_BUCKET, Key=self.prefix(user) + relative, Body=data)

    def makedirs(self, user: str, relative: str) -> None:
        self.client.put_object(Bucket=S3_BUCKET, Key=self.prefix(user) + relative.strip("/") + "/", Body=b"")

    def pending_uploads(self, user: str) -> list[str]:
        response = self.client.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=self.prefix(user))
        return sorted(upload["Key"] for upload in response.get("Uploads", []))

    def close(self) -> None:
        self.client.close()


class GatewayThread:
    """A gateway started with :func:`running_gateway` on its own event loop, as a separate process would be."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend = "s3" if settings.storage.default_uri.startswith("s3://") else "local"
        self.files: LocalFiles | S3Files = S3Files(settings) if self.backend == "s3" else LocalFiles(settings)
        self.server: GatewayServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="gateway", daemon=True)

    def _main(self) -> None:
        try:
            runtime.run(self._serve(), self.settings.event_loop)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with running_gateway(self.settings) as server:
            self.server = server
            self._ready.set()
            await self._stop.wait()

    def start(self) -> GatewayThread:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError("gateway did not start") from self._error
        return self

    def stop(self) -> None:
        self.files.close()
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self._thread.is_alive():
            raise RuntimeError("gateway did not stop")
        if self._error is not None:
            raise self._error

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_port

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def call(self, make: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
        """Run a coroutine on the gateway's loop (the only loop its objects may be used from)."""
        assert self._loop is not None

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def add_user(self, name: str, password: str = "secret", **options: Any) -> UserInfo:
        password_hash = Passwords().hash_now(password)
        assert self.server is not None
        store = self.server.user_manager.store
        return self.call(lambda: store.add(name, password_hash, **options))

    def root_of(self, name: str) -> Path:
        assert isinstance(self.files, LocalFiles), "a local-disk gateway"
        return self.files.root(name)

    def wait_for_no_pending_uploads(self, name: str, timeout: float = 10) -> None:
        """An aborted upload is cleaned up just after the client got its error reply; wait for that."""
        pending: list[str] = []

        def none_pending() -> bool:
            pending[:] = self.files.pending_uploads(name)
            return not pending

        try:
            wait_until(none_pending, timeout=timeout, what=f"{name}'s aborted uploads to be cleaned up")
        except WaitTimeout as exc:
            raise AssertionError(f"uploads left behind: {pending}") from exc

    def sessions_of(self, name: str) -> int:
        assert self.server is not None
        manager = self.server.user_manager

        async def count() -> int:
            return manager.sessions(name)

        return self.call(count)

    def wait_for_sessions(self, name: str, expected: int, timeout: float = 10) -> None:
        """The server counts a session's end just after the client saw 221; wait until it has."""
        counted: list[int] = []

        def settled() -> bool:
            counted[:] = [self.sessions_of(name)]
            return counted[0] == expected

        try:
            wait_until(settled, timeout=timeout, what=f"{name} to have {expected} sessions")
        except WaitTimeout as exc:
            raise AssertionError(f"{name} still has {counted[0]} sessions, expected {expected}") from exc


@contextmanager
def running(settings: Settings) -> Iterator[GatewayThread]:
    gateway = GatewayThread(settings).start()
    try:
        yield gateway
    finally:
        gateway.stop()


# -- S3 (moto over HTTP) ------------------------------------------------------------------------------------


def reset_moto(endpoint: str) -> None:
    import urllib.request

    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")  # noqa: S310 - http from the fixture
    with urllib.request.urlopen(request, timeout=10):  # noqa: S310
        pass


def moto_client(endpoint: str) -> Any:
    """A boto3 S3 client of the moto server at ``endpoint``, with the tests' credentials (close it after use)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_CREDENTIALS["access_key_id"],
        aws_secret_access_key=S3_CREDENTIALS["secret_access_key"],
        region_name=S3_CREDENTIALS["region"],
    )


def create_test_bucket(endpoint: str) -> None:
    client = moto_client(endpoint)
    try:
        client.create_bucket(Bucket=S3_BUCKET)
    finally:
        client.close()


# -- PostgreSQL --------------------------------------------------------------------------------------------


async def _admin(sql: str) -> None:
    import asyncpg

    dsn = POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://")
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@contextmanager
def scratch_postgres() -> Iterator[str]:
    """A new, empty database on the test server; dropped afterwards."""
    name = "ftp_gateway_test_" + secrets.token_hex(6)
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, no such database: all mean no server
        missing(f"PostgreSQL at {POSTGRES_URL} ({exc!r})")
    base, _, _ = POSTGRES_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
