"""The one place where an exception becomes an FTP reply.

aioftp's dispatcher answers ``PathIOError`` with ``451 file system error`` and ends the whole session on any
other exception. Every handler and every transfer worker of :class:`gateway.server.GatewayServer` runs
under :func:`command_errors` or :func:`transfer_errors`, which unwrap the backend's error, look it up in
:data:`REPLIES` and answer; the session goes on. Nothing else in ``gateway/`` catches storage errors.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aioftp

logger = logging.getLogger(__name__)


class DataConnectionError(ConnectionError):
    """The data connection failed or closed in mid-transfer (RFC 959: 426)."""


class NoDataConnection(ConnectionError):
    """No data connection could be made for a transfer: the client never connected, or active mode failed (425)."""


class SessionNotResumed(NoDataConnection):
    """A TLS data connection that did not resume the control connection's TLS session, with ``tls.session_reuse``
    on (RFC 4217: 522, as vsftpd's ``require_ssl_reuse`` answers): it may come from someone else."""


class RestartOffsetError(OSError):
    """REST pointed past the end of the file (RFC 3659: 554)."""

    def __init__(self, offset: int, size: int) -> None:
        super().__init__(errno.EINVAL, f"restart offset {offset} is beyond the end of the file ({size} bytes)")


class QuotaExceeded(OSError):
    """An upload would take the user past its byte or file quota (RFC 959: 552, also after a 150)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EDQUOT, message)


class QuotaUnavailable(Exception):
    """The user's usage could not be read from the database before an upload (451: try again)."""


# Looked up in this order: our own exception types, then the errno of an OSError, then builtin types.
_OWN: tuple[tuple[type[BaseException], str, str], ...] = (
    (RestartOffsetError, "554", "Invalid REST parameter."),
    (SessionNotResumed, "522", "TLS data connection refused: it must resume the control connection's TLS session."),
    (NoDataConnection, "425", "Can't open data connection."),
    (DataConnectionError, "426", "Connection closed; transfer aborted."),
    (QuotaExceeded, "552", "Exceeded storage allocation (quota)."),
    (QuotaUnavailable, "451", "Quota check failed; try again later."),
)
_BY_ERRNO: dict[int, tuple[str, str]] = {
    errno.ENOTEMPTY: ("550", "Directory not empty."),
    errno.ENAMETOOLONG: ("553", "File name too long."),
    errno.EINVAL: ("553", "File name not allowed."),
    errno.EPERM: ("550", "Operation not permitted."),
    errno.ENOSPC: ("452", "Insufficient storage space."),
    errno.EDQUOT: ("452", "Quota exceeded."),
    errno.EFBIG: ("452", "File too large."),
    errno.EMSGSIZE: ("452", "File too large."),
    errno.EROFS: ("550", "Storage is read-only."),
    errno.EOPNOTSUPP: ("550", "Not supported by this storage."),
    errno.ENXIO: ("451", "Storage unavailable; try again later."),
    errno.ECONNREFUSED: ("451", "Storage unavailable; try again later."),
    errno.EHOSTUNREACH: ("451", "Storage unavailable; try again later."),
    errno.ENETUNREACH: ("451", "Storage unavailable; try again later."),
    errno.EBUSY: ("451", "Storage busy; try again later."),
    errno.EAGAIN: ("451", "File changed during the operation; try again."),
    errno.EIO: ("451", "Storage error; try again later."),
}
_BY_TYPE: tuple[tuple[type[BaseException], str, str], ...] = (
    (FileNotFoundError, "550", "No such file or directory."),
    (FileExistsError, "550", "File exists."),
    (NotADirectoryError, "550", "Not a directory."),
    (IsADirectoryError, "550", "Is a directory."),
    (PermissionError, "550", "Permission denied."),
    (TimeoutError, "451", "Storage timed out; try again."),
)
FALLBACK = ("451", "Local error in processing.")
# 5xx replies that stay as they are after a 150: RFC 4217 names 522 for a data connection whose TLS failed,
# RFC 959 (4.2) 552 for a STOR past the storage allocation (a quota).
AFTER_PRELIMINARY = frozenset({"522", "552"})


def _lookup(exc: BaseException) -> tuple[str, str] | None:
    for kind, code, text in _OWN:
        if isinstance(exc, kind):
            return code, text
    if isinstance(exc, OSError) and exc.errno in _BY_ERRNO:
        return _BY_ERRNO[exc.errno]
    for kind, code, text in _BY_TYPE:
        if isinstance(exc, kind):
            return code, text
    return None


def unwrap(exc: BaseException) -> BaseException:
    """The backend's own exception inside aioftp's ``PathIOError`` (which may wrap another ``PathIOError``)."""
    while isinstance(exc, aioftp.PathIOError) and exc.reason is not None and exc.reason[1] is not None:
        exc = exc.reason[1]
    return exc


def reply_for(exc: BaseException, *, transfer: bool = False) -> tuple[str, str, bool]:
    """``(code, text, expected)``; ``expected`` is False for the fallback, whose traceback is worth logging.

    After a ``150`` has gone out only transfer replies fit (RFC 959), so 5xx answers become ``451`` (but for
    :data:`AFTER_PRELIMINARY`).
    """
    found = _lookup(unwrap(exc))
    expected = found is not None
    code, text = found or FALLBACK
    if transfer and code.startswith("5") and code not in AFTER_PRELIMINARY:
        code, text = "451", "Transfer failed: " + text[0].lower() + text[1:]
    return code, text, expected


def _log(exc: BaseException, code: str, expected: bool, command: str) -> None:
    inner = unwrap(exc)
    if expected:
        logger.warning(
            "%s failed: %s %s (errno %s, path %s) %s",
            command,
            code,
            type(inner).__name__,
            getattr(inner, "errno", None),
            getattr(inner, "filename", None),
            getattr(inner, "strerror", None) or inner,
        )
    else:
        logger.error("%s failed: %s %r", command, code, inner, exc_info=inner)


Handler = Callable[[aioftp.Connection, Any], Awaitable[bool]]


def command_errors(name: str, handler: Handler) -> Handler:
    """Wrap a command handler (as registered in ``commands_mapping``) so its errors become replies."""

    @functools.wraps(handler)
    async def guarded(connection: aioftp.Connection, rest: Any) -> bool:
        try:
            return await handler(connection, rest)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            answer(connection, exc, name)
            return True

    return guarded


async def transfer_errors(connection: aioftp.Connection, verb: str, transfer: Awaitable[None]) -> None:
    """Await what a transfer does after its 150 reply; an error becomes a 4xx reply (only those fit after a 150).

    Cancellation (ABOR, a dropped session) passes through to aioftp's ``@worker``, which answers 426 + 226.
    """
    try:
        await transfer
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        answer(connection, exc, verb, transfer=True)


def answer(connection: aioftp.Connection, exc: BaseException, command: str, *, transfer: bool = False) -> None:
    """Log ``exc`` once and answer it with its reply (``transfer``: after a 150, see :func:`reply_for`)."""
    code, text, expected = reply_for(exc, transfer=transfer)
    _log(exc, code, expected, command.upper())
    connection.response(code, text)
