"""The process a gateway runs in: its event loop (uvloop where it is available) and its open-files limit.

Both are process-wide, so they are set where a process starts (``ftp-gateway serve``, a worker process, a test's
gateway thread) and never at import time.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

EventLoopChoice = Literal["auto", "uvloop", "asyncio"]
# Descriptors kept aside for what is not a session: the database and S3 pools, logs, the listeners.
RESERVED_DESCRIPTORS = 256
# What one transfer holds besides its control connection: passive listener, data connection, file, splice pipe.
DESCRIPTORS_PER_TRANSFER = 5


def loop_factory(choice: EventLoopChoice) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for "uvloop", and for "auto" where it is installed (Linux, macOS); None: asyncio's own."""
    if choice == "asyncio" or (choice == "auto" and sys.platform == "win32"):
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: EventLoopChoice) -> T:
    """``asyncio.run`` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def loop_name() -> str:
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit (an idle session holds one descriptor,
    10,000 of them need more than the usual soft limit of 1,024); returns the limit before and now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or (hard != resource.RLIM_INFINITY and hard <= soft):
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        logger.warning("open files limit stays at %d (hard limit %d): %s", soft, hard, exc)
        return soft, soft
    return soft, hard


def open_files_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def connections_for(open_files: int, passive_ports: int) -> int:
    """How many control connections fit in ``open_files`` descriptors: one each, after what every passive port's
    transfer and the server itself hold."""
    return max(1, open_files - RESERVED_DESCRIPTORS - DESCRIPTORS_PER_TRANSFER * passive_ports)
