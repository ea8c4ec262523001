"""FTPS (RFC 4217): the server's TLS context, made from the certificate files, and made again on SIGHUP.

A reload builds a fresh context and swaps it in: connections that begin afterwards get the new certificate, those
already open keep theirs. Each session keeps the context its control connection was secured with (see
``SessionState.tls``) and secures its data connections with that same one: session resumption (the proof that a
data connection comes from the holder of the control connection) works only within one context, whose session
cache and ticket keys are its own. A reload that fails (a file missing, a key that does not match) is logged, and
the old context stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, Settings, TLSSettings, open_file, parse_host_port

logger = logging.getLogger(__name__)

# TLS 1.2 suites: ECDHE key exchange and an AEAD cipher only (TLS 1.3's own suites are all of that kind).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


# The TLS 1.3 session tickets a connection set up in this context sends; None: the context's own (two).
_tickets: ContextVar[int | None] = ContextVar("ftp_gateway_tls_tickets", default=None)


class ServerContext(ssl.SSLContext):
    """An SSL context whose connections can be told to send no session tickets (:func:`without_tickets`).

    TLS 1.3 sends tickets after the handshake. A client that only uploads on a data connection never reads them,
    and its kernel, closing a socket with unread bytes, sends a reset that throws away what it had not sent yet: the
    end of the upload (curl and lftp, measured). A data connection needs no ticket (the client resumes the control
    connection's session), so none is sent there. OpenSSL copies the count into each connection when it is made
    (``SSL_new``, here in ``wrap_bio``, which asyncio and uvloop call in a callback run in the context of the task
    that started the upgrade), so setting it around that call affects no other connection."""

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        tickets = _tickets.get()
        if tickets is None:
            return super().wrap_bio(*args, **kwargs)
        saved, self.num_tickets = self.num_tickets, tickets
        try:
            return super().wrap_bio(*args, **kwargs)
        finally:
            self.num_tickets = saved


@contextmanager
def without_tickets() -> Iterator[None]:
    """TLS connections begun inside (their upgrade's task started here) send no session tickets."""
    token = _tickets.set(0)
    try:
        yield
    finally:
        _tickets.reset(token)


class TLSError(ConfigError):
    """The certificate or key cannot be used; a one-line message naming the file."""


def make_context(settings: TLSSettings) -> ssl.SSLContext:
    """A server context: TLS 1.2 or newer, forward-secret AEAD suites, no compression or renegotiation, and
    OpenSSL's server-side session cache and tickets (both on by default), which resumption needs."""
    cert_file, key_file = settings.cert_file, settings.key_file
    if cert_file is None or key_file is None:
        raise TLSError("TLS needs tls.cert_file and tls.key_file")
    for what, path in (("certificate", cert_file), ("key", key_file)):
        _readable(what, path)
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    # No stateless tickets: a resumption then names a session in the server's own cache, so the session id a data
    # connection resumes is the one it proves (with TLS 1.2 tickets a client could resume its own session under
    # another session's id, and the id crosses in clear in TLS 1.2).
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    )
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(exc) or "values mismatch" in str(exc):
            raise TLSError(f"tls.key_file {str(key_file)!r} is not the key of {str(cert_file)!r}") from None
        raise TLSError(f"cannot load tls.cert_file {str(cert_file)!r} with its key: {reason}") from None
    return context


def _readable(what: str, path: Path) -> None:
    with open_file(path, f"TLS {what} file", TLSError) as f:
        f.read(1)


def check(settings: Settings, workers: int = 1) -> None:
    """What ``serve`` checks before it starts (a :class:`TLSError`, exit 2): the files load, and an implicit
    listener shared by several workers has a fixed port (each would pick its own for port 0)."""
    if not settings.tls.enabled:
        return
    make_context(settings.tls)
    if settings.tls.implicit_listen and workers > 1 and parse_host_port(settings.tls.implicit_listen)[1] == 0:
        raise TLSError("tls.implicit_listen needs a fixed port when several workers serve (--workers 1 for port 0)")


class ServerTLS:
    """A server's TLS: the context new connections get, and its policy."""

    def __init__(self, settings: TLSSettings) -> None:
        self.settings = settings
        # What the files were when last read (taken before reading them, so a change in between is seen later).
        self.files = self._files()
        self.context = make_context(settings)

    @property
    def required(self) -> bool:
        return self.settings.required

    @property
    def session_reuse(self) -> bool:
        return self.settings.session_reuse

    def _files(self) -> tuple[tuple[int, int, int] | None, ...]:
        """Identity, time and size of the certificate and key files (following symlinks: a Kubernetes Secret
        volume swaps a symlink to a new directory)."""
        found: list[tuple[int, int, int] | None] = []
        for path in (self.settings.cert_file, self.settings.key_file):
            try:
                stat = os.stat(path) if path is not None else None
            except OSError:
                stat = None
            found.append((stat.st_ino, stat.st_mtime_ns, stat.st_size) if stat is not None else None)
        return tuple(found)

    def reload_if_changed(self) -> bool:
        """Reload when a file changed since it was last read (``tls.reload_interval``). A reload that fails is
        tried again at the next change, not at every look."""
        files = self._files()
        if files == self.files:
            return False
        return self.reload()

    def reload(self) -> bool:
        """Read the certificate files again (SIGHUP); on failure log why and keep the current context."""
        self.files = self._files()
        try:
            context = make_context(self.settings)
        except TLSError as exc:
            logger.error("TLS certificate not reloaded, the previous one stays: %s", exc)
            return False
        self.context = context
        logger.info("TLS certificate reloaded from %s", self.settings.cert_file)
        return True


@asynccontextmanager
async def watching(tls: ServerTLS, interval: float) -> AsyncIterator[None]:
    """Look at the certificate files every ``interval`` seconds while inside, and reload them when changed."""

    async def watch() -> None:
        while True:
            await asyncio.sleep(interval)
            tls.reload_if_changed()

    task = asyncio.create_task(watch(), name="tls-certificate-watch")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
