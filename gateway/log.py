"""Logging: each record carries the session it belongs to (its id, the client's address, the user), as text for
people or as one JSON object per line for a log collector (``log.format``).

The session is a :class:`LogContext` in a contextvar, set at the start of every command handler (aioftp's
dispatcher starts each command's task from its own context, so a value set in one command would not reach the
next); transfer workers started from a handler inherit it. Records from threads (pump, S3 client) have none.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class LogContext:
    """Who a log line or an audit event is about: the session's short id, the client, the user (the USER name
    tried before PASS)."""

    session_id: str = "-"
    client_host: str = ""
    client_port: int = 0
    user: str | None = None

    def describe(self) -> str:
        """``host:port user``: the text format's look."""
        if not self.client_host:
            return "-"
        return f"{self.client_host}:{self.client_port} {self.user or '-'}"


def shown_name(name: str, limit: int = 64) -> str:
    """A user name a client sent (up to a line, 64 KiB), for a log line or an audit event: at most ``limit``
    characters, then ``…``."""
    return name if len(name) <= limit else name[:limit] + "…"


NO_SESSION = LogContext()
# Set at the start of every command handler; transfer workers started from it inherit the value.
log_context: ContextVar[LogContext] = ContextVar("ftp_gateway_session", default=NO_SESSION)


class SessionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = log_context.get()
        record.session = context.describe()
        record.session_id = context.session_id
        record.client_ip = context.client_host or None
        record.user = context.user
        return True


FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(session)s] %(message)s"


def utc_timestamp(seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds: ``2026-12-01T13:14:13.123Z``."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: a traceback is one string field (``exception``), never lines of
    its own that a collector would take for records."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "session": getattr(record, "session_id", "-"),
            "client_ip": getattr(record, "client_ip", None),
            "user": getattr(record, "user", None),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def resolve_format(choice: Literal["auto", "json", "text"]) -> Literal["json", "text"]:
    """``auto``: json when stderr is not a terminal (a container, a service manager), text when it is."""
    if choice == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return choice


def configure(level: str, format: Literal["auto", "json", "text"] = "auto") -> None:
    """Log to stderr at ``level`` in ``format``; aioftp's per-command debug lines only at ``debug``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SessionFilter())
    handler.setFormatter(JsonFormatter() if resolve_format(format) == "json" else logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # aiohttp's access log would log every probe.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if level != "debug":
        # aioftp logs every connection at INFO; our own lines say the same with the user attached.
        logging.getLogger("aioftp").setLevel(logging.WARNING)
