"""Local-disk backend on aiofiles: every file operation runs in a worker thread, never on the event loop.

Confinement: aioftp resolves ``..`` in the virtual path, but its ``PathIO`` follows any symlink it meets.
Here every path is resolved with ``realpath`` and refused when it lands outside the user's root, so a
symlink planted in the root (``ln -s / root/escape``) leads nowhere: such entries are left out of listings,
``exists`` says False and any other use is a PermissionError. Files are opened with ``O_NOFOLLOW`` after
resolution. (A local user who swaps a directory for a symlink *between* the check and the open could
still race it; FTP clients cannot create symlinks.)

Uploads go to a hidden temporary file beside the target and replace it with one ``rename`` on commit, so
an interrupted upload leaves the old file as it was and no partial file. REST+STOR and APPE first copy the
kept head of the old file into the temporary file (``copy_file_range``: in the kernel, no bytes through
Python).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import aiofiles.os
import aiofiles.threadpool
from aioftp import Connection
from aioftp.common import AbstractAsyncLister
from aioftp.pathio import universal_exception

from pathio_backends.base import (
    RESERVED_PREFIX,
    Download,
    StorageFactory,
    TransactionalPathIO,
    Upload,
    check_name,
)
from pathio_backends.tasks import PendingWrite, with_timeout
from pathio_backends.uri import FileLocation

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Entries stat'ed per worker-thread hop while listing a directory.
LIST_BATCH = 256
# A temporary upload file untouched this long belongs to no running upload (a stalled one is aborted after
# the data-connection timeout, minutes): listing its directory removes it.
STALE_UPLOAD_SECONDS = 3600
COPY_CHUNK = 64 * 1024 * 1024


def _run(func: Any) -> Any:
    """Run a blocking function of this module in a worker thread, as aiofiles does for ``os``."""
    return aiofiles.os.wrap(func)


def _nofollow_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


# Linux names what an open descriptor refers to in /proc/self/fd: the kernel's own resolution of every symlink.
_PROC_FD = "/proc/self/fd"
_O_PATH: int | None = getattr(os, "O_PATH", None)


def realpath(path: str) -> str:
    """``os.path.realpath``: on Linux one ``open(O_PATH)`` and one ``readlink`` of its /proc entry where the path
    exists, rather than a Python loop with an ``lstat`` per component (a third of a small transfer's time in the
    worker threads); ``os.path.realpath`` for a missing path and elsewhere."""
    if _O_PATH is None:
        return os.path.realpath(path)
    try:
        fd = os.open(path, _O_PATH | os.O_CLOEXEC)
    except OSError:
        return os.path.realpath(path)
    try:
        return os.readlink(f"{_PROC_FD}/{fd}")
    except OSError:
        return os.path.realpath(path)
    finally:
        os.close(fd)


class Confinement:
    """Maps the paths aioftp hands over (``base_path / virtual``) to real paths inside the root, or refuses."""

    def __init__(self, base: Path, root_real: str) -> None:
        self.base = base
        self.root = root_real
        self._prefix = root_real.rstrip(os.sep) + os.sep

    def inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self._prefix)

    def _lexical(self, path: Path) -> str:
        check_name(path)
        try:
            relative = path.relative_to(self.base)
        except ValueError:
            raise PermissionError(errno.EACCES, "path outside the user's root", str(path)) from None
        return os.path.join(self.root, relative) if relative.parts else self.root

    def resolve(self, path: Path) -> str:
        """The real path, following every symlink (blocking: call from a worker thread)."""
        real = realpath(self._lexical(path))
        if not self.inside(real):
            raise PermissionError(errno.EACCES, "path leads outside the user's root", str(path))
        return real

    def resolve_entry(self, path: Path) -> str:
        """The real path of the entry itself: its parent resolved, a final symlink not followed."""
        lexical = self._lexical(path)
        if lexical == self.root:
            raise PermissionError(errno.EPERM, "the root directory cannot be changed", str(path))
        parent = realpath(os.path.dirname(lexical))
        if not self.inside(parent):
            raise PermissionError(errno.EACCES, "path leads outside the user's root", str(path))
        real = os.path.join(parent, os.path.basename(lexical))
        if real == self.root:
            raise PermissionError(errno.EPERM, "the root directory cannot be changed", str(path))
        return real

    def visible_stat(self, real_dir: str, name: str) -> os.stat_result | None:
        """Stat of a listed entry, or None where it is hidden: our temporary files, dangling or escaping links."""
        if name.startswith(RESERVED_PREFIX):
            _remove_if_stale(os.path.join(real_dir, name))
            return None
        full = os.path.join(real_dir, name)
        try:
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                if not self.inside(realpath(full)):
                    return None
                st = os.stat(full)
        except OSError:
            return None
        return st


class LocalUpload(Upload):
    def __init__(self, file: Any, temp: str, target: str) -> None:
        super().__init__()
        self._file = file
        self._temp = temp
        self._target = target
        self._pending = PendingWrite()
        self._buffered = False

    async def _write(self, data: bytes) -> None:
        # The write of this block runs in a thread while the caller receives the next one.
        self._buffered = True
        await self._pending.submit(lambda: self._file.write(data))

    def fileno(self) -> int | None:
        if self._buffered:
            return None  # blocks went through the buffered file already; keep to one way of writing
        fd: int = self._file.fileno()
        return fd

    async def _commit(self) -> None:
        await self._pending.wait()
        await self._file.close()
        await aiofiles.os.replace(self._temp, self._target)

    async def _abort(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._pending.settle()
        except TimeoutError:
            # A write is stuck in the kernel: closing its file now could hand the descriptor to someone else.
            logger.error("a write to %s is stuck; leaving the temporary file in place", self._temp)
            return
        try:
            await self._file.close()
        except (OSError, ValueError):
            pass  # closed by a commit that failed after it
        try:
            await aiofiles.os.remove(self._temp)
        except FileNotFoundError:
            pass


class LocalDownload(Download):
    """A file read block by block in worker threads, the next block read while this one is sent. Every read is
    a task of its own, awaited by ``close`` before the file is closed: a read cancelled by ABOR goes on in its
    thread, and closing the file under it could hand its descriptor to someone else."""

    def __init__(self, file: Any, offset: int) -> None:
        super().__init__(offset)
        self._file = file
        self._reading: asyncio.Future[bytes] | None = None

    async def _read(self, size: int) -> bytes:
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._file.read(size))
        # Shielded: a cancelled reader must not lose track of the read still running in its thread.
        data: bytes = await asyncio.shield(self._reading)
        self._reading = asyncio.ensure_future(self._file.read(size)) if data and size > 0 else None
        return data

    def fileno(self) -> int | None:
        fd: int = self._file.fileno()
        return fd

    async def _close(self) -> None:
        if self._reading is not None:
            await asyncio.wait({self._reading})
            if not self._reading.cancelled():
                self._reading.exception()
            self._reading = None
        await self._file.close()


class LocalPathIO(TransactionalPathIO):
    def __init__(
        self,
        timeout: float | int | None = None,
        connection: Connection | None = None,
        state: Any = None,
        *,
        confinement: Confinement,
    ) -> None:
        super().__init__(timeout=timeout, connection=connection, state=state)
        self._jail = confinement

    # -- queries ---------------------------------------------------------------------------------------

    def _stat_or_none(self, path: Path) -> os.stat_result | None:
        try:
            return os.stat(self._jail.resolve(path))
        except (OSError, ValueError):
            return None

    async def _probe(self, path: Path) -> os.stat_result | None:
        result: os.stat_result | None = await _run(self._stat_or_none)(path)
        return result

    @universal_exception
    @with_timeout
    async def stat(self, path: Path) -> os.stat_result:
        # The real error, not only "missing": a path that leads out of the root is refused (550 Permission denied).
        cached = self._listed_stat(path)
        if cached is not None:
            return cached
        result: os.stat_result = await _run(lambda: os.stat(self._jail.resolve(path)))()
        return result

    def list(self, path: Path) -> AsyncIterator[Path]:
        return _Lister(self, path, timeout=self.timeout)

    # -- changes ---------------------------------------------------------------------------------------

    @universal_exception
    @with_timeout
    async def mkdir(self, path: Path, *, parents: bool = False, exist_ok: bool = False) -> None:
        self._forget_listed()

        def mkdir() -> None:
            real = self._jail.resolve(path)
            if parents:
                os.makedirs(real, exist_ok=exist_ok)
            else:
                try:
                    os.mkdir(real)
                except FileExistsError:
                    if not (exist_ok and os.path.isdir(real)):
                        raise

        await _run(mkdir)()

    @universal_exception
    @with_timeout
    async def rmdir(self, path: Path) -> None:
        self._forget_listed()
        await _run(lambda: os.rmdir(self._jail.resolve_entry(path)))()

    @universal_exception
    @with_timeout
    async def unlink(self, path: Path) -> None:
        self._forget_listed()

        def unlink() -> None:
            real = self._jail.resolve_entry(path)
            if os.path.isdir(real) and not os.path.islink(real):
                raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
            os.unlink(real)

        await _run(unlink)()

    @universal_exception
    @with_timeout
    async def rename(self, source: Path, destination: Path) -> Path:
        self._forget_listed()

        def rename() -> None:
            os.rename(self._jail.resolve_entry(source), self._jail.resolve_entry(destination))

        await _run(rename)()
        return destination

    @with_timeout
    async def chmod(self, path: Path, mode: int) -> None:
        """SITE CHMOD: the permission bits of a file or directory (a symlink only if it stays in the root)."""
        await _run(lambda: os.chmod(self._jail.resolve(path), mode))()

    @with_timeout
    async def set_mtime(self, path: Path, mtime: float) -> None:
        """MFMT: the modification time of a file or directory; its access time is left as it was."""
        self._forget_listed()

        def utime() -> None:
            real = self._jail.resolve(path)
            os.utime(real, ns=(os.stat(real).st_atime_ns, round(mtime * 1e9)))

        await _run(utime)()

    # -- transfers -------------------------------------------------------------------------------------

    def _prepare_upload(self, path: Path, offset: int, append: bool) -> tuple[int, str, str]:
        parent = self._jail.resolve(path.parent)
        if not os.path.isdir(parent):
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(path.parent))
        target = os.path.join(parent, path.name)
        if os.path.islink(target):
            target = self._jail.resolve(path)
        try:
            old: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            old = None
        if old is not None and stat.S_ISDIR(old.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        size = old.st_size if old is not None else 0
        if append:
            offset = size
        elif offset > size:
            raise OSError(errno.EINVAL, "restart offset beyond the end of the file", str(path))
        temp = os.path.join(os.path.dirname(target), RESERVED_PREFIX + secrets.token_hex(8))
        mode = stat.S_IMODE(old.st_mode) if old is not None else 0o666
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            if old is not None:
                os.fchmod(fd, mode)
            if offset:
                _copy_head(target, fd, offset)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        return fd, temp, target

    async def _begin_upload(self, path: Path, *, offset: int, append: bool) -> Upload:
        def open_upload() -> tuple[BinaryIO, str, str]:
            fd, temp, target = self._prepare_upload(path, offset, append)
            try:
                return os.fdopen(fd, "wb"), temp, target
            except BaseException:
                os.close(fd)
                os.unlink(temp)
                raise

        def release(opened: tuple[BinaryIO, str, str]) -> None:
            opened[0].close()
            _unlink_quietly(opened[1])

        file, temp, target = await _open_in_thread(open_upload, release)
        return LocalUpload(aiofiles.threadpool.wrap(file), temp, target)

    async def _begin_download(self, path: Path, *, offset: int) -> Download:
        def open_download() -> BinaryIO:
            file = open(self._jail.resolve(path), "rb", opener=_nofollow_opener)
            try:
                file.seek(offset)
            except BaseException:
                file.close()
                raise
            return file

        file = await _open_in_thread(open_download, lambda file: file.close())
        return LocalDownload(aiofiles.threadpool.wrap(file), offset)


async def _open_in_thread(open_: Callable[[], T], release: Callable[[T], None]) -> T:
    """Run an opening call in a worker thread. When the caller is cancelled meanwhile (ABOR, ``path_timeout``),
    the thread goes on; what it opens is then released as soon as it returns, instead of leaking."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, open_)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def late(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                loop.run_in_executor(None, release, done.result())

        future.add_done_callback(late)
        raise


