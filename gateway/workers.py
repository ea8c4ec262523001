"""``serve --workers N``: N gateway processes behind one control port, so that small-file work uses every core.

The gateway is CPU-bound on small files (a Python process uses one core), so ``serve`` forks worker processes:

* each binds the control port itself with ``SO_REUSEPORT``: the kernel spreads new connections over them;
* each gets its own slice of the passive range, so a passive port is only ever listened on by the worker that
  holds the session it belongs to;
* the parent only starts them, prints ``listening on`` once all listen, passes SIGTERM/SIGINT on as SIGTERM (each
  one: the first starts every worker's drain, a second cuts it short; the workers ignore SIGINT themselves), exits 0
  once all of them have drained, and stops all of them (exit code 1) when one dies on its own, for the service
  manager or Kubernetes to restart.

What a worker keeps to itself (README, "Several worker processes"): a user's ``max_sessions`` and speed limits,
the verified-password cache, and ``limits.max_connections`` (a set value is divided among the workers). The
user database and the storage are shared, so anything stored is seen by every worker at once.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from gateway.config import PassiveSettings, Settings

if TYPE_CHECKING:
    from gateway.server import GatewayServer

logger = logging.getLogger(__name__)


class WorkersError(Exception):
    """The workers cannot be started as configured; the message is one line for the operator."""


def worker_count(requested: int | None) -> int:
    """``None`` or 0: one per CPU this process may run on."""
    if requested:
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def passive_slices(passive: PassiveSettings, count: int) -> list[tuple[int, int]]:
    """The passive range cut into ``count`` contiguous slices, as even as they go."""
    ports = passive.ports
    if len(ports) < count:
        raise WorkersError(
            f"the passive range {passive.port_min}-{passive.port_max} has {len(ports)} ports, "
            f"fewer than the {count} workers: give each worker at least one"
        )
    size, extra = divmod(len(ports), count)
    slices, start = [], ports.start
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        slices.append((start, end - 1))
        start = end
    return slices


def worker_settings(settings: Settings, port: int, passive: tuple[int, int], count: int) -> Settings:
    """One worker's settings: the control port all of them share, its passive slice, its share of a set
    ``max_connections``."""
    limits = settings.limits
    if limits.max_connections is not None:
        limits = limits.model_copy(update={"max_connections": max(1, -(-limits.max_connections // count))})
    host = settings.listen_host
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return settings.model_copy(
        update={
            "listen": listen,
            "passive": settings.passive.model_copy(update={"port_min": passive[0], "port_max": passive[1]}),
            "limits": limits,
        }
    )


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to the control address with ``SO_REUSEPORT``: it holds a port picked for
    ``:0`` until the workers have bound it too. The port is first bound without ``SO_REUSEPORT``, which fails
    when anything listens there, another gateway's workers included (they would otherwise share it silently)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve_workers(
    settings: Settings,
    count: int,
    run_worker: Callable[[Settings, Callable[[GatewayServer], Awaitable[None]]], int],
    announce: Callable[[int], None],
) -> int:
    """Fork ``count`` workers, each ``run_worker(its settings, ready)``; ``announce(port)`` once all listen.
    Returns the exit code: 0 after a signal stopped them, 1 when one failed."""
    slices = passive_slices(settings.passive, count)
    reserved = reserve_port(settings.listen_host, settings.listen_port)
    port = reserved.getsockname()[1]
    ready_read, ready_write = os.pipe()
    children: dict[int, int] = {}
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _signal(pid, signal.SIGTERM)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index, passive in enumerate(slices):
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    for signum, handler in previous.items():
                        signal.signal(signum, handler)
                    # Ctrl-C reaches the whole process group: the parent passes it on (as SIGTERM), so a worker
                    # must not count it as well, or the drain would take it for the second, aborting signal.
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    reserved.close()
                    os.close(ready_read)
                    code = _worker(index, worker_settings(settings, port, passive, count), run_worker, ready_write)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children[pid] = index
        os.close(ready_write)
        if not _wait_ready(ready_read, count, children):
            stopping = True
            return _stop(children, 1)
        reserved.close()
        announce(port)
        while children:
            pid, status = os.wait()
            index = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if not stopping:
                logger.error("worker %d (pid %d) ended with %d: stopping the others", index, pid, code)
                stopping = True
                return _stop(children, 1)
        return 0
    finally:
        reserved.close()
        os.close(ready_read)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _worker(
    index: int,
    settings: Settings,
    run_worker: Callable[[Settings, Callable[[GatewayServer], Awaitable[None]]], int],
    ready_write: int,
) -> int:
    async def ready(server: GatewayServer) -> None:
        logger.info(
            "worker %d (pid %d) serving, passive ports %d-%d",
            index,
            os.getpid(),
            settings.passive.port_min,
            settings.passive.port_max,
        )
        os.write(ready_write, b".")
        os.close(ready_write)

    return run_worker(settings, ready)


def _wait_ready(ready_read: int, count: int, children: dict[int, int]) -> bool:
    """True once every worker listens; False when one ended first (its own error message is on stderr)."""
    seen = 0
    while seen < count:
        readable, _, _ = select.select([ready_read], [], [], 0.5)
        if readable:
            got = os.read(ready_read, count)
            if not got:
                return False  # every worker closed its end: all of them are gone
            seen += len(got)
        for pid in list(children):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                children.pop(pid)
                return False
    return True


def _stop(children: dict[int, int], code: int) -> int:
    for pid in children:
        _signal(pid, signal.SIGTERM)
    for pid in list(children):
        os.waitpid(pid, 0)
        children.pop(pid)
    return code


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
