"""Uploads to S3: nothing is visible until the upload commits.

A file under the part size goes up as one PutObject at commit. A larger one becomes a multipart upload whose
parts are sent while the next ones arrive (``s3.parts_in_flight`` at once, so memory stays within part size x
(parts in flight + 1)); CompleteMultipartUpload publishes the object, and anything else aborts the multipart
upload. An abort S3 does not answer is handed to the janitor, which retries until it does.

The SHA-256 of the whole object is computed while it streams, a part at a time in worker threads, and kept with
it: in its metadata when it goes up whole, in the facts store for a multipart upload (whose metadata S3 fixes
before the data arrives).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pathio_backends.base import Upload
from pathio_backends.digests import update_all
from pathio_backends.facts import ObjectFact
from pathio_backends.s3.client import MAX_PART, MAX_PARTS, META_SHA256, S3Context, etag_of
from pathio_backends.tasks import run_to_completion

logger = logging.getLogger(__name__)

# The part size doubles every this many parts, so 10,000 parts hold S3's largest object (5 TiB) even from
# the smallest part size: 5 MiB x 950 x (1 + 2 + ... + 512) + 5 GiB x 500 > 5 TiB.
PART_GROWTH_EVERY = 950

# Makes one part's request, given its number and the upload id; returns S3's answer (with the part's ETag).
PartRequest = Callable[[int, str], Awaitable[dict[str, Any]]]


def part_size_for(base: int, number: int) -> int:
    return min(MAX_PART, base << ((number - 1) // PART_GROWTH_EVERY))


def first_error(exc: BaseException) -> BaseException:
    """The first OSError inside an ExceptionGroup from a TaskGroup (the style of aioftp's backends)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = next((e for e in exc.exceptions if isinstance(e, OSError)), exc.exceptions[0])
    return exc


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


class PartSender:
    """The parts of one multipart upload in flight, at most ``limit`` at once, in a TaskGroup run by a task of
    its own: the first part that fails cancels the others, and its error is raised by the next :meth:`send` or
    by :meth:`finish`. Waiting in ``send`` for a free slot is the upload's back-pressure."""

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._limit = limit
        self._jobs: asyncio.Queue[Callable[[], Awaitable[None]] | None] = asyncio.Queue()
        self._runner = asyncio.ensure_future(self._run())
        self._runner.add_done_callback(self._wake_waiters)

    def _wake_waiters(self, runner: asyncio.Future[None]) -> None:
        # Once the runner has ended, no part releases a slot: whoever waits for one must wake to see why.
        for _ in range(self._limit):
            self._slots.release()

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            while (job := await self._jobs.get()) is not None:
                group.create_task(self._run_one(job))

    async def _run_one(self, job: Callable[[], Awaitable[None]]) -> None:
        try:
            await job()
        finally:
            self._slots.release()

    async def send(self, job: Callable[[], Awaitable[None]]) -> None:
        """Start ``job()`` once a slot is free; raise the error of a part that failed before."""
        await self._slots.acquire()
        if self._runner.done():
            raise self._failure()
        self._jobs.put_nowait(job)

    async def finish(self) -> None:
        """Wait for every part; raise the first failure."""
        self._jobs.put_nowait(None)
        await asyncio.wait({self._runner})
        if self._runner.cancelled() or self._runner.exception() is not None:
            raise self._failure()

    async def cancel(self) -> None:
        """Stop the parts in flight and wait until they have stopped."""
        self._runner.cancel()
        await run_to_completion(asyncio.wait({self._runner}))
        if not self._runner.cancelled():
            self._runner.exception()

    def _failure(self) -> BaseException:
        if self._runner.cancelled():
            return RuntimeError("the parts of this upload were cancelled")
        error = self._runner.exception()
        return first_error(error) if error is not None else RuntimeError("the parts of this upload ended early")


class S3Upload(Upload):
    def __init__(self, ctx: S3Context, key: str, write_args: dict[str, str] | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.key = key
        # Encryption and storage class of the object written (a copy keeps its source's storage class).
        self.write_args = ctx.write_args if write_args is None else write_args
        # Blocks received since the last part was sent; sent as one part without joining them (BlocksIO).
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.upload_id: str | None = None
        self.next_part = 1
        self.parts: list[dict[str, Any]] = []
        self.sender: PartSender | None = None
        # SHA-256 of the whole object, fed a part at a time in worker threads; None once a copied head makes
        # it unknowable (REST/APPE above 5 MiB, large copies).
        self.sha256: Any = hashlib.sha256()
        self.hashing: asyncio.Future[None] | None = None
        self.etag = ""

    # -- parts -----------------------------------------------------------------------------------------

    async def start(self, **arguments: Any) -> str:
        """The multipart upload's id, begun now if it was not (with ``arguments``, such as ``Metadata``, for the
        object)."""
        if self.upload_id is None:
            # Run to its end even if cancelled meanwhile: the id must be known to abort the upload S3 made.
            response = await run_to_completion(
                self.ctx.call("create_multipart_upload", Key=self.key, **arguments, **self.write_args)
            )
            self.upload_id = str(response["UploadId"])
            self.ctx.observer.multipart_started()
            logger.debug("multipart upload %s of %s started", self.upload_id, self.key)
        return self.upload_id

    async def send_part(self, request: PartRequest) -> None:
        """Send the next part (numbered now, in order) once a slot is free."""
        upload_id = await self.start()
        if self.next_part > MAX_PARTS:
            raise OSError(errno.EFBIG, "upload exceeds S3's 10,000 parts", self.key)
        number = self.next_part
        self.next_part += 1

        async def run() -> None:
            response = await request(number, upload_id)
            etag = response.get("ETag") or response.get("CopyPartResult", {}).get("ETag")
            self.parts.append({"PartNumber": number, "ETag": etag})

        if self.sender is None:
            self.sender = PartSender(self.ctx.settings.parts_in_flight)
        await self.sender.send(run)

    def forget_sha256(self) -> None:
        """The object's SHA-256 cannot be known (a head copied by S3 was never seen here)."""
        self.sha256 = None

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

        await self.send_part(upload_part)

    # -- Upload --------------------------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size >= part_size_for(self.ctx.settings.part_size, self.next_part):
            await self._send_pending()

    async def _commit(self) -> None:
        """Publish the object (its ETag then in ``self.etag``), its SHA-256 kept with it."""
        if self.upload_id is None:
            body = self.take_pending()
            sha256 = await self._sha256()
            metadata = {META_SHA256: sha256} if sha256 else {}
            response = await self.ctx.call("put_object", Key=self.key, Body=body, Metadata=metadata, **self.write_args)
            self.etag = etag_of(response)
            # Same content, same ETag: a time set on the object this one replaces must not carry over.
            await self.ctx.facts.forget([self.key])
            return
        if self.pending_size or (not self.parts and self.sender is None):
            await self._send_pending()  # the rest, or the one (empty) part S3 needs
        if self.sender is not None:
            await self.sender.finish()
        parts = sorted(self.parts, key=lambda part: part["PartNumber"])
        response = await self.ctx.call(
            "complete_multipart_upload", Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
        )
        self.ctx.observer.multipart_ended()
        self.upload_id = None  # completed: nothing left to abort
        self.etag = etag_of(response)
        sha256 = await self._sha256()
        if sha256:
            await self.ctx.facts.record(self.key, ObjectFact(etag=self.etag, sha256=sha256))

    async def _abort(self) -> None:
        logger.debug("aborting upload of %s (multipart %s)", self.key, self.upload_id)
        if self.sender is not None:
            await self.sender.cancel()
        if self.hashing is not None:
            self.hashing.cancel()
        self.pending = []
        if self.upload_id is None:
            return
        try:
            async with asyncio.timeout(self.ctx.settings.read_timeout):
                await self.ctx.call("abort_multipart_upload", Key=self.key, UploadId=self.upload_id)
        except FileNotFoundError:
            self.ctx.observer.multipart_ended()
        except (OSError, TimeoutError) as exc:
            logger.warning("could not abort multipart upload %s of %s yet: %r", self.upload_id, self.key, exc)
            await self.ctx.abort_later(self.key, self.upload_id)
        else:
            self.ctx.observer.multipart_ended()
