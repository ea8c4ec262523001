"""S3 backend on aiobotocore: ``s3://bucket/prefix`` seen as a directory tree.

Directories over flat keys: a directory exists where a zero-byte marker ``dir/`` exists or any key starts
with ``dir/``; the user's root always exists. MKD writes the marker and RMD removes it (only from an empty
directory). A name can be a file and a directory at once (written by other tools): it counts as a file.

Downloads (``download.py``): ranged GetObjects read ahead, several at once, delivered in order. Uploads
(``upload.py``): nothing is visible until the upload commits. APPE and REST+STOR keep the old bytes up
to the offset with UploadPartCopy (``copy.copy_head``), or by re-uploading a head under 5 MiB (S3's smallest
part). Listings are in ``listing.py``, copies and renames in ``copy.py``, the client and error table in
``client.py`` and ``errors.py``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aioftp import Connection
from aioftp.pathio import universal_exception

from pathio_backends.base import Download, StorageFactory, TransactionalPathIO, Upload, check_name
from pathio_backends.digests import DIGESTS, hash_stream
from pathio_backends.facts import FactMove, ObjectFact
from pathio_backends.resources import BackendResources
from pathio_backends.s3.client import (
    MAX_KEY_BYTES,
    META_MTIME,
    META_SHA256,
    MIN_PART,
    S3Context,
    dir_stat,
    etag_of,
    file_stat,
    format_mtime,
    metadata_mtime,
    metadata_sha256,
)
from pathio_backends.s3.copy import copy_head, copy_object, head_object, rename_prefix
from pathio_backends.s3.download import open_download
from pathio_backends.s3.listing import S3Lister
from pathio_backends.s3.upload import S3Upload, first_error
from pathio_backends.tasks import with_timeout
from pathio_backends.uri import S3Location


class S3PathIO(TransactionalPathIO):
    def __init__(
        self,
        timeout: float | int | None = None,
        connection: Connection | None = None,
        state: Any = None,
        *,
        ctx: S3Context,
        base: Path,
    ) -> None:
        super().__init__(timeout=timeout, connection=connection, state=state)
        self.ctx = ctx
        self.base = base

    # -- keys ------------------------------------------------------------------------------------------

    def _key(self, path: Path) -> str:
        """``/s3:bucket/prefix/a/b`` -> ``prefix/a/b``; the root is the prefix itself (without its slash)."""
        check_name(path)
        try:
            relative = path.relative_to(self.base)
        except ValueError:
            raise PermissionError(errno.EACCES, "path outside the user's root", str(path)) from None
        key = self.ctx.prefix + "/".join(relative.parts)
        if len(key.encode()) + 1 > MAX_KEY_BYTES:
            raise OSError(errno.ENAMETOOLONG, "S3 keys are at most 1024 bytes", str(path))
        return key

    def _is_root(self, path: Path) -> bool:
        return path == self.base

    def _dir_prefix(self, path: Path) -> str:
        return self.ctx.prefix if self._is_root(path) else self._key(path) + "/"

    # -- queries ---------------------------------------------------------------------------------------

    async def _has_keys_under(self, prefix: str) -> bool:
        response = await self.ctx.call("list_objects_v2", Prefix=prefix, MaxKeys=1)
        return bool(response.get("KeyCount"))

    async def _file_stat(self, path: Path) -> os.stat_result | None:
        if self._is_root(path):
            return None
        head = await head_object(self.ctx, self._key(path))
        if head is None:
            return None
        return file_stat(head["ContentLength"], head.get("LastModified"), metadata_mtime(head.get("Metadata", {})))

    async def _is_dir(self, path: Path) -> bool:
        return self._is_root(path) or await self._has_keys_under(self._dir_prefix(path))

    async def _probe(self, path: Path) -> os.stat_result | None:
        """A file's stat, or a directory's, or None: a HEAD and a one-key listing, sent at the same time."""
        if self._is_root(path):
            return dir_stat()
        try:
            async with asyncio.TaskGroup() as group:
                file = group.create_task(self._file_stat(path))
                directory = group.create_task(self._has_keys_under(self._dir_prefix(path)))
        except BaseExceptionGroup as exc:
            raise first_error(exc) from None
        return file.result() or (dir_stat() if directory.result() else None)

    @universal_exception
    @with_timeout
    async def is_dir(self, path: Path) -> bool:
        # One request (a one-key listing) instead of the HEAD and the listing of a probe.
        cached = self._listed_stat(path)
        if cached is not None:
            return stat.S_ISDIR(cached.st_mode)
        return await self._is_dir(path)

    @universal_exception
    @with_timeout
    async def is_file(self, path: Path) -> bool:
        # One request (a HEAD).
        cached = self._listed_stat(path)
        if cached is not None:
            return stat.S_ISREG(cached.st_mode)
        return await self._file_stat(path) is not None

    @universal_exception
    @with_timeout
    async def file_size(self, path: Path) -> int | None:
        # One request (a HEAD): a directory in the way is found when the upload begins.
        cached = self._listed_stat(path)
        if cached is not None:
            return cached.st_size if stat.S_ISREG(cached.st_mode) else None
        st = await self._file_stat(path)
        return None if st is None else st.st_size

    def list(self, path: Path) -> AsyncIterator[Path]:
        return S3Lister(self.ctx, path, self._dir_prefix, self._remember_listed, timeout=self.timeout)

    # -- changes ---------------------------------------------------------------------------------------

    @universal_exception
    @with_timeout
    async def mkdir(self, path: Path, *, parents: bool = False, exist_ok: bool = False) -> None:
        self._forget_listed()
        await self._mkdir(path, parents=parents, exist_ok=exist_ok)

    async def _mkdir(self, path: Path, *, parents: bool, exist_ok: bool) -> None:
        existing = await self._probe(path)
        if existing is not None:
            if exist_ok and stat.S_ISDIR(existing.st_mode):
                return
            raise FileExistsError(errno.EEXIST, "file exists", str(path))
        if not await self._is_dir(path.parent):
            if not parents:
                raise FileNotFoundError(errno.ENOENT, "no such directory", str(path.parent))
            await self._mkdir(path.parent, parents=True, exist_ok=True)
        await self.ctx.call("put_object", Key=self._dir_prefix(path), Body=b"", **self.ctx.write_args)

    @universal_exception
    @with_timeout
    async def rmdir(self, path: Path) -> None:
        self._forget_listed()
        if self._is_root(path):
            raise PermissionError(errno.EPERM, "the root directory cannot be removed", str(path))
        prefix = self._dir_prefix(path)
        response = await self.ctx.call("list_objects_v2", Prefix=prefix, MaxKeys=2)
        keys = [item["Key"] for item in response.get("Contents", [])]
        if not keys:
            if await self._file_stat(path) is not None:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(path))
        if keys != [prefix]:
            raise OSError(errno.ENOTEMPTY, "directory not empty", str(path))
        await self.ctx.call("delete_object", Key=prefix)

    @universal_exception
    @with_timeout
    async def unlink(self, path: Path) -> None:
        self._forget_listed()
        if await self._file_stat(path) is None:
            if await self._is_dir(path):
                raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
        key = self._key(path)
        await self.ctx.call("delete_object", Key=key)
        await self.ctx.facts.forget([key])

    @universal_exception
    async def rename(self, source: Path, destination: Path) -> Path:
        # No path timeout: renaming a large directory takes as long as its copies (each bounded by botocore).
        self._forget_listed()
        if self._is_root(source) or self._is_root(destination):
            raise PermissionError(errno.EPERM, "the root directory cannot be renamed", str(source))
        if not await self._is_dir(destination.parent):
            # S3 would take any key; a file system (and so the client) expects the directory to exist.
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(destination.parent))
        old, new = self._key(source), self._key(destination)
        head = await head_object(self.ctx, old)
        if head is not None:
            etag = await copy_object(self.ctx, old, new, head)
            await self.ctx.call("delete_object", Key=old)
            await self.ctx.facts.move([FactMove(old, etag_of(head), new, etag)])
            return destination
        if not await self._is_dir(source):
            raise FileNotFoundError(errno.ENOENT, "no such file or directory", str(source))
        await rename_prefix(self.ctx, self._dir_prefix(source), self._dir_prefix(destination))
        return destination

    # -- file facts ------------------------------------------------------------------------------------

    async def digest(self, path: Path, algorithm: str) -> str:
        """SHA-256 is looked up where the upload left it (the object's metadata, or the facts store for a
        multipart upload) and otherwise computed from the object once and remembered for its ETag."""
        if algorithm != "sha256":
            return await self._stream_digest(path, algorithm, None)
        key = self._key(path)
        head = await head_object(self.ctx, key)
        if head is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
        stored = metadata_sha256(head.get("Metadata", {}))
        if stored is not None:
            return stored
        etag = etag_of(head)
        fact = await self.ctx.facts.valid(key, etag)
        if fact is not None and fact.sha256:
            return fact.sha256
        value = await self._stream_digest(path, algorithm, head)
        await self.ctx.facts.record(key, ObjectFact(etag=etag, sha256=value, mtime=fact.mtime if fact else None))
        return value

    async def _stream_digest(self, path: Path, algorithm: str, head: dict[str, Any] | None) -> str:
        """Read the object through the hash (bounded memory); with ``head``, only while it is at that ETag."""
        key = self._key(path)
        hasher = DIGESTS[algorithm]()
        etag = str(head["ETag"]) if head is not None else None
        download = await open_download(self.ctx, key, 0, etag=etag, ranged=False)
        try:
            await hash_stream(download.read, hasher)
        finally:
            await download.close()
        return hasher.hexdigest()

    async def set_mtime(self, path: Path, mtime: float) -> None:
        """MFMT: the time goes into the object's metadata (a copy onto itself, as S3 cannot change metadata in
        place) and into the facts store, from which listings take it without a HEAD per entry. No path
        timeout: the copy takes as long as the object is large (each request is bounded by botocore)."""
        self._forget_listed()
        key = self._key(path)
        head = await head_object(self.ctx, key)
        if head is None:
            if await self._is_dir(path):
                raise OSError(errno.EOPNOTSUPP, "directories on S3 have no modification time", str(path))
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
        metadata = dict(head.get("Metadata", {}))
        metadata[META_MTIME] = format_mtime(mtime)
        fact = await self.ctx.facts.valid(key, etag_of(head))
        if fact is not None and fact.sha256 and META_SHA256 not in metadata:
            metadata[META_SHA256] = fact.sha256  # now it can travel with the object
        etag = await copy_object(self.ctx, key, key, head, metadata)
        sha256 = metadata_sha256(metadata)
        await self.ctx.facts.record(key, ObjectFact(etag=etag, sha256=sha256, mtime=mtime))

    # -- transfers -------------------------------------------------------------------------------------

    async def _begin_upload(self, path: Path, *, offset: int, append: bool) -> Upload:
        if self._is_root(path):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        key = self._key(path)
        if not await self._is_dir(path.parent):
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(path.parent))
        if await self._has_keys_under(key + "/"):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        head = await head_object(self.ctx, key) if offset or append else None
        size = int(head["ContentLength"]) if head is not None else 0
        if append:
            offset = size
        elif offset > size:
            raise OSError(errno.EINVAL, "restart offset beyond the end of the file", str(path))
        upload = S3Upload(self.ctx, key)
        if offset and head is not None:
            try:
                await self._keep_head(upload, key, offset, str(head["ETag"]))
            except BaseException:
                await upload.abort()  # what a cancelled or failed head made (a multipart upload) goes too
                raise
        return upload

    async def _keep_head(self, upload: S3Upload, key: str, offset: int, etag: str) -> None:
        """The first ``offset`` bytes of the object, as the new upload's start: copied by S3 from 5 MiB on,
        re-uploaded below (S3's smallest part)."""
        if offset >= MIN_PART:
            await copy_head(upload, key, offset, etag)
            return
        response = await self.ctx.call("get_object", Key=key, Range=f"bytes=0-{offset - 1}", IfMatch=etag)
        async with response["Body"] as body:
            await upload.write(await body.read())

    async def _begin_download(self, path: Path, *, offset: int) -> Download:
        key = self._key(path)
        try:
            return await open_download(self.ctx, key, offset)
        except FileNotFoundError as exc:
            if await self._is_dir(path):
                raise IsADirectoryError(errno.EISDIR, "is a directory", str(path)) from exc
            raise


class S3Storage(StorageFactory):
    """``s3://bucket`` or ``s3://bucket/prefix``: the user sees the keys under the prefix."""

    def __init__(self, uri: str, location: S3Location, resources: BackendResources) -> None:
        self.uri = uri
        self.ctx = S3Context(
            resources.s3_settings,
            resources.s3,
            resources.facts,
            location.bucket,
            location.prefix,
            resources.observer,
        )
        self.base_path = Path("/", f"s3:{location.bucket}", *[p for p in location.prefix.split("/") if p])
        self._checked = False

    async def prepare(self, *, create: bool) -> None:
        """The bucket must exist and be reachable (checked at the first login); a prefix needs no creating."""
        if not self._checked:
            await self.ctx.call("head_bucket")
            self._checked = True

    def __call__(
        self,
        timeout: float | int | None = None,
        connection: Connection | None = None,
        state: Any = None,
    ) -> S3PathIO:
        return S3PathIO(timeout=timeout, connection=connection, state=state, ctx=self.ctx, base=self.base_path)