def _remove_if_stale(path: str) -> None:
    """Remove a temporary upload file nobody has written to for :data:`STALE_UPLOAD_SECONDS`: one left by a
    gateway that was killed mid-upload (blocking: call from a worker thread)."""
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime > STALE_UPLOAD_SECONDS:
            os.unlink(path)
            logger.info("removed %s, left by an upload that never finished", path)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Lister(AbstractAsyncLister[Path]):
    """Lists a directory a batch at a time; each entry's stat is kept so aioftp's per-entry calls cost nothing."""

    def __init__(self, owner: LocalPathIO, path: Path, *, timeout: float | int | None) -> None:
        super().__init__(timeout=timeout)
        self._owner = owner
        self._path = path
        self._real: str | None = None
        self._names: list[str] | None = None
        self._batch: list[tuple[str, os.stat_result]] = []

    def _open(self) -> tuple[str, list[str]]:
        real = self._owner._jail.resolve(self._path)
        try:
            names = os.listdir(real)
        except (FileNotFoundError, NotADirectoryError):
            names = []  # as aioftp's PathIO, whose glob finds nothing there
        return real, sorted(names)

    def _stat_batch(self, real: str, names: list[str]) -> list[tuple[str, os.stat_result]]:
        batch = []
        for name in names:
            st = self._owner._jail.visible_stat(real, name)
            if st is not None:
                batch.append((name, st))
        return batch

    @universal_exception
    @with_timeout
    async def __anext__(self) -> Path:
        if self._names is None:
            self._owner._forget_listed()
            self._real, self._names = await _run(self._open)()
        while not self._batch:
            if not self._names:
                self._owner._forget_listed()
                raise StopAsyncIteration
            names, self._names = self._names[:LIST_BATCH], self._names[LIST_BATCH:]
            self._batch = await _run(self._stat_batch)(self._real, names)
            self._batch.reverse()
            self._owner._remember_listed({self._path / name: st for name, st in self._batch})
        name, _ = self._batch.pop()
        return self._path / name


