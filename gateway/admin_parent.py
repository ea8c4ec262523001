"""The admin endpoint of ``serve --workers N``: the parent process serves ``admin.listen`` and answers from its
workers, each of which serves its own admin endpoint on a unix socket in a private directory.

* ``/healthz``: the parent's own (it stops every worker when one dies, so it is alive while they are).
* ``/readyz``: 200 when every worker answers its own ``/readyz`` with 200; else 503 naming each worker that is
  not ready and why. While the parent passes a SIGTERM on, 503 at once.
* ``/metrics``: every worker's metrics with a ``worker`` label (``0`` to ``N-1``), in one exposition.

Why not prometheus-client's multiprocess mode: it is switched on by an environment variable read when the library
is imported and then changes every metric of the process (module-level state, which would also reach two servers
in one test process), keeps its values in mmapped files that must be cleaned between runs, and cannot merge
callback gauges (``passive_ports_in_use``) or the process collector. Asking the workers over their sockets keeps
each worker's registry as it is, and a scrape costs N local HTTP requests.

The parent binds its TCP socket before it forks (a port in use is reported before any worker starts) and serves
it from a thread with its own event loop once the workers are ready: the parent has no event loop of its own,
and a fork must not happen while one runs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.admin import AdminListenError, ready_response
from gateway.config import parse_host_port

# A worker that does not answer within this long counts as not ready; its metrics are left out of that scrape.
WORKER_TIMEOUT = 5.0


def worker_socket(directory: Path, index: int) -> str:
    return str(directory / f"worker-{index}.sock")


def bind(listen: str) -> socket.socket:
    """The parent's listening socket for ``admin.listen`` (``HOST:PORT``); :class:`AdminListenError` if taken."""
    host, port = parse_host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise AdminListenError(f"admin endpoint cannot listen on {listen}: {reason}") from None
    return sock


class WorkersAdmin:
    """Serves ``sock`` from a thread until :meth:`stop`; ``sockets`` are the workers' admin sockets, in order."""

    def __init__(self, sock: socket.socket, sockets: list[str], stopping: Callable[[], bool]) -> None:
        self._sock = sock
        self._sockets = sockets
        self._stopping = stopping
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="admin", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host, port, *_ = self._sock.getsockname()
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self.url

    def stop(self) -> None:
        if self._thread.is_alive():
            if self._runner is not None:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        self._loop.close()
        self._sock.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def _ask(self, index: int, path: str) -> tuple[int, str]:
        connector = aiohttp.UnixConnector(path=self._sockets[index])
        timeout = aiohttp.ClientTimeout(total=WORKER_TIMEOUT)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.get(f"http://worker{path}") as response,
        ):
            return response.status, await response.text()

    async def _each(self, path: str) -> list[tuple[int, str] | BaseException]:
        return await asyncio.gather(*(self._ask(i, path) for i in range(len(self._sockets))), return_exceptions=True)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._stopping():
            return ready_response(["draining: the server is stopping"])
        problems = []
        for index, answer in enumerate(await self._each("/readyz")):
            if isinstance(answer, BaseException):
                problems.append(f"worker {index}: no answer ({type(answer).__name__})")
            elif answer[0] != 200:
                problems += [f"worker {index}: {line}" for line in answer[1].splitlines() if line]
        return ready_response(problems)

    async def _metrics(self, request: web.Request) -> web.Response:
        texts = {
            index: answer[1] for index, answer in enumerate(await self._each("/metrics")) if isinstance(answer, tuple)
        }
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Merged(texts))
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class Merged(Collector):
    """The workers' expositions as one: each family once, each sample with its worker's ``worker`` label."""

    def __init__(self, texts: dict[int, str]) -> None:
        self._texts = texts

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for index, text in sorted(self._texts.items()):
            for family in text_string_to_metric_families(text):
                target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    target.samples.append(sample._replace(labels={**sample.labels, "worker": str(index)}))
        return list(merged.values())
