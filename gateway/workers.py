"""``serve --workers N``: N gateway processes behind one control port, so that small-file work uses every core.

The gateway is CPU-bound on small files (a Python process uses one core), so ``serve`` forks worker processes:

* each binds the control port itself with ``SO_REUSEPORT``: the kernel spreads new connections over them;
* each gets its own slice of the passive range, so a passive port is only ever listened on by the worker that
  holds the session it belongs to;
* the parent only starts them, prints ``listening on`` once all listen, passes SIGTERM/SIGINT on as SIGTERM (each
  one: the first starts every worker's drain, a second cuts it short; the workers ignore SIGINT themselves), exits 0
  once all of them have drained, and stops all of them (exit code 1) when one dies on its own, for the service
  manager or Kubernetes to restart;
* the parent serves the admin endpoint (``admin.listen``) from the workers' own, each on a unix socket in a
  private directory (``gateway.admin_parent``): ``/readyz`` is ready when every worker is, ``/metrics`` has every
  worker's metrics with a ``worker`` label.

What a worker keeps to itself (README, "Several worker processes"): a user's ``max_sessions`` and speed limits,
the verified-password cache, and ``limits.max_connections`` (a set value is divided among the workers). The
user database and the storage are shared, so anything stored is seen by every worker at once.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
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


def worker_settings(
    settings: Settings, port: int, passive: tuple[int, int], count: int, admin_socket: str | None = None
) -> Settings:
    """One worker's settings: the control port all of them share, its passive slice, its share of a set
    ``max_connections``, its admin endpoint on ``admin_socket`` (None: none)."""
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
            "admin": settings.admin.model_copy(update={"listen": f"unix:{admin_socket}" if admin_socket else "off"}),
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
    announce: Callable[[int, str | None], None],
) -> int:
    """Fork ``count`` workers, each ``run_worker(its settings, ready)``; ``announce(port, admin URL)`` once all
    listen. Returns the exit code: 0 after a signal stopped them, 1 when one failed."""
    from gateway import admin_parent

    slices = passive_slices(settings.passive, count)
    admin_sock = admin_parent.bind(settings.admin.listen) if settings.admin.listen != "off" else None
    try:
        reserved = reserve_port(settings.listen_host, settings.listen_port)
    except OSError:
        if admin_sock is not None:
            admin_sock.close()
        raise
    admin_dir = Path(tempfile.mkdtemp(prefix="ftp-gateway-admin-")) if admin_sock is not None else None
    sockets = [admin_parent.worker_socket(admin_dir, i) for i in range(count)] if admin_dir is not None else []
    admin: admin_parent.WorkersAdmin | None = None
    port = reserved.getsockname()[1]
    ready_read, ready_write = os.pipe()
    children: dict[int, int] = {}
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _signal(pid, signal.SIGTERM)

    def reload(signum: int, frame: object) -> None:
        for pid in children:
            _signal(pid, signal.SIGHUP)  # each worker reads the certificate files again

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
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
                    if admin_sock is not None:
                        admin_sock.close()
                    os.close(ready_read)
                    own = worker_settings(settings, port, passive, count, sockets[index] if sockets else None)
                    code = _worker(index, own, run_worker, ready_write)
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
        if admin_sock is not None:
            admin = admin_parent.WorkersAdmin(admin_sock, sockets, lambda: stopping)
            admin_url: str | None = admin.start()
        else:
            admin_url = None
        announce(port, admin_url)
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
        if admin is not None:
            admin.stop()
        elif admin_sock is not None:
            admin_sock.close()
        if admin_dir is not None:
            shutil.rmtree(admin_dir, ignore_errors=True)


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
