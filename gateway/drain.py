"""Graceful drain on SIGTERM (or SIGINT): stop taking sessions, let running transfers finish, then stop.

What happens, in order (README, "Stopping: the drain"):

1. The control listener is closed at once, so a new connection is refused here and the load balancer (or another
   replica, or another worker on the same port) takes it; ``server.draining`` turns True, which ``/readyz`` reports
   as 503, and the ``ftp_gateway_draining`` gauge 1.
2. Every session without a running transfer is told ``421`` and closed, after the command it is running, if any
   (``ControlConnection.parse_command`` hands it the :data:`gateway.commands.control.DRAIN` pseudo-command). A
   session with a transfer keeps it: the transfer may finish and send its ``226``, then the session gets ``421``
   and is closed. A command that would start a transfer (:data:`REFUSED_WHILE_DRAINING`) gets ``421``.
3. After ``timeouts.drain`` seconds, or at a second signal, the transfers still running are cancelled, which
   is ABOR's path: an upload's ``finally`` aborts it (no partial file, no pending multipart upload), the client
   gets ``426`` and then ``421``. Sessions still open a moment later (a long HASH, a client that does not read)
   get ``421`` written directly and are cut by ``Server.close``. The process then exits 0.

The trap this avoids: closing everything at once on SIGTERM (aioftp's ``Server.close``) cancels uploads that had
seconds to go, on every rolling restart.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aioftp

if TYPE_CHECKING:
    from gateway.commands.base import CommandBase
    from gateway.session import SessionState

logger = logging.getLogger(__name__)

# Commands that would start a transfer or prepare a data connection for one: 421 while draining.
REFUSED_WHILE_DRAINING = frozenset(
    {"retr", "stor", "stou", "appe", "list", "nlst", "mlsd", "pasv", "epsv", "port", "eprt"}
)
# After the transfers are cancelled, how long sessions have to take their 426 and 421 and close.
CLOSE_GRACE = 2.0


def refuse_transfer(connection: aioftp.Connection, session: SessionState) -> bool:
    """Answer a command that would start a transfer while the server drains; the session ends unless a transfer
    of its own still runs (its end closes the session)."""
    connection.response("421", "Server shutting down; no new transfers. Closing control connection.")
    return bool(session.transfers)


async def drain(server: CommandBase, cut_short: asyncio.Event) -> None:
    """Drain ``server`` (see the module's docstring) for up to ``timeouts.drain`` seconds, less if ``cut_short``
    is set; returns once no session is left or all were cut."""
    timeout = server.settings.timeouts.drain
    running = sum(len(session.transfers) for session in server.sessions.values())
    logger.info(
        "draining: %d sessions open, %d transfers running; new connections refused; transfers have %g s to finish",
        len(server.sessions),
        running,
        timeout,
    )
    server.server.close()  # the listening socket only: accepted connections stay open
    if server.implicit_server is not None:
        server.implicit_server.close()
    server.draining = True
    server.metrics.draining.set(1)
    if not server.sessions:
        server.sessions_closed.set()
    for session in list(server.sessions.values()):
        session.wake()
    if not await _first(server.sessions_closed, cut_short, timeout):
        logger.info("drain: %s; aborting what is left", "second signal" if cut_short.is_set() else "time is up")
        aborted = await _abort_transfers(server)
    else:
        aborted = 0
    if not await _first(server.sessions_closed, None, CLOSE_GRACE):
        _tell_the_rest(server)
    logger.info(
        "drained: %d transfers finished, %d aborted; %d sessions cut",
        max(0, server.transfers_ended_draining - aborted),
        aborted,
        len(server.sessions),
    )


async def _first(done: asyncio.Event, cut_short: asyncio.Event | None, seconds: float) -> bool:
    """True once ``done`` is set; False after ``seconds`` or once ``cut_short`` is set."""
    waits = [asyncio.ensure_future(done.wait())]
    if cut_short is not None:
        waits.append(asyncio.ensure_future(cut_short.wait()))
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    return done.is_set()


async def _abort_transfers(server: CommandBase) -> int:
    """Cancel every running transfer (ABOR's path, so each cleans up after itself) and wait until they have.

    Each upload's abort is bounded by ``timeouts.path`` (an S3 abort that fails goes to the janitor), so the wait
    is too.
    """
    server.aborting_transfers = True
    tasks = [task for session in server.sessions.values() for task in session.transfers]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=server.settings.timeouts.path + CLOSE_GRACE)
    return len(tasks)


def _tell_the_rest(server: CommandBase) -> None:
    """421 written straight onto the sessions still open, before ``Server.close`` cuts them: their reply queue may
    be stuck behind a command that will not end in time. A transport sends what it holds before it closes."""
    for writer in list(server.sessions):
        if not writer.is_closing():
            try:
                writer.write(b"421 Server shutting down; closing control connection.\r\n")
            except RuntimeError:
                pass  # its session has just ended: FIN sent after its last reply (aioftp_compat.defer_close)
