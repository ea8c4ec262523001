"""Logging: each record carries the session it belongs to (``remote-host:port user``)."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

# Set at the start of every command handler; transfer workers started from it inherit the value.
session_context: ContextVar[str] = ContextVar("ftp_gateway_session", default="-")


class SessionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.session = session_context.get()
        return True


FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(session)s] %(message)s"


def configure(level: str) -> None:
    """Log to stderr at ``level``; aioftp's per-command debug lines only at ``debug``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SessionFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if level != "debug":
        # aioftp logs every connection at INFO; our own lines say the same with the user attached.
        logging.getLogger("aioftp").setLevel(logging.WARNING)
