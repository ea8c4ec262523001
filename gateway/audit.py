"""The audit log (``log.audit``): one JSON object per line for every login, upload, download, delete, rename, mkdir
and rmdir, every client IP banned and every control connection refused (``gateway.bans``), with who (session id,
user, client IP), what (path, bytes, duration) and the result.

A writer thread owns the output, so a slow disk or a stdout nobody reads never holds up the event loop: an event
is a ``put_nowait`` on a bounded queue (events beyond :data:`QUEUE_LIMIT` waiting are dropped and counted, so a
stalled file cannot grow the gateway's memory). Each line goes out in one ``write`` (several waiting lines in one
``write``), so lines of worker processes appending to one file, or printed next to the ``listening on`` line,
never cut into each other. A file is opened in append mode and may be rotated by renaming it only if the
gateway is restarted afterwards (it keeps its descriptor).

Passwords never reach here: nothing that builds an event has one.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from types import TracebackType
from typing import Any

from gateway.log import log_context, utc_timestamp

logger = logging.getLogger(__name__)

QUEUE_LIMIT = 100_000
# At exit, how long what is queued may take to be written.
EXIT_WAIT = 5.0
EVENTS = ("login", "upload", "download", "delete", "rename", "mkdir", "rmdir", "ban", "refused")


class AuditLog:
    """``target``: ``"stdout"``, a file path (appended to) or ``"off"``. A context manager: the writer thread runs
    while it is entered, and what is queued is written before it exits."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.dropped = 0
        # The writer thread, when it was still blocked at exit (a daemon thread: it does not hold the process).
        self.stuck: threading.Thread | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_LIMIT)
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._owns_fd = False

    @property
    def enabled(self) -> bool:
        return self.target != "off"

    def __enter__(self) -> AuditLog:
        if not self.enabled:
            return self
        if self.target == "stdout":
            sys.stdout.flush()
            try:
                self._fd = sys.stdout.fileno()
            except (OSError, ValueError):  # replaced by an object without a descriptor (a test's capture)
                self._fd = 1
        else:
            self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._owns_fd = True
        self._thread = threading.Thread(target=self._write_lines, args=(self._fd,), name="audit-log", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            try:
                self._queue.put(None, timeout=EXIT_WAIT)
            except queue.Full:
                pass
            # Bounded: a stdout nobody reads (a full pipe) must not keep the process from ending.
            thread.join(EXIT_WAIT)
            if thread.is_alive():
                logger.error("audit log %s blocked: %d events not written", self.target, self._queue.qsize())
                self.stuck = thread
        if self._owns_fd and self._fd is not None and (thread is None or not thread.is_alive()):
            os.close(self._fd)
        self._fd = None
        if self.dropped:
            logger.error("%d audit events were dropped: the audit log could not be written fast enough", self.dropped)

    def event(self, event: str, **fields: Any) -> None:
        """Queue one event; the session (id, user, client IP) comes from the log context of the caller. ``user``
        may be given for a login, whose context does not name the user yet."""
        if self._thread is None:
            return
        context = log_context.get()
        line: dict[str, Any] = {
            "time": utc_timestamp(time.time()),
            "event": event,
            "session": context.session_id,
            "user": context.user,
            "client_ip": context.client_host or None,
        }
        line.update(fields)
        try:
            self._queue.put_nowait(json.dumps(line, ensure_ascii=False, default=str).encode() + b"\n")
        except queue.Full:
            self.dropped += 1

    def _write_lines(self, fd: int) -> None:
        broken = False
        while True:
            first = self._queue.get()
            lines = [first]
            while first is not None and len(lines) < 256:
                try:
                    lines.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            data = [line for line in lines if line is not None]
            if broken:
                self.dropped += len(data)
            else:
                try:
                    _write_all(fd, b"".join(data))
                except OSError as exc:
                    # Once: a closed pipe or a full disk would otherwise log an error per event.
                    logger.error("cannot write the audit log %s: %s", self.target, exc.strerror or exc)
                    broken = True
                    self.dropped += len(data)
            if None in lines:
                return


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
