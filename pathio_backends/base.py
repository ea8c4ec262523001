"""What every backend shares: the factory interface, uploads that commit or abort, and a listing's stat cache.

aioftp's ``AsyncPathIOContext.__aexit__`` ignores the exception it is given and always awaits ``close()``.
A backend that published an upload in ``close()`` would publish a truncated file after ABOR or a dropped
client. Here ``open()`` returns a context that *commits* only when its block ends without an exception, and
``close()`` of an upload that was not committed *aborts* it: nothing partial is ever visible.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import functools
import hashlib
import io
import os
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, Self, TypeVar

from aioftp import AbstractPathIO, Connection
from aioftp.pathio import AsyncPathIOContext, universal_exception

if TYPE_CHECKING:
    from gateway.config import Settings
    from pathio_backends import BackendResources

T = TypeVar("T")
P = ParamSpec("P")

# Name of an upload in progress on local disk; hidden from listings and refused as a client's file name.
RESERVED_PREFIX = ".ftp-gateway-upload."
# Bytes hashed per worker-thread hop when a digest is computed from a stream.
HASH_BATCH = 8 * 1024 * 1024
HASH_READ = 1024 * 1024


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


class Crc32:
    """CRC-32 (zlib's, as in ZIP and Ethernet) with hashlib's interface."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes, /) -> None:
        self._value = zlib.crc32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


# Digest algorithms a backend computes (names as hashlib's); the FTP names live in gateway.commands.checksums.
DIGESTS: dict[str, Callable[[], Hasher]] = {
    "sha256": hashlib.sha256,
    "sha1": hashlib.sha1,
    "md5": hashlib.md5,
    "crc32": Crc32,
}


def update_all(hasher: Hasher, blocks: Iterable[bytes]) -> None:
    """Feed blocks to a hasher; run in a worker thread (hashlib and zlib release the GIL on large buffers)."""
    for block in blocks:
        hasher.update(block)


async def hash_stream(read: Callable[[int], Awaitable[bytes]], hasher: Hasher) -> None:
    """Hash what ``read`` returns until it returns nothing, at most :data:`HASH_BATCH` bytes held at a time;
    the hashing runs in worker threads, off the event loop."""
    pending: list[bytes] = []
    size = 0
    while block := await read(HASH_READ):
        pending.append(block)
        size += len(block)
        if size >= HASH_BATCH:
            await asyncio.to_thread(update_all, hasher, pending)
            pending, size = [], 0
    if pending:
        await asyncio.to_thread(update_all, hasher, pending)


def _hash_fd(fd: int, offset: int, hasher: Hasher, stop: threading.Event) -> None:
    while not stop.is_set():
        block = os.pread(fd, HASH_BATCH, offset)
        if not block:
            return
        hasher.update(block)
        offset += len(block)


@dataclass(frozen=True)
class ObjectFact:
    """What the gateway knows of one stored object beyond what a listing says: its SHA-256 (computed while it
    was uploaded) and a modification time set by MFMT. Valid only while the object still has ``etag``."""

    etag: str
    sha256: str | None = None
    mtime: float | None = None


class ObjectFacts(Protocol):
    """Where the facts of a storage's objects are kept (the gateway's database), keyed by container and key.
    A backend runs without one; it then answers from the objects alone."""

    async def lookup(self, container: str, keys: Sequence[str]) -> dict[str, ObjectFact]: ...

    async def record(self, container: str, key: str, fact: ObjectFact) -> None: ...

    async def move(self, container: str, moves: Sequence[tuple[str, str, str, str]]) -> None:
        """Carry facts over renames: ``(old key, old etag, new key, new etag)`` each."""

    async def forget(self, container: str, keys: Sequence[str]) -> None: ...


def with_timeout(
    method: Callable[Concatenate[Any, P], Awaitable[T]],
) -> Callable[Concatenate[Any, P], Awaitable[T]]:
    """Bound a method by its object's ``timeout`` (aioftp's ``path_timeout``), like aioftp's ``with_timeout``.

    aioftp's version uses ``asyncio.wait_for``, which on Python 3.11 swallows a cancellation that arrives as the
    awaited call completes: an ABOR during a steady upload could be lost. ``asyncio.timeout`` does not.
    """

    @functools.wraps(method)
    async def bounded(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> T:
        async with asyncio.timeout(self.timeout):
            return await method(self, *args, **kwargs)

    return bounded


async def run_to_completion(coro: Awaitable[T]) -> T:
    """Await ``coro`` to its end even if the caller is cancelled meanwhile, then re-raise the cancellation.

    Cleanup (closing a file, aborting an upload) must not be cut short by the very ABOR or disconnect
    that triggered it.
    """
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


def check_name(path: Path) -> None:
    """Refuse names no backend can store faithfully (NUL) and the names reserved for uploads in progress."""
    text = os.fspath(path)
    if "\x00" in text:
        raise OSError(errno.EINVAL, "file name contains a NUL byte", text)
    if path.name.startswith(RESERVED_PREFIX):
        raise OSError(errno.EINVAL, "file name is reserved", text)


class Upload(abc.ABC):
    """An upload in progress: nothing is visible until :meth:`commit`; :meth:`abort` leaves no trace."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def commit(self) -> None: ...

    @abc.abstractmethod
    async def abort(self) -> None: ...

    def fileno(self) -> int | None:
        """A descriptor the caller may write the rest of the upload to with blocking calls, or None."""
        return None


class Download(abc.ABC):
    @abc.abstractmethod
    async def read(self, size: int) -> bytes: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    def fileno(self) -> int | None:
        """A descriptor the caller may read with blocking calls (positioned reads only), or None."""
        return None


@dataclass(eq=False)
class FileHandle:
    """What ``_open`` returns: the transfer starts on the first read or write, so a ``seek`` may come first."""

    path: Path
    mode: str
    offset: int = 0
    upload: Upload | None = None
    download: Download | None = None
    finished: bool = False

    @property
    def writing(self) -> bool:
        return self.mode != "rb"


class TransactionalContext(AsyncPathIOContext):
    """``async with path_io.open(path, "wb") as f:`` commits when the block succeeds and aborts otherwise."""

    pathio: TransactionalPathIO  # type: ignore[assignment]
    file: FileHandle  # type: ignore[assignment]

    async def __aexit__(self, exc_type: type[BaseException] | None, *args: Any) -> None:
        if self.close is None:
            return
        try:
            if exc_type is None and self.file.writing:
                await self.pathio.commit(self.file)
        finally:
            await run_to_completion(self.pathio.close(self.file))


class Entered:
    """An ``open()`` context that was entered elsewhere, for an ``async with`` that only has to leave it."""

    def __init__(self, context: AsyncPathIOContext) -> None:
        self.context = context

    async def __aenter__(self) -> AsyncPathIOContext:
        return self.context

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.context.__aexit__(*exc_info)


class TransactionalPathIO(AbstractPathIO[Path]):
    """File operations of ``AbstractPathIO`` expressed as uploads that commit or abort and plain downloads.

    A backend implements :meth:`_begin_upload` and :meth:`_begin_download`; the stat cache lets ``exists``
    and ``stat`` calls that aioftp makes for each listed entry be answered from what the listing returned.
    """

    # How long a listed entry's stat answers ``exists``/``stat`` without asking the storage again.
    LISTING_CACHE_SECONDS = 5.0
    MODES = ("rb", "wb", "ab", "r+b")

    def __init__(
        self,
        timeout: float | int | None = None,
        connection: Connection | None = None,
        state: Any = None,
    ) -> None:
        super().__init__(timeout=timeout, connection=connection, state=state)
        self._listed: dict[Path, tuple[float, os.stat_result]] = {}

    # -- listing cache ---------------------------------------------------------------------------------

    def _remember_listed(self, batch: dict[Path, os.stat_result]) -> None:
        deadline = time.monotonic() + self.LISTING_CACHE_SECONDS
        self._listed = {path: (deadline, st) for path, st in batch.items()}

    def _listed_stat(self, path: Path) -> os.stat_result | None:
        entry = self._listed.get(path)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._listed.clear()
            return None
        return entry[1]

    def _forget_listed(self) -> None:
        self._listed.clear()

    # -- transfers -------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def _begin_upload(self, path: Path, *, offset: int, append: bool) -> Upload:
        """Start an upload to ``path`` keeping the first ``offset`` bytes of the old file (all of them if append)."""

    @abc.abstractmethod
    async def _begin_download(self, path: Path, *, offset: int) -> Download: ...

    def open(self, *args: Any, **kwargs: Any) -> AsyncPathIOContext:
        return TransactionalContext(self, args, kwargs)  # type: ignore[arg-type]

    @universal_exception
    async def _open(self, path: Path, mode: str = "rb") -> FileHandle:  # type: ignore[override]
        if mode not in self.MODES:
            raise ValueError(f"unsupported mode {mode!r}")
        check_name(path)
        return FileHandle(path=path, mode=mode)

    @universal_exception
    async def seek(self, file: FileHandle, offset: int, whence: int = io.SEEK_SET) -> int:  # type: ignore[override]
        if whence != io.SEEK_SET or offset < 0:
            raise io.UnsupportedOperation("only an absolute, non-negative seek is supported")
        if file.upload is not None or file.download is not None:
            raise io.UnsupportedOperation("seek after the transfer started")
        file.offset = offset
        return offset

    async def _upload(self, file: FileHandle) -> Upload:
        if not file.writing:
            raise io.UnsupportedOperation("file opened for reading")
        if file.finished:
            raise ValueError("upload already finished")
        if file.upload is None:
            self._forget_listed()
            file.upload = await self._begin_upload(file.path, offset=file.offset, append=file.mode == "ab")
        return file.upload

    @universal_exception
    @with_timeout
    async def write(self, file: FileHandle, data: bytes) -> int:  # type: ignore[override]
        upload = await self._upload(file)
        await upload.write(data)
        return len(data)

    async def _download(self, file: FileHandle) -> Download:
        if file.writing:
            raise io.UnsupportedOperation("file opened for writing")
        if file.download is None:
            file.download = await self._begin_download(file.path, offset=file.offset)
        return file.download

    @universal_exception
    @with_timeout
    async def read(self, file: FileHandle, block_size: int = -1) -> bytes:  # type: ignore[override]
        return await (await self._download(file)).read(block_size)

    @universal_exception
    @with_timeout
    async def native_fd(self, file: FileHandle) -> int | None:
        """Start the transfer and return a file descriptor for blocking I/O in a worker thread, if the backend has
        one (local disk): uploads write from the current position, downloads use positioned reads from
        ``file.offset``. The upload still commits or aborts through the ``open()`` context as usual."""
        if file.writing:
            return (await self._upload(file)).fileno()
        return (await self._download(file)).fileno()

    @universal_exception
    @with_timeout
    async def begin(self, file: FileHandle) -> None:
        """Start the upload now rather than at the first write, so that a path that cannot be written is
        refused before the client is told to send data."""
        await self._upload(file)

    @universal_exception
    @with_timeout
    async def commit(self, file: FileHandle) -> None:
        """Publish the upload: the new content replaces the old one at once. An empty upload makes an empty file."""
        upload = await self._upload(file)
        self._forget_listed()
        await upload.commit()
        # Only now: a commit that failed or was cancelled half-way leaves the upload to close(), which aborts it.
        file.finished = True

    # -- file facts ------------------------------------------------------------------------------------

    @universal_exception
    async def digest(self, path: Path, algorithm: str) -> str:
        """The hex digest (an algorithm of :data:`DIGESTS`) of a file's content, computed off the event loop
        with bounded memory: from a descriptor in a worker thread where the backend has one, else streamed.
        Not bounded by the path timeout: it takes as long as reading the file."""
        hasher = DIGESTS[algorithm]()
        async with self.open(path, "rb") as opened:
            file: FileHandle = opened.file  # type: ignore[assignment]
            fd = await self.native_fd(file)
            if fd is None:
                await hash_stream(functools.partial(self.read, file), hasher)
            else:
                await _in_thread_until_done(_hash_fd, fd, file.offset, hasher)
        return hasher.hexdigest()

    @universal_exception
    @with_timeout
    async def set_mtime(self, path: Path, mtime: float) -> None:
        """MFMT: set a file's modification time (seconds since the epoch, UTC)."""
        raise OSError(errno.EOPNOTSUPP, "modification times cannot be set on this storage", str(path))

    @universal_exception
    async def close(self, file: FileHandle) -> None:  # type: ignore[override]
        """Release the file; an upload that was not committed is aborted."""
        if file.upload is not None and not file.finished:
            file.finished = True
            await file.upload.abort()
        if file.download is not None:
            download, file.download = file.download, None
            await download.close()


async def _in_thread_until_done(
    work: Callable[[int, int, Hasher, threading.Event], None], fd: int, offset: int, hasher: Hasher
) -> None:
    """Run ``work`` in a thread; if cancelled, tell it to stop and wait for it, so the descriptor it reads is
    not closed (and perhaps reused) under it."""
    stop = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(work, fd, offset, hasher, stop))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        await run_to_completion(asyncio.wait({task}))
        raise


class StorageFactory(abc.ABC):
    """aioftp's ``path_io_factory`` for one storage URI, plus what the server needs to know of it."""

    uri: str
    # What aioftp joins the virtual path onto (``User.base_path``); backends receive such paths.
    base_path: Path

    @classmethod
    @abc.abstractmethod
    def check(cls, rest: str) -> None:
        """Raise ValueError if the URI's part after ``scheme://`` is not usable."""

    @classmethod
    @abc.abstractmethod
    def from_uri(cls, uri: str, rest: str, settings: Settings, resources: BackendResources) -> Self: ...

    @abc.abstractmethod
    def __call__(
        self,
        timeout: float | int | None = None,
        connection: Connection | None = None,
        state: Any = None,
    ) -> AbstractPathIO[Path]: ...

    @abc.abstractmethod
    async def prepare(self, *, create: bool) -> None:
        """Make sure the root exists (creating it if ``create``); raise FileNotFoundError if it does not."""


class PendingWrite:
    """At most one write in flight, so receiving the next block overlaps storing this one.

    The write runs as its own task and is never cancelled: a thread may be busy with it, and the file must
    not be closed under that thread. A cancelled caller stops *waiting*; :meth:`settle` waits for the end.
    """

    def __init__(self) -> None:
        self.task: asyncio.Future[Any] | None = None

    async def submit(self, start: Callable[[], Awaitable[Any]]) -> None:
        await self.wait()
        self.task = asyncio.ensure_future(start())

    async def wait(self) -> None:
        """Wait for the write in flight and raise its error."""
        if self.task is not None:
            await asyncio.shield(self.task)
            self.task = None

    async def settle(self) -> None:
        """Wait for the write in flight to end, ignoring its error; interrupting this wait leaves it running."""
        task = self.task
        if task is not None:
            await asyncio.wait({task})
            self.task = None
            if not task.cancelled():
                task.exception()
