"""Downloads from S3: several ranged GetObjects in flight, their bytes handed over in order.

One HTTP stream is not enough: on AWS a single connection carries a fraction of what an instance can pull. A
download therefore reads ``s3.download_ranges_in_flight`` ranges of ``s3.download_range_size`` bytes at once,
each over its own connection, and hands their bytes to the sender in order; when the range being sent is used
up, the next one is requested. Each range holds at most its own bytes, so a download holds at most ranges in
flight x range size (plus the block being sent), however slow the client; and an S3 connection is held only
while its range arrives, never while a slow client drains it.

The first range is requested when the download opens (before the 150, so a missing object is a 550): its
answer carries the object's size (``Content-Range``) and ETag. An object within one range costs that single
GetObject and nothing else (no HEAD). Every further range is asked with ``If-Match`` on that ETag, so an object
replaced mid-download fails the transfer (PreconditionFailed: 451) instead of mixing the bytes of two versions.
A store that answers a range with the whole object (HTTP allows it) is streamed from it when the download
starts at 0, and refused (EIO) from a REST offset, rather than sending other bytes than asked for.

Each range is a task owned by its :class:`RangeFetch`; :meth:`RangedDownload.close` (ABOR, a client gone, the
end) cancels those still running and waits for them, and each closes its HTTP body on the way out, so an
unfinished connection is closed rather than returned to the pool with unread bytes. An S3 failure of one range
is raised, as the builtin OSError of ``errors.translate``, when the sender reaches that range: the bytes before
it have gone out, the transfer then ends with 451 and the session goes on.

With ``download_ranges_in_flight = 1``, and for HASH, a download is one GetObject streamed as it is sent
(:class:`StreamDownload`): no read-ahead, memory bounded by aiohttp's buffer and one block.
"""

from __future__ import annotations

import asyncio
import errno
import re
from collections import deque
from typing import Any

from pathio_backends.base import Download
from pathio_backends.s3.client import S3Context
from pathio_backends.s3.errors import S3_ERRORS, translate

# What one read of an HTTP body asks for: aiohttp returns what it has (usually less), so this only caps a join.
CHUNK = 1024 * 1024
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


async def open_download(
    ctx: S3Context, key: str, offset: int, *, etag: str | None = None, ranged: bool = True
) -> Download:
    """The object ``key`` from ``offset``: ranged reads ahead (``ranged`` and more than one range in flight
    configured) or one stream. With ``etag``, only while the object has that ETag. A missing object raises
    FileNotFoundError; an offset at the end (or an empty object) gives an empty download."""
    arguments: dict[str, Any] = {"Key": key}
    if etag is not None:
        arguments["IfMatch"] = etag
    in_flight = ctx.settings.download_ranges_in_flight if ranged else 1
    range_size = ctx.settings.download_range_size
    if in_flight > 1:
        arguments["Range"] = f"bytes={offset}-{offset + range_size - 1}"
    elif offset:
        arguments["Range"] = f"bytes={offset}-"
    try:
        response = await ctx.call("get_object", **arguments)
    except OSError as exc:
        if exc.errno == errno.EINVAL and "Range" in arguments:
            # InvalidRange: nothing at or after the offset (REST at the very end, or S3's answer for an empty object).
            return StreamDownload(None, key, offset)
        raise
    if in_flight == 1:
        return StreamDownload(response["Body"], key, offset)
    try:
        match = CONTENT_RANGE.fullmatch(str(response.get("ContentRange", "")))
        if match is None and offset == 0:
            # The whole object (a store may answer a range with all of it, RFC 9110): streamed as it comes.
            return StreamDownload(response["Body"], key, offset)
        if match is None or int(match.group(1)) != offset:
            raise OSError(errno.EIO, f"S3 GetObject: {arguments['Range']} answered with other bytes", key)
        size = int(match.group(3))
        return RangedDownload(ctx, key, offset, size, str(response["ETag"]), response, in_flight, range_size)
    except BaseException:
        response["Body"].close()
        raise


class StreamDownload(Download):
    """One GetObject's body. aiohttp keeps receiving into its buffer while the caller sends what it has; a read
    returns what has arrived (up to ``size``) rather than waiting to fill a block, which only costs a copy."""

    def __init__(self, body: Any, key: str, offset: int) -> None:
        super().__init__(offset)
        self.body = body
        self.key = key

    async def _read(self, size: int) -> bytes:
        if self.body is None:
            return b""
        try:
            data: bytes = await self.body.read(size if size > 0 else None)
        except S3_ERRORS as exc:
            raise translate(exc, "GetObject body", self.key) from exc
        return data

    async def _close(self) -> None:
        if self.body is not None:
            # Closes the connection rather than returning it to the pool with an unread body (ABOR).
            self.body.close()
            self.body = None