def _copy_head(source: str, fd: int, count: int) -> None:
    """Copy the first ``count`` bytes of ``source`` to ``fd`` inside the kernel where it can."""
    src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        left = count
        while left:
            try:
                copied = os.copy_file_range(src, fd, min(left, COPY_CHUNK))
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                copied = os.write(fd, os.read(src, min(left, 1024 * 1024)))
            if copied == 0:
                raise OSError(errno.EIO, "file shrank while its head was being copied", source)
            left -= copied
    finally:
        os.close(src)


class LocalStorage(StorageFactory):
    """A directory on local disk: ``file:///absolute/path``, or ``file://./relative/path`` (from where the server
    runs)."""

    def __init__(self, uri: str, location: FileLocation) -> None:
        self.uri = uri
        self.base_path = Path(location.path)
        self._confinement: Confinement | None = None

    async def prepare(self, *, create: bool) -> None:
        def prepare() -> str:
            if create:
                os.makedirs(self.base_path, exist_ok=True)
            if not os.path.isdir(self.base_path):
                raise FileNotFoundError(errno.ENOENT, "storage root is not a directory", str(self.base_path))
            return os.path.realpath(self.base_path)

        root_real = await _run(prepare)()
        self._confinement = Confinement(self.base_path, root_real)

    def __call__(
        self,
        timeout: float | int | None = None,
        connection: Connection | None = None,
        state: Any = None,
    ) -> LocalPathIO:
        if self._confinement is None:
            raise RuntimeError("LocalStorage.prepare() must run before sessions use it")
        return LocalPathIO(timeout=timeout, connection=connection, state=state, confinement=self._confinement)
