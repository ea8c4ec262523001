"""The admin HTTP endpoint (``admin.listen``): ``/healthz``, ``/readyz`` and ``/metrics``, on aiohttp's low-level
``AppRunner``, entered on ``running_gateway``'s exit stack.

* ``/healthz``: 200 while the process serves HTTP at all (a liveness probe must not depend on the database: a
  database outage would otherwise restart every replica).
* ``/readyz``: 200 when the user database answers ``SELECT 1``, the default storage is reachable
  (``pathio_backends.probe``) and the server is not draining; else 503 with one line per failed check. The
  checks' result is kept for :data:`READY_TTL` seconds and probes that come while a check runs wait for it
  (one check at a time however many probes), so probes cost nothing; draining turns it 503 at once.
* ``/metrics``: the server's own registry in Prometheus' text format.

``admin.listen`` may also be ``unix:PATH``: ``serve --workers N`` gives each worker one, and the parent process
serves the TCP address, merging theirs (``gateway.admin_parent``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.config import parse_host_port
from gateway.users.db import describe_error
from pathio_backends import BackendResources
from pathio_backends.probe import StorageUnavailable, probe_storage, template_root

logger = logging.getLogger(__name__)

READY_TTL = 1.0
# A check that takes longer fails (a probe's own timeout is usually 1 s; the next probe asks again).
CHECK_TIMEOUT = 3.0

# A check returns None when all is well, else one line saying what is wrong.
Check = Callable[[], Awaitable[str | None]]


class AdminListenError(Exception):
    """The admin endpoint cannot listen where ``admin.listen`` says; the message is one line."""


class Readiness:
    """``/readyz``'s answer: the named checks, run together, their result kept for ``ttl`` seconds."""

    def __init__(self, checks: Sequence[tuple[str, Check]], draining: Callable[[], bool], ttl: float = READY_TTL):
        self._checks = checks
        self._draining = draining
        self._ttl = ttl
        self._result: list[str] = []
        self._checked_at: float | None = None
        self._lock = asyncio.Lock()

    async def problems(self) -> list[str]:
        """What is wrong (``"database: ..."``), or nothing when ready."""
        if self._draining():
            return ["draining: the server is stopping"]
        if not self._fresh():
            async with self._lock:
                if not self._fresh():
                    self._result = await self._run()
                    self._checked_at = time.monotonic()
        return list(self._result)

    def _fresh(self) -> bool:
        return self._checked_at is not None and time.monotonic() - self._checked_at < self._ttl

    async def _run(self) -> list[str]:
        async def one(name: str, check: Check) -> str | None:
            try:
                async with asyncio.timeout(CHECK_TIMEOUT):
                    problem = await check()
            except TimeoutError:
                problem = f"no answer within {CHECK_TIMEOUT:g} s"
            except Exception as exc:  # noqa: BLE001 - a check reports, it does not fail the probe
                problem = f"{type(exc).__name__}: {exc}"
            return f"{name}: {problem}" if problem else None

        found = await asyncio.gather(*(one(name, check) for name, check in self._checks))
        problems = [problem for problem in found if problem]
        for problem in problems:
            logger.warning("not ready: %s", problem)
        return problems


def database_check(engine: AsyncEngine) -> Check:
    async def check() -> str | None:
        try:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - whatever the driver raises, it is one line for the probe
            return describe_error(exc)
        return None

    return check


def storage_check(uri: str, resources: BackendResources) -> Check:
    """The default storage where its users' storages go (``pathio_backends.probe.template_root``): a local
    directory that exists or can be made, a bucket that answers HeadBucket. Nothing to check when the bucket's
    name depends on the user."""
    root = template_root(uri)

    async def check() -> str | None:
        if root is None:
            return None
        try:
            await probe_storage(root, resources, write=False, seconds=CHECK_TIMEOUT)
        except StorageUnavailable as exc:
            return f"{root}: {exc}"
        return None

    return check


def make_app(readiness: Readiness | None, registry: CollectorRegistry | None) -> web.Application:
    """The three routes over a :class:`Readiness` and a registry (``None``: their route answers 404)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    if readiness is not None:
        app.router.add_get("/readyz", readyz_handler(readiness))
    if registry is not None:
        app.router.add_get("/metrics", metrics_handler(registry))
    return app


def readyz_handler(readiness: Readiness) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def readyz(request: web.Request) -> web.Response:
        problems = await readiness.problems()
        return ready_response(problems)

    return readyz


def ready_response(problems: Sequence[str]) -> web.Response:
    if problems:
        return web.Response(status=503, text="".join(line + "\n" for line in problems))
    return web.Response(text="ready\n")


def metrics_handler(registry: CollectorRegistry) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics


@asynccontextmanager
async def admin_endpoint(listen: str, app: web.Application) -> AsyncIterator[str | None]:
    """Serve ``app`` on ``listen`` (``HOST:PORT``, ``unix:PATH`` or ``off``) until exit; yields its URL
    (``http://127.0.0.1:9090``, the port actually bound when 0 was asked) or None when off.
    :class:`AdminListenError` when the address cannot be bound."""
    if listen == "off":
        yield None
        return
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site: web.BaseSite
        if listen.startswith("unix:"):
            path = listen.removeprefix("unix:")
            site = web.UnixSite(runner, path)
        else:
            host, port = parse_host_port(listen)
            site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise AdminListenError(f"admin endpoint cannot listen on {listen}: {reason}") from None
        yield url_of(runner, listen)
    finally:
        await runner.cleanup()


def url_of(runner: web.AppRunner, listen: str) -> str:
    if listen.startswith("unix:"):
        return listen
    host, _ = parse_host_port(listen)
    port = runner.addresses[0][1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
