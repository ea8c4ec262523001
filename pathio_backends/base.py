"""What every backend shares: explicit uploads and downloads, and aioftp's path-io contract built on them.

The gateway's handlers use the explicit lifecycle, one owner from start to end::

    upload = await path_io.begin_upload(path, offset=0, append=False)   # 550 now, not after the 150
    try:
        await upload.write(block)                                        # ... as the data arrives
        await upload.commit()                                            # the file appears, whole
    finally:
        await upload.abort()                                             # nothing, once committed

``begin_download(path, offset=...)`` gives a :class:`Download` to ``read`` and ``close`` the same way.

aioftp's contract (``open``/``read``/``write``/``seek``/``close``, ``list``, ``stat``, ...) is kept on top of the same
uploads and downloads, so aioftp's own handlers, and anyone who uses a backend as an aioftp path-io, get what
``aioftp.PathIO`` gives: errors at ``open`` (a missing file or parent, a directory), ``list()`` of a missing path or
of a file yields nothing, a file method called with the ``open()`` context instead of its file is a ValueError.
Deviations, each on purpose:

* aioftp's ``AsyncPathIOContext.__aexit__`` ignores the exception it is given and always awaits ``close()``; a
  backend that published an upload in ``close()`` would publish a truncated file after ABOR or a dropped client.
  So an upload is published when its ``async with path_io.open(...)`` block ends without an exception, or by
  ``await path_io.commit(file)``; ``close()`` alone discards it (also in aioftp's "boring" style).
* ``r+b`` with ``seek(n)`` (REST + STOR) keeps the first ``n`` bytes and replaces everything after them: the old
  tail is dropped, as a resumed upload sends the rest of the file (vsftpd does the same).
* A file opened for writing seeks only before its first write (``r+b``), or to 0 (``wb``).
* Listings come sorted by name, without the temporary files of uploads in progress.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import io
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aioftp import AbstractPathIO, Connection
from aioftp.pathio import AsyncPathIOContext, defend_file_methods, universal_exception

from pathio_backends.digests import DIGESTS, hash_fd, hash_stream
from pathio_backends.tasks import run_to_completion, with_timeout

# Name of an upload in progress on local disk; hidden from listings and refused as a client's file name.
RESERVED_PREFIX = ".ftp-gateway-upload."


def check_name(path: Path) -> None:
    """Refuse names no backend can store faithfully (NUL) and the names reserved for uploads in progress."""
    text = os.fspath(path)
    if "\x00" in text:
        raise OSError(errno.EINVAL, "file name contains a NUL byte", text)
    if path.name.startswith(RESERVED_PREFIX):
        raise OSError(errno.EINVAL, "file name is reserved", text)


class Upload(abc.ABC):
    """An upload in progress (from :meth:`TransactionalPathIO.begin_upload`): nothing is visible until
    :meth:`commit`, and :meth:`abort` leaves no trace. Exactly one of the two takes effect, so the owner calls
    ``abort()`` in a ``finally``: after a commit it does nothing. Each call is bounded by the path timeout."""

    def __init__(self) -> None:
        self.state: Literal["open", "committed", "aborted"] = "open"
        self.timeout: float | None = None

    async def write(self, data: bytes) -> None:
        self._check_open()
        async with asyncio.timeout(self.timeout):
            await self._write(data)

    async def commit(self) -> None:
        """Publish the upload: the new content replaces the old one at once (an empty upload is an empty file).
        If this fails or is cancelled half-way, the upload stays open for ``abort()``."""
        self._check_open()
        async with asyncio.timeout(self.timeout):
            await self._commit()
        self.state = "committed"

    async def abort(self) -> None:
        """Discard the upload; it runs to its end even when the caller is cancelled meanwhile (ABOR, a dropped
        session), since that is when it is needed."""
        if self.state == "open":
            self.state = "aborted"
            await run_to_completion(self._abort())

    def fileno(self) -> int | None:
        """A descriptor the caller may write the rest of the upload to with blocking calls, or None."""
        return None

    def _check_open(self) -> None:
        if self.state != "open":
            raise ValueError(f"upload already {self.state}")

    @abc.abstractmethod
    async def _write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def _commit(self) -> None: ...

    @abc.abstractmethod
    async def _abort(self) -> None: ...


class Download(abc.ABC):
    """A file being read (from :meth:`TransactionalPathIO.begin_download`): ``read`` until it returns nothing,
    then ``close``. Reads are bounded by the path timeout; ``close`` runs to its end even when cancelled."""

    def __init__(self, offset: int) -> None:
        self.position = offset
        self.timeout: float | None = None

    async def read(self, size: int = -1) -> bytes:
        async with asyncio.timeout(self.timeout):
            data = await self._read(size)
        self.position += len(data)
        return data

    async def close(self) -> None:
        await run_to_completion(self._close())

    def fileno(self) -> int | None:
        """A descriptor the caller may read with blocking calls (positioned reads only), or None."""
        return None

    @abc.abstractmethod
    async def _read(self, size: int) -> bytes: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...


@dataclass(eq=False)
class FileHandle:
    """What aioftp's ``open()`` returns: the file's upload or download, begun at ``open`` (``r+b``: at the first
    write, after the ``seek`` that gives its offset)."""

    path: Path
    mode: str
    offset: int = 0
    written: int = 0
    upload: Upload | None = None
    download: Download | None = None


class TransactionalContext(AsyncPathIOContext):
    """``async with path_io.open(path, "wb") as f:`` commits when the block succeeds and discards otherwise."""

    pathio: TransactionalPathIO  # type: ignore[assignment]
    file: FileHandle  # type: ignore[assignment]

    async def __aexit__(self, exc_type: type[BaseException] | None, *args: Any) -> None:
        if self.close is None:
            return
        try:
            if exc_type is None and self.file.mode != "rb":
                await self.pathio.commit(self.file)
        finally:
            await self.pathio.close(self.file)


class TransactionalPathIO(AbstractPathIO[Path]):
    """A backend: :meth:`begin_upload` and :meth:`begin_download` for the gateway's transfers, aioftp's contract
    for everything else. A backend implements ``_probe``, ``_begin_upload``, ``_begin_download``, ``list`` and the
    changes (``mkdir``, ``rmdir``, ``unlink``, ``rename``); the stat cache lets the ``exists``/``stat`` calls made for
    each listed entry be answered from what the listing returned."""

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

    # -- what a backend provides -----------------------------------------------------------------------

    @abc.abstractmethod
    async def _probe(self, path: Path) -> os.stat_result | None:
        """The stat of what ``path`` names, or None if nothing is there (or it is not the user's to see)."""

    @abc.abstractmethod
    async def _begin_upload(self, path: Path, *, offset: int, append: bool) -> Upload:
        """Start an upload to ``path`` keeping the first ``offset`` bytes of the old file (all of them if append).
        If cancelled half-way, it releases what it made."""

    @abc.abstractmethod
    async def _begin_download(self, path: Path, *, offset: int) -> Download: ...

    # -- the explicit lifecycle ------------------------------------------------------------------------

    @with_timeout
    async def begin_upload(self, path: Path, *, offset: int = 0, append: bool = False) -> Upload:
        """Start an upload (see the module docstring); a path that cannot be written fails here."""
        check_name(path)
        self._forget_listed()
        upload = await self._begin_upload(path, offset=offset, append=append)
        upload.timeout = self.timeout
        return upload

    @with_timeout
    async def begin_download(self, path: Path, *, offset: int = 0) -> Download:
        """Start reading a file from ``offset``; a missing file or a directory fails here."""
        check_name(path)
        download = await self._begin_download(path, offset=offset)
        download.timeout = self.timeout
        return download

    async def digest(self, path: Path, algorithm: str) -> str:
        """The hex digest (an algorithm of ``digests.DIGESTS``) of a file, computed off the event loop with
        bounded memory: from a descriptor in a worker thread where the backend has one, else streamed.
        Not bounded by the path timeout as a whole: it takes as long as reading the file."""
        hasher = DIGESTS[algorithm]()
        download = await self.begin_download(path)
        try:
            fd = download.fileno()
            if fd is None:
                await hash_stream(download.read, hasher)
            else:
                await hash_fd(fd, 0, hasher)
        finally:
            await download.close()
        return hasher.hexdigest()

    @universal_exception
    @with_timeout
    async def file_size(self, path: Path) -> int | None:
        """The size of the regular file at ``path``, or None where there is none (nothing, or a directory): what
        an upload would replace, asked before it starts. A backend may answer it more cheaply than ``stat``."""
        st = await self._cached_probe(path)
        return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None

    async def set_mtime(self, path: Path, mtime: float) -> None:
        """MFMT: set a file's modification time (seconds since the epoch, UTC)."""
        raise OSError(errno.EOPNOTSUPP, "modification times cannot be set on this storage", str(path))

    async def chmod(self, path: Path, mode: int) -> None:
        """SITE CHMOD: storage without modes (S3) takes it as a no-op, so clients that chmod after each upload
        do not fail."""

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

    def forget_listed(self) -> None:
        """Drop what the last listing told: the next query asks the storage (what a count is taken from must
        not be up to ``LISTING_CACHE_SECONDS`` old)."""
        self._forget_listed()

    async def _cached_probe(self, path: Path) -> os.stat_result | None:
        cached = self._listed_stat(path)
        return cached if cached is not None else await self._probe(path)

    # -- aioftp's contract: queries --------------------------------------------------------------------

    @universal_exception
    @with_timeout
    async def exists(self, path: Path) -> bool:
        return await self._cached_probe(path) is not None

    @universal_exception
    @with_timeout
    async def is_dir(self, path: Path) -> bool:
        st = await self._cached_probe(path)
        return st is not None and stat.S_ISDIR(st.st_mode)

    @universal_exception
    @with_timeout
    async def is_file(self, path: Path) -> bool:
        st = await self._cached_probe(path)
        return st is not None and stat.S_ISREG(st.st_mode)

    @universal_exception
    @with_timeout
    async def stat(self, path: Path) -> os.stat_result:
        st = await self._cached_probe(path)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "no such file or directory", str(path))
        return st

    @abc.abstractmethod
    def list(self, path: Path) -> AsyncIterator[Path]: ...

    # -- aioftp's contract: files ----------------------------------------------------------------------

    def open(self, *args: Any, **kwargs: Any) -> AsyncPathIOContext:
        return TransactionalContext(self, args, kwargs)  # type: ignore[arg-type]

    @universal_exception
    async def _open(self, path: Path, mode: str = "rb") -> FileHandle:  # type: ignore[override]
        if mode not in self.MODES:
            raise ValueError(f"unsupported mode {mode!r}")
        file = FileHandle(path=path, mode=mode)
        if mode == "rb":
            file.download = await self.begin_download(path)
        elif mode == "r+b":
            check_name(path)
            found = await self._probe(path)
            if found is None:
                raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
            if stat.S_ISDIR(found.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        else:
            file.upload = await self.begin_upload(path, append=mode == "ab")
        return file

    @universal_exception
    @defend_file_methods
    async def seek(self, file: FileHandle, offset: int, whence: int = io.SEEK_SET) -> int:  # type: ignore[override]
        if whence != io.SEEK_SET or offset < 0:
            raise io.UnsupportedOperation("only an absolute, non-negative seek is supported")
        if file.mode == "rb":
            if file.download is not None and file.download.position != offset:
                download, file.download = file.download, None
                await download.close()
            file.offset = offset
        elif file.mode == "r+b" and file.upload is None:
            file.offset = offset
        elif not (file.mode == "wb" and offset == file.written == 0):
            raise io.UnsupportedOperation("a file being written seeks only before its first write (r+b)")
        return offset

    @universal_exception
    @defend_file_methods
    async def write(self, file: FileHandle, data: bytes) -> int:  # type: ignore[override]
        upload = await self._upload_of(file)
        await upload.write(data)
        file.written += len(data)
        return len(data)

    @universal_exception
    @defend_file_methods
    async def read(self, file: FileHandle, block_size: int = -1) -> bytes:  # type: ignore[override]
        if file.mode != "rb":
            raise io.UnsupportedOperation("file opened for writing")
        if file.download is None:
            file.download = await self.begin_download(file.path, offset=file.offset)
        return await file.download.read(block_size)

    @universal_exception
    @defend_file_methods
    async def commit(self, file: FileHandle) -> None:
        """Publish what was written to a file opened for writing (what leaving ``async with`` does)."""
        await (await self._upload_of(file)).commit()

    @universal_exception
    @defend_file_methods
    async def close(self, file: FileHandle) -> None:  # type: ignore[override]
        """Release the file; an upload that was not committed is discarded."""
        if file.upload is not None:
            await file.upload.abort()
        if file.download is not None:
            download, file.download = file.download, None
            await download.close()

    async def _upload_of(self, file: FileHandle) -> Upload:
        if file.mode == "rb":
            raise io.UnsupportedOperation("file opened for reading")
        if file.upload is None:
            file.upload = await self.begin_upload(file.path, offset=file.offset)
        return file.upload


class StorageFactory(abc.ABC):
    """aioftp's ``path_io_factory`` for one storage URI, plus what the server needs to know of it."""

    uri: str
    # What aioftp joins the virtual path onto (``User.base_path``); backends receive such paths.
    base_path: Path

    @abc.abstractmethod
    def __call__(
        self,
        timeout: float | int | None = None,
        connection: Connection | None = None,
        state: Any = None,
    ) -> TransactionalPathIO: ...

    @abc.abstractmethod
    async def prepare(self, *, create: bool) -> None:
        """Make sure the root exists (creating it if ``create``); raise FileNotFoundError if it does not."""
