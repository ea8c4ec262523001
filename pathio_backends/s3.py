"""S3 backend on aiobotocore: ``s3://bucket/prefix`` seen as a directory tree.

Directories over flat keys: a directory exists where a zero-byte marker ``dir/`` exists or any key starts
with ``dir/``; the user's root always exists. MKD writes the marker and RMD removes it (only from an empty
directory). Listings use ListObjectsV2 with ``Delimiter='/'`` page by page, and the per-entry ``stat`` that
aioftp makes is answered from the page, so listing N entries sends N/1000 requests, not N.

Uploads: nothing is visible until the upload commits. Small files go up as one PutObject at commit; larger
ones as a multipart upload whose parts are sent while the next one is received (``s3.parts_in_flight`` at
once, so memory stays within part size x (parts in flight + 1)); CompleteMultipartUpload publishes the
object, and anything else aborts the multipart upload. APPE and REST+STOR keep the old bytes up to the
offset with UploadPartCopy (or a re-upload of a head under 5 MiB, S3's minimum part size).

One aiobotocore client (one connection pool) serves every session of the server; it is made on first use
and closed with the server (``pathio_backends.BackendResources``).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import logging
import math
import os
import re
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import unquote

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aioftp import AbstractPathIO, Connection
from aioftp.common import AbstractAsyncLister
from aioftp.pathio import universal_exception
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from pathio_backends.base import (
    DIGESTS,
    Download,
    ObjectFact,
    ObjectFacts,
    StorageFactory,
    TransactionalPathIO,
    Upload,
    check_name,
    hash_stream,
    run_to_completion,
    update_all,
    with_timeout,
)

if TYPE_CHECKING:
    from gateway.config import S3Settings, Settings
    from pathio_backends import BackendResources

logger = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1024 * 1024
MIN_PART = 5 * MiB
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000
# The part size doubles every this many parts, so 10,000 parts hold S3's largest object (5 TiB) even from
# the smallest part size: 5 MiB x 950 x (1 + 2 + ... + 512) + 5 GiB x 500 > 5 TiB.
PART_GROWTH_EVERY = 950
MAX_KEY_BYTES = 1024
BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")

# User metadata (x-amz-meta-*) the gateway writes and reads. "mtime" (seconds since the epoch, as a decimal) is
# what rclone's S3 backend and s3fs use too, so times set by either tool show here, and ours there.
META_SHA256 = "sha256"
META_MTIME = "mtime"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Content headers a metadata rewrite (MFMT) must give again, or S3 would drop them.
CONTENT_HEADERS = ("ContentType", "ContentEncoding", "ContentDisposition", "ContentLanguage", "CacheControl")

DIR_MODE = stat.S_IFDIR | 0o755
FILE_MODE = stat.S_IFREG | 0o644

# S3 error code (or HTTP status) -> (exception type, errno). Everything else is EIO.
ERROR_CODES: dict[str, tuple[type[OSError], int]] = {
    "NoSuchKey": (FileNotFoundError, errno.ENOENT),
    "NotFound": (FileNotFoundError, errno.ENOENT),
    "404": (FileNotFoundError, errno.ENOENT),
    "NoSuchBucket": (OSError, errno.ENXIO),
    "AccessDenied": (PermissionError, errno.EACCES),
    "AllAccessDisabled": (PermissionError, errno.EACCES),
    "InvalidAccessKeyId": (PermissionError, errno.EACCES),
    "SignatureDoesNotMatch": (PermissionError, errno.EACCES),
    "AccountProblem": (PermissionError, errno.EACCES),
    "403": (PermissionError, errno.EACCES),
    "SlowDown": (OSError, errno.EBUSY),
    "ServiceUnavailable": (OSError, errno.EBUSY),
    "503": (OSError, errno.EBUSY),
    "RequestTimeout": (TimeoutError, errno.ETIMEDOUT),
    "EntityTooLarge": (OSError, errno.EFBIG),
    "KeyTooLongError": (OSError, errno.ENAMETOOLONG),
    "InvalidRange": (OSError, errno.EINVAL),
    "QuotaExceeded": (OSError, errno.EDQUOT),
    "XMinioStorageFull": (OSError, errno.ENOSPC),
    "PreconditionFailed": (OSError, errno.EAGAIN),
}


def translate(exc: BaseException, operation: str, key: str | None) -> OSError:
    """A builtin OSError for an aiobotocore failure, as aioftp's handlers expect from a backend."""
    where = f"{operation} {key}" if key else operation
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        kind, number = ERROR_CODES.get(code) or ERROR_CODES.get(status) or (OSError, errno.EIO)
        # A missing key is an everyday answer (a HEAD to see whether a file exists), not a failure.
        level = logging.DEBUG if kind is FileNotFoundError else logging.WARNING
        logger.log(level, "S3 %s failed: %s (HTTP %s) %s", where, code or "-", status or "-", error.get("Message", ""))
        return kind(number, f"S3 {code or status}", key)
    if isinstance(exc, EndpointConnectionError):
        logger.warning("S3 %s failed: endpoint unreachable: %s", where, exc)
        return OSError(errno.ECONNREFUSED, "S3 endpoint unreachable", key)
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError | asyncio.TimeoutError):
        logger.warning("S3 %s failed: timed out: %s", where, exc)
        return TimeoutError(errno.ETIMEDOUT, "S3 timed out", key)
    if isinstance(exc, NoCredentialsError):
        logger.warning("S3 %s failed: no credentials", where)
        return PermissionError(errno.EACCES, "no S3 credentials", key)
    logger.warning("S3 %s failed: %r", where, exc)
    return OSError(errno.EIO, f"S3 {type(exc).__name__}", key)