class RangeFetch:
    """Bytes ``start`` to ``end`` (exclusive) of an object, received by a task of their own into memory (at
    most ``end - start`` bytes) and taken out in order by the download."""

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.received = 0
        self.task: asyncio.Task[None] | None = None
        self._body: Any = None
        self._chunks: deque[bytes] = deque()
        self._taken = 0  # bytes of the first chunk already handed out
        self._arrived = asyncio.Event()
        self._finished = False
        self._error: Exception | None = None

    def begin(self, ctx: S3Context, key: str, etag: str, response: dict[str, Any] | None = None) -> None:
        """Start receiving: from ``response`` (the first range, already asked for) or a new GetObject."""
        if response is not None:
            self._body = response["Body"]
        self.task = asyncio.create_task(self._receive(ctx, key, etag), name=f"S3 range from {self.start}")

    async def _receive(self, ctx: S3Context, key: str, etag: str) -> None:
        try:
            if self._body is None:
                byte_range = f"bytes={self.start}-{self.end - 1}"
                response = await ctx.call("get_object", Key=key, Range=byte_range, IfMatch=etag)
                self._body = response["Body"]
                answered = str(response.get("ContentRange", ""))
                if not answered.startswith(f"bytes {self.start}-{self.end - 1}/"):
                    raise OSError(errno.EIO, f"S3 GetObject: {byte_range} answered with {answered or 'no range'}", key)
            await self._drain(key)
        except Exception as exc:  # noqa: BLE001 - raised to the sender, in order, by take()
            self._error = exc
        finally:
            self._close_body()
            self._finished = True
            self._arrived.set()

    async def _drain(self, key: str) -> None:
        try:
            while chunk := await self._body.read(CHUNK):
                self.received += len(chunk)
                self._chunks.append(chunk)
                self._arrived.set()
        except S3_ERRORS as exc:
            raise translate(exc, "GetObject body", key) from exc
        if self.received != self.end - self.start:
            raise OSError(errno.EIO, f"S3 GetObject: {self.received} bytes of {self.end - self.start} arrived", key)

    def _close_body(self) -> None:
        if self._body is not None:
            # A no-op once the body was read to its end; otherwise its connection is closed, not pooled.
            self._body.close()
            self._body = None

    async def take(self, size: int) -> bytes:
        """The next bytes of the range (at most ``size``, as they arrived), ``b""`` at its end, or its error."""
        while not self._chunks:
            if self._finished:
                if self._error is not None:
                    raise self._error
                return b""
            self._arrived.clear()
            await self._arrived.wait()
        chunk = self._chunks[0]
        if self._taken == 0 and (size <= 0 or len(chunk) <= size):
            return self._chunks.popleft()
        # Handed out in slices from where the last one ended: each byte is copied once, however small ``size``.
        end = len(chunk) if size <= 0 else self._taken + size
        piece = chunk[self._taken : end]
        self._taken += len(piece)
        if self._taken >= len(chunk):
            self._chunks.popleft()
            self._taken = 0
        return piece

    async def cancel(self) -> None:
        """Stop receiving; return once the task has ended and its HTTP body is closed."""
        self._chunks.clear()
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait({self.task})
        self._close_body()  # the first range's body, if its task was cancelled before it ran


class RangedDownload(Download):
    """An object read ahead in ranges (see the module docstring); ``read`` hands out their bytes in order."""

    def __init__(
        self,
        ctx: S3Context,
        key: str,
        offset: int,
        size: int,
        etag: str,
        first: dict[str, Any],
        in_flight: int,
        range_size: int,
    ) -> None:
        super().__init__(offset)
        self.ctx = ctx
        self.key = key
        self.size = size
        self.etag = etag
        self.in_flight = in_flight
        self.range_size = range_size
        self._fetches: deque[RangeFetch] = deque()
        self._next = offset  # where the next range to request starts
        self._start(first)
        while len(self._fetches) < in_flight and self._next < size:
            self._start(None)

    def _start(self, response: dict[str, Any] | None) -> None:
        fetch = RangeFetch(self._next, min(self._next + self.range_size, self.size))
        fetch.begin(self.ctx, self.key, self.etag, response)
        self._fetches.append(fetch)
        self._next = fetch.end

    async def _read(self, size: int) -> bytes:
        while self._fetches:
            data = await self._fetches[0].take(size)
            if data:
                return data
            self._fetches.popleft()  # used up (its task has ended): its place goes to the next range
            if self._next < self.size:
                self._start(None)
        return b""

    async def _close(self) -> None:
        fetches, self._fetches = self._fetches, deque()
        self._next = self.size
        await asyncio.gather(*(fetch.cancel() for fetch in fetches))