# ListObjectsV2 "Contents" entries (named here: in S3PathIO, "list" is the method).
Keys = list[dict[str, Any]]
S3_ERRORS = (ClientError, BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError)


def part_size_for(base: int, number: int) -> int:
    return min(MAX_PART, base << ((number - 1) // PART_GROWTH_EVERY))


def dir_stat() -> os.stat_result:
    return os.stat_result((DIR_MODE, 0, 0, 2, 0, 0, 0, 0, 0, 0))


def file_stat(size: int, modified: Any, mtime: float | None = None) -> os.stat_result:
    """A file's stat: its modification time is ``mtime`` where one was set (MFMT), else S3's LastModified."""
    if mtime is None:
        mtime = modified.timestamp() if modified is not None else 0
    return os.stat_result((FILE_MODE, 0, 0, 1, 0, 0, size, mtime, mtime, mtime))


def etag_of(response: dict[str, Any]) -> str:
    return str(response.get("ETag", "")).strip('"')


def metadata_mtime(metadata: dict[str, str]) -> float | None:
    try:
        value = float(metadata.get(META_MTIME, ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def format_mtime(mtime: float) -> str:
    return f"{mtime:.3f}".rstrip("0").rstrip(".")


def first_error(exc: BaseException) -> BaseException:
    """The first OSError inside an ExceptionGroup from a TaskGroup (the style of aioftp's backends)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = next((e for e in exc.exceptions if isinstance(e, OSError)), exc.exceptions[0])
    return exc


class S3Context:
    """One bucket and prefix, and how to talk to S3 about them."""

    def __init__(self, settings: S3Settings, resources: BackendResources, bucket: str, prefix: str) -> None:
        self.settings = settings
        self.resources = resources
        self.bucket = bucket
        self.prefix = prefix
        self.write_args: dict[str, str] = {}
        if settings.server_side_encryption:
            self.write_args["ServerSideEncryption"] = settings.server_side_encryption
        if settings.kms_key_id:
            self.write_args["SSEKMSKeyId"] = settings.kms_key_id
        if settings.storage_class:
            self.write_args["StorageClass"] = settings.storage_class
        self.facts: ObjectFacts | None = resources.facts

    # -- the object facts store: a help, never a reason to fail ----------------------------------------

    async def facts_lookup(self, keys: Sequence[str]) -> dict[str, ObjectFact]:
        if self.facts is None or not keys:
            return {}
        try:
            return await self.facts.lookup(self.bucket, keys)
        except Exception as exc:  # noqa: BLE001 - the objects stay usable without their facts
            logger.warning("could not read object facts for s3://%s: %s", self.bucket, exc)
            return {}

    async def facts_valid(self, key: str, etag: str) -> ObjectFact | None:
        fact = (await self.facts_lookup([key])).get(key)
        return fact if fact is not None and fact.etag == etag else None

    async def facts_update(self, method: str, *args: Any) -> None:
        if self.facts is None:
            return
        try:
            await getattr(self.facts, method)(self.bucket, *args)
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not %s object facts for s3://%s: %s", method, self.bucket, exc)

    async def client(self) -> Any:
        return await self.resources.get("s3", self._make_client)

    async def _make_client(self, stack: AsyncExitStack) -> Any:
        s = self.settings
        session = get_session()
        if s.profile:
            session.set_config_variable("profile", s.profile)
        config = AioConfig(
            region_name=s.region,
            s3={"addressing_style": s.addressing_style, "payload_signing_enabled": s.payload_signing},
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            retries={"max_attempts": s.max_attempts, "mode": "standard"},
            max_pool_connections=s.max_pool_connections,
            # Checksums only where S3 requires them: other S3-compatible stores reject the newer defaults.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            warm_up_loader_caches=True,
        )
        return await stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=s.endpoint_url,
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=s.secret_access_key.get_secret_value() if s.secret_access_key else None,
                aws_session_token=s.session_token.get_secret_value() if s.session_token else None,
                config=config,
            )
        )

    async def call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        client = await self.client()
        try:
            response: dict[str, Any] = await getattr(client, operation)(Bucket=self.bucket, **kwargs)
        except S3_ERRORS as exc:
            raise translate(exc, operation, kwargs.get("Key") or kwargs.get("Prefix")) from exc
        return response


class AbortJanitor:
    """Multipart uploads whose abort failed (S3 unreachable at that moment) are aborted again with backoff
    until S3 answers: their parts would otherwise stay stored, and billed, with nothing to show for them."""

    FIRST_DELAY = 0.5
    MAX_DELAY = 30.0

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def abort_later(self, ctx: S3Context, key: str, upload_id: str) -> None:
        task = asyncio.create_task(self._retry(ctx, key, upload_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry(self, ctx: S3Context, key: str, upload_id: str) -> None:
        delay = self.FIRST_DELAY
        while True:
            await asyncio.sleep(delay)
            try:
                await ctx.call("abort_multipart_upload", Key=key, UploadId=upload_id)
            except FileNotFoundError:
                return  # already gone
            except OSError:
                delay = min(delay * 2, self.MAX_DELAY)
                continue
            logger.info("aborted multipart upload %s of %s on a later attempt", upload_id, key)
            return

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            logger.error("%d multipart uploads could not be aborted before shutdown", len(self._tasks))
            await asyncio.wait(set(self._tasks))

    @staticmethod
    async def make(stack: AsyncExitStack) -> AbortJanitor:
        janitor = AbortJanitor()
        stack.push_async_callback(janitor.close)
        return janitor


class BlocksIO(io.BytesIO):
    """A part body made of the blocks received, read without joining them (a join would copy the part once
    more). A ``BytesIO`` to aiohttp, which then sends it 64 KiB at a time, and seekable for botocore's retries."""

    def __init__(self, blocks: list[bytes]) -> None:
        super().__init__()
        self._blocks = blocks
        self._size = sum(len(block) for block in blocks)
        self._position = 0
        self._index = 0  # block that holds self._position
        self._offset = 0  # where that block starts

    def __len__(self) -> int:
        return self._size

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, min(self._size, base + offset))
        self._index, self._offset = 0, 0
        while self._index < len(self._blocks) and self._offset + len(self._blocks[self._index]) <= self._position:
            self._offset += len(self._blocks[self._index])
            self._index += 1
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self._size - self._position
        pieces = []
        while size > 0 and self._index < len(self._blocks):
            block = self._blocks[self._index]
            start = self._position - self._offset
            piece = block[start : start + size]
            pieces.append(piece)
            self._position += len(piece)
            size -= len(piece)
            if self._position - self._offset >= len(block):
                self._offset += len(block)
                self._index += 1
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def getvalue(self) -> bytes:
        return b"".join(self._blocks)


class S3Upload(Upload):
    def __init__(self, ctx: S3Context, key: str) -> None:
        self.ctx = ctx
        self.key = key
        # Blocks received since the last part was sent; joined (one copy) when they make a part.
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.upload_id: str | None = None
        self.next_part = 1
        self.parts: list[dict[str, Any]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(ctx.settings.parts_in_flight)
        self.failure: BaseException | None = None
        self.done = False
        # SHA-256 of the whole object, fed a part at a time in worker threads; None once a copied head makes
        # it unknowable (REST/APPE above 5 MiB, large copies).
        self.sha256: Any = hashlib.sha256()
        self.hashing: asyncio.Future[None] | None = None
        self.etag = ""

    # -- parts -----------------------------------------------------------------------------------------

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def _ensure_multipart(self) -> str:
        if self.upload_id is None:
            # Shielded: if this is cancelled while S3 creates the upload, its id must still be known to abort it.
            response = await run_to_completion(
                self.ctx.call("create_multipart_upload", Key=self.key, **self.ctx.write_args)
            )
            self.upload_id = str(response["UploadId"])
            logger.debug("multipart upload %s of %s started", self.upload_id, self.key)
        return self.upload_id

    async def _schedule(self, make: Callable[[int, str], Awaitable[dict[str, Any]]]) -> None:
        """Run one part in the background once a slot is free (this wait is the back-pressure)."""
        upload_id = await self._ensure_multipart()
        await self.slots.acquire()
        if self.failure is not None:
            self.slots.release()
            raise self.failure
        number = self.next_part
        if number > MAX_PARTS:
            self.slots.release()
            raise OSError(errno.EFBIG, "upload exceeds S3's 10,000 parts", self.key)
        self.next_part += 1

        async def run() -> None:
            response = await make(number, upload_id)
            etag = response.get("ETag") or response.get("CopyPartResult", {}).get("ETag")
            self.parts.append({"PartNumber": number, "ETag": etag})

        task = asyncio.create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self._part_done)

    def _part_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.release()
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()

    def take_pending(self) -> BlocksIO:
        body = BlocksIO(self.pending)
        self._hash_later(self.pending)
        self.pending = []
        self.pending_size = 0
        return body

    def _hash_later(self, blocks: list[bytes]) -> None:
        """Hash these blocks in a thread once the blocks before them are hashed (the order matters)."""
        if self.sha256 is None or not blocks:
            return
        previous = self.hashing

        async def run() -> None:
            if previous is not None:
                await previous
            await asyncio.to_thread(update_all, self.sha256, blocks)

        self.hashing = asyncio.ensure_future(run())

    async def _sha256(self) -> str | None:
        if self.hashing is not None:
            await self.hashing
        return self.sha256.hexdigest() if self.sha256 is not None else None

    async def _send_pending(self) -> None:
        """Send what was received as the next part: at least the part size (S3 allows parts of unequal size;
        all but the last must be 5 MiB or more), at most one block more."""
        body = self.take_pending()

        def upload_part(number: int, upload_id: str) -> Awaitable[dict[str, Any]]:
            return self.ctx.call("upload_part", Key=self.key, UploadId=upload_id, PartNumber=number, Body=body)

        await self._schedule(upload_part)

    async def copy_head(self, source_key: str, length: int, etag: str) -> None:
        """The first ``length`` bytes of ``source_key`` (still at ``etag``) as the first parts, copied by S3."""
        self.sha256 = None
        count = -(-length // MAX_PART)
        step = -(-length // count)
        for start in range(0, length, step):
            end = min(length, start + step) - 1

            def copy_part(number: int, upload_id: str, start: int = start, end: int = end) -> Awaitable[dict[str, Any]]:
                return self.ctx.call(
                    "upload_part_copy",
                    Key=self.key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.ctx.bucket, "Key": source_key},
                    CopySourceRange=f"bytes={start}-{end}",
                    CopySourceIfMatch=etag,
                )

            await self._schedule(copy_part)

    # -- Upload --------------------------------------------------------------------------------------------

    def _part_size(self) -> int:
        return part_size_for(self.ctx.settings.part_size, self.next_part)

    async def write(self, data: bytes) -> None:
        self._raise_failure()
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size >= self._part_size():
            await self._send_pending()

    async def commit(self) -> None:
        """Publish the object (its ETag then in ``self.etag``). Its SHA-256 goes with it: into its metadata when
        it is sent whole, into the facts store for a multipart upload (whose metadata is fixed before the data
        comes)."""
        self._raise_failure()
        if self.upload_id is None:
            body = self.take_pending()
            sha256 = await self._sha256()
            metadata = {META_SHA256: sha256} if sha256 else {}
            response = await self.ctx.call(
                "put_object", Key=self.key, Body=body, Metadata=metadata, **self.ctx.write_args
            )
            self.done = True
            self.etag = etag_of(response)
            # Same content, same ETag: a time set on the object this one replaces must not carry over.
            await self.ctx.facts_update("forget", [self.key])
            return
        if self.pending_size or not (self.parts or self.tasks):
            await self._send_pending()
        if self.tasks:
            await asyncio.wait(set(self.tasks))
        self._raise_failure()
        sha256 = await self._sha256()
        parts = sorted(self.parts, key=lambda part: part["PartNumber"])
        response = await self.ctx.call(
            "complete_multipart_upload",
            Key=self.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": parts},
        )
        self.done = True
        self.etag = etag_of(response)
        if sha256:
            await self.ctx.facts_update("record", self.key, ObjectFact(etag=self.etag, sha256=sha256))

    async def abort(self) -> None:
        logger.debug("aborting upload of %s (multipart %s, done %s)", self.key, self.upload_id, self.done)
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks))
        if self.hashing is not None:
            self.hashing.cancel()
        self.pending = []
        if self.upload_id is None or self.done:
            return
        try:
            async with asyncio.timeout(self.ctx.settings.read_timeout):
                await self.ctx.call("abort_multipart_upload", Key=self.key, UploadId=self.upload_id)
        except FileNotFoundError:
            pass
        except (OSError, TimeoutError) as exc:
            logger.warning("could not abort multipart upload %s of %s yet: %r", self.upload_id, self.key, exc)
            janitor = await self.ctx.resources.get("s3-janitor", AbortJanitor.make)
            janitor.abort_later(self.ctx, self.key, self.upload_id)


class S3Download(Download):
    """GetObject's body. aiohttp keeps receiving into its buffer while the caller sends what it has; a read
    returns what has arrived (up to ``size``) rather than waiting to fill a block, which only costs a copy."""

    def __init__(self, body: Any, key: str) -> None:
        self.body = body
        self.key = key

    async def read(self, size: int) -> bytes:
        if self.body is None:
            return b""
        try:
            data: bytes = await self.body.read(size if size > 0 else None)
        except S3_ERRORS as exc:
            raise translate(exc, "GetObject body", self.key) from exc
        return data

    async def close(self) -> None:
        if self.body is not None:
            # Closes the connection rather than returning it to the pool with an unread body (ABOR).
            self.body.close()
            self.body = None


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

    async def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return await self.ctx.call("head_object", Key=key)
        except FileNotFoundError:
            return None

    async def _has_keys_under(self, prefix: str) -> bool:
        response = await self.ctx.call("list_objects_v2", Prefix=prefix, MaxKeys=1)
        return bool(response.get("KeyCount"))

    async def _file_stat(self, path: Path) -> os.stat_result | None:
        if self._is_root(path):
            return None
        head = await self._head(self._key(path))
        if head is None:
            return None
        return file_stat(head["ContentLength"], head.get("LastModified"), metadata_mtime(head.get("Metadata", {})))

    async def _is_dir(self, path: Path) -> bool:
        return self._is_root(path) or await self._has_keys_under(self._dir_prefix(path))

    async def _probe(self, path: Path) -> os.stat_result | None:
        """A file's stat, or a directory's, or None; a name that is both (written by others) counts as a file."""
        cached = self._listed_stat(path)
        if cached is not None:
            return cached
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
    async def exists(self, path: Path) -> bool:
        return await self._probe(path) is not None

    @universal_exception
    @with_timeout
    async def is_dir(self, path: Path) -> bool:
        cached = self._listed_stat(path)
        if cached is not None:
            return stat.S_ISDIR(cached.st_mode)
        return await self._is_dir(path)

    @universal_exception
    @with_timeout
    async def is_file(self, path: Path) -> bool:
        cached = self._listed_stat(path)
        if cached is not None:
            return stat.S_ISREG(cached.st_mode)
        return await self._file_stat(path) is not None

    @universal_exception
    @with_timeout
    async def stat(self, path: Path) -> os.stat_result:
        result = await self._probe(path)
        if result is None:
            raise FileNotFoundError(errno.ENOENT, "no such file or directory", str(path))
        return result

    def list(self, path: Path) -> AsyncIterator[Path]:
        return _S3Lister(self, path, timeout=self.timeout)

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
        await self.ctx.call("delete_object", Key=self._key(path))
        await self.ctx.facts_update("forget", [self._key(path)])

    @universal_exception
    async def rename(self, source: Path, destination: Path) -> Path:
        # No path_timeout: renaming a large directory takes as long as its copies (each bounded by botocore).
        self._forget_listed()
        if self._is_root(source) or self._is_root(destination):
            raise PermissionError(errno.EPERM, "the root directory cannot be renamed", str(source))
        if not await self._is_dir(destination.parent):
            # S3 would take any key; a file system (and so the client) expects the directory to exist.
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(destination.parent))
        head = await self._head(self._key(source))
        if head is not None:
            old, new = self._key(source), self._key(destination)
            etag = await self._copy_object(old, new, head)
            await self.ctx.call("delete_object", Key=old)
            await self.ctx.facts_update("move", [(old, etag_of(head), new, etag)])
            return destination
        if not await self._is_dir(source):
            raise FileNotFoundError(errno.ENOENT, "no such file or directory", str(source))
        await self._rename_prefix(self._dir_prefix(source), self._dir_prefix(destination))
        return destination

    async def _copy_object(
        self, source: str, destination: str, head: dict[str, Any], metadata: dict[str, str] | None = None
    ) -> str:
        """Copy an object inside the bucket (only while it is still at ``head``'s ETag); with ``metadata`` its
        user metadata is replaced, else kept. Returns the copy's ETag."""
        size = int(head["ContentLength"])
        if size > MAX_PART and metadata is None and "Metadata" not in head:
            # A listed entry (directory rename): the multipart copy below must give its metadata again.
            head = await self._head(source) or head
        copy_source = {"Bucket": self.ctx.bucket, "Key": source}
        content = {field: head[field] for field in CONTENT_HEADERS if head.get(field)}
        write_args = dict(self.ctx.write_args)
        if head.get("StorageClass") and "StorageClass" not in write_args:
            write_args["StorageClass"] = head["StorageClass"]  # a copy would otherwise become STANDARD
        if size <= MAX_PART:
            extra: dict[str, Any] = {}
            if metadata is not None:
                extra = {"MetadataDirective": "REPLACE", "Metadata": metadata, **content}
            response = await self.ctx.call(
                "copy_object",
                Key=destination,
                CopySource=copy_source,
                CopySourceIfMatch=str(head["ETag"]),
                **extra,
                **write_args,
            )
            return etag_of(response.get("CopyObjectResult", {}))
        # Above 5 GiB CopyObject is refused: copy in parts, keeping the object's metadata and content headers.
        upload = S3Upload(self.ctx, destination)
        upload_args = {"Metadata": head.get("Metadata", {}) if metadata is None else metadata, **content}
        response = await run_to_completion(
            self.ctx.call("create_multipart_upload", Key=destination, **upload_args, **write_args)
        )
        upload.upload_id = str(response["UploadId"])
        try:
            await upload.copy_head(source, size, str(head["ETag"]))
            await upload.commit()
        except BaseException:
            await run_to_completion(upload.abort())
            raise
        return upload.etag

    async def _rename_prefix(self, source: str, destination: str) -> None:
        """Copy every key under ``source`` to ``destination`` (concurrently, bounded), then delete the sources.
        A failure on the way deletes the copies made so far and leaves the source as it was. Copies of a page
        are never cancelled half-way: S3 may still finish a request whose client gave up, after the clean-up."""
        attempted: list[str] = []
        moved: list[tuple[str, str, str, str]] = []
        slots = asyncio.Semaphore(self.ctx.settings.copy_concurrency)

        async def copy(item: dict[str, Any]) -> None:
            target = destination + item["Key"][len(source) :]
            async with slots:
                attempted.append(target)
                listed = {"ContentLength": item["Size"], "ETag": item["ETag"], "StorageClass": item.get("StorageClass")}
                etag = await self._copy_object(item["Key"], target, listed)
                moved.append((item["Key"], etag_of(item), target, etag))

        try:
            async for page in self._pages(source):
                results = await asyncio.gather(*(copy(item) for item in page), return_exceptions=True)
                failures = [result for result in results if isinstance(result, BaseException)]
                if failures:
                    raise failures[0]
        except BaseException:
            await run_to_completion(self._delete_keys(attempted))
            raise
        async for page in self._pages(source):
            await self._delete_keys([item["Key"] for item in page])
        await self.ctx.facts_update("move", moved)

    async def _pages(self, prefix: str) -> AsyncIterator[Keys]:
        token: dict[str, str] = {}
        while True:
            response = await self.ctx.call("list_objects_v2", Prefix=prefix, **token)
            yield response.get("Contents", [])
            if not response.get("IsTruncated"):
                return
            token = {"ContinuationToken": response["NextContinuationToken"]}

    async def _delete_keys(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            response = await self.ctx.call("delete_objects", Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise OSError(errno.EIO, f"S3 could not delete {len(response['Errors'])} keys: {first}", first["Key"])

    # -- file facts ------------------------------------------------------------------------------------

    @universal_exception
    async def digest(self, path: Path, algorithm: str) -> str:
        """SHA-256 is looked up where the upload left it (the object's metadata, or the facts store for a
        multipart upload) and otherwise computed from the object once and remembered for its ETag."""
        if algorithm != "sha256":
            return await self._stream_digest(path, algorithm, None)
        key = self._key(path)
        head = await self._head(key)
        if head is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
        stored = str(head.get("Metadata", {}).get(META_SHA256, "")).lower()
        if SHA256_HEX.fullmatch(stored):
            return stored
        etag = etag_of(head)
        fact = await self.ctx.facts_valid(key, etag)
        if fact is not None and fact.sha256:
            return fact.sha256
        value = await self._stream_digest(path, algorithm, head)
        mtime = fact.mtime if fact is not None else None
        await self.ctx.facts_update("record", key, ObjectFact(etag=etag, sha256=value, mtime=mtime))
        return value

    async def _stream_digest(self, path: Path, algorithm: str, head: dict[str, Any] | None) -> str:
        """Read the object through the hash (bounded memory); with ``head``, only while it is at that ETag."""
        key = self._key(path)
        hasher = DIGESTS[algorithm]()
        arguments = {"IfMatch": str(head["ETag"])} if head is not None else {}
        response = await self.ctx.call("get_object", Key=key, **arguments)
        download = S3Download(response["Body"], key)
        try:
            await hash_stream(download.read, hasher)
        finally:
            await download.close()
        return hasher.hexdigest()

    @universal_exception
    async def set_mtime(self, path: Path, mtime: float) -> None:
        """MFMT: the time goes into the object's metadata (a copy onto itself, as S3 cannot change metadata in
        place) and into the facts store, from which listings take it without a HEAD per entry. No path
        timeout: the copy takes as long as the object is large (each request is bounded by botocore)."""
        self._forget_listed()
        key = self._key(path)
        head = await self._head(key)
        if head is None:
            if await self._is_dir(path):
                raise OSError(errno.EOPNOTSUPP, "directories on S3 have no modification time", str(path))
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
        metadata = dict(head.get("Metadata", {}))
        metadata[META_MTIME] = format_mtime(mtime)
        fact = await self.ctx.facts_valid(key, etag_of(head))
        if fact is not None and fact.sha256 and META_SHA256 not in metadata:
            metadata[META_SHA256] = fact.sha256  # now it can travel with the object
        etag = await self._copy_object(key, key, head, metadata)
        sha256 = metadata.get(META_SHA256) if SHA256_HEX.fullmatch(metadata.get(META_SHA256, "")) else None
        await self.ctx.facts_update("record", key, ObjectFact(etag=etag, sha256=sha256, mtime=mtime))

    # -- transfers -------------------------------------------------------------------------------------

    async def _begin_upload(self, path: Path, *, offset: int, append: bool) -> Upload:
        if self._is_root(path):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        key = self._key(path)
        if not await self._is_dir(path.parent):
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(path.parent))
        if await self._has_keys_under(key + "/"):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        head = await self._head(key) if offset or append else None
        size = int(head["ContentLength"]) if head is not None else 0
        if append:
            offset = size
        elif offset > size:
            raise OSError(errno.EINVAL, "restart offset beyond the end of the file", str(path))
        upload = S3Upload(self.ctx, key)
        if offset and head is not None:
            etag = str(head["ETag"])
            if offset >= MIN_PART:
                await upload.copy_head(key, offset, etag)
            else:
                response = await self.ctx.call("get_object", Key=key, Range=f"bytes=0-{offset - 1}", IfMatch=etag)
                async with response["Body"] as body:
                    await upload.write(await body.read())
        return upload

    async def _begin_download(self, path: Path, *, offset: int) -> Download:
        key = self._key(path)
        arguments: dict[str, Any] = {"Key": key}
        if offset:
            arguments["Range"] = f"bytes={offset}-"
        try:
            response = await self.ctx.call("get_object", **arguments)
        except OSError as exc:
            if offset and exc.errno == errno.EINVAL:
                return S3Download(None, key)  # REST at the very end: nothing left to send
            raise
        return S3Download(response["Body"], key)


class _S3Lister(AbstractAsyncLister[Path]):
    """ListObjectsV2 with a delimiter, a page at a time; each entry's stat is kept for aioftp's per-entry calls."""

    def __init__(self, owner: S3PathIO, path: Path, *, timeout: float | int | None) -> None:
        super().__init__(timeout=timeout)
        self._owner = owner
        self._path = path
        self._prefix: str | None = None
        self._token: dict[str, str] | None = {}
        self._batch: list[tuple[str, os.stat_result]] = []

    @staticmethod
    def _entries(
        prefix: str, response: dict[str, Any], facts: dict[str, ObjectFact]
    ) -> list[tuple[str, os.stat_result]]:
        entries = []
        for common in response.get("CommonPrefixes", []):
            entries.append((common["Prefix"][len(prefix) : -1], dir_stat()))
        for item in response.get("Contents", []):
            fact = facts.get(item["Key"])
            mtime = fact.mtime if fact is not None and fact.etag == etag_of(item) else None
            entries.append((item["Key"][len(prefix) :], file_stat(item["Size"], item.get("LastModified"), mtime)))
        # Not representable as an FTP name: empty (the marker itself, "a//b") or with line breaks.
        return sorted((name, st) for name, st in entries if name and not set(name) & {"\r", "\n", "\0"})

    @universal_exception
    @with_timeout
    async def __anext__(self) -> Path:
        if self._prefix is None:
            self._owner._forget_listed()
            self._prefix = self._owner._dir_prefix(self._path)
        while not self._batch:
            if self._token is None:
                self._owner._forget_listed()
                raise StopAsyncIteration
            response = await self._owner.ctx.call("list_objects_v2", Prefix=self._prefix, Delimiter="/", **self._token)
            self._token = (
                {"ContinuationToken": response["NextContinuationToken"]} if response.get("IsTruncated") else None
            )
            # Times set by MFMT: one query to the facts store per page, not a HEAD per entry.
            facts = await self._owner.ctx.facts_lookup([item["Key"] for item in response.get("Contents", [])])
            self._batch = self._entries(self._prefix, response, facts)
            self._owner._remember_listed({self._path / name: st for name, st in self._batch})
            self._batch.reverse()
        name, _ = self._batch.pop()
        return self._path / name


class S3Storage(StorageFactory):
    """``s3://bucket`` or ``s3://bucket/prefix``: the user sees the keys under the prefix."""

    def __init__(self, uri: str, bucket: str, prefix: str, settings: Settings, resources: BackendResources) -> None:
        self.uri = uri
        self.ctx = S3Context(settings.s3, resources, bucket, prefix)
        self.base_path = Path("/", f"s3:{bucket}", *[p for p in prefix.split("/") if p])
        self._checked = False

    @staticmethod
    def _split(rest: str) -> tuple[str, str]:
        bucket, _, prefix = unquote(rest).partition("/")
        prefix = "/".join(part for part in prefix.split("/") if part)
        return bucket, prefix + "/" if prefix else ""

    @classmethod
    def check(cls, rest: str) -> None:
        bucket, prefix = cls._split(rest)
        if not BUCKET_NAME.fullmatch(bucket):
            raise ValueError(f"s3://{rest}: {bucket!r} is not a valid bucket name")
        if any(part in (".", "..") for part in prefix.split("/")) or "\x00" in prefix:
            raise ValueError(f"s3://{rest}: the prefix may not contain '.', '..' or NUL")

    @classmethod
    def from_uri(cls, uri: str, rest: str, settings: Settings, resources: BackendResources) -> Self:
        cls.check(rest)
        bucket, prefix = cls._split(rest)
        return cls(uri, bucket, prefix, settings, resources)

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
    ) -> AbstractPathIO[Path]:
        return S3PathIO(timeout=timeout, connection=connection, state=state, ctx=self.ctx, base=self.base_path)
