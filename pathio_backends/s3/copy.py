"""Copies inside the bucket: renames of files and of whole directories, metadata rewrites (MFMT), and the kept
head of a resumed upload (REST/APPE). S3 cannot rename or change metadata in place: each is a server-side copy.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

from pathio_backends.facts import FactMove
from pathio_backends.s3.client import MAX_PART, S3Context, etag_of
from pathio_backends.s3.upload import S3Upload
from pathio_backends.tasks import run_to_completion

# ListObjectsV2 "Contents" entries.
Keys = list[dict[str, Any]]
# Content headers a metadata rewrite (MFMT) must give again, or S3 would drop them.
CONTENT_HEADERS = ("ContentType", "ContentEncoding", "ContentDisposition", "ContentLanguage", "CacheControl")


async def copy_head(upload: S3Upload, source_key: str, length: int, etag: str) -> None:
    """The first ``length`` bytes of ``source_key`` (still at ``etag``) as the upload's first parts, copied by S3
    (UploadPartCopy, at most :data:`MAX_PART` each)."""
    ctx = upload.ctx
    upload.forget_sha256()
    count = -(-length // MAX_PART)
    step = -(-length // count)
    for start in range(0, length, step):
        end = min(length, start + step) - 1

        def copy_part(number: int, upload_id: str, start: int = start, end: int = end) -> Awaitable[dict[str, Any]]:
            return ctx.call(
                "upload_part_copy",
                Key=upload.key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": ctx.bucket, "Key": source_key},
                CopySourceRange=f"bytes={start}-{end}",
                CopySourceIfMatch=etag,
            )

        await upload.send_part(copy_part)


async def head_object(ctx: S3Context, key: str) -> dict[str, Any] | None:
    try:
        return await ctx.call("head_object", Key=key)
    except FileNotFoundError:
        return None


async def copy_object(
    ctx: S3Context, source: str, destination: str, head: dict[str, Any], metadata: dict[str, str] | None = None
) -> str:
    """Copy an object inside the bucket (only while it is still at ``head``'s ETag); with ``metadata`` its user
    metadata is replaced, else kept. Returns the copy's ETag."""
    size = int(head["ContentLength"])
    if size > MAX_PART and metadata is None and "Metadata" not in head:
        # A listed entry (directory rename): the multipart copy below must give its metadata again.
        head = await head_object(ctx, source) or head
    copy_source = {"Bucket": ctx.bucket, "Key": source}
    content = {field: head[field] for field in CONTENT_HEADERS if head.get(field)}
    write_args = dict(ctx.write_args)
    if head.get("StorageClass") and "StorageClass" not in write_args:
        write_args["StorageClass"] = head["StorageClass"]  # a copy would otherwise become STANDARD
    if size <= MAX_PART:
        extra: dict[str, Any] = {}
        if metadata is not None:
            extra = {"MetadataDirective": "REPLACE", "Metadata": metadata, **content}
        response = await ctx.call(
            "copy_object",
            Key=destination,
            CopySource=copy_source,
            CopySourceIfMatch=str(head["ETag"]),
            **extra,
            **write_args,
        )
        return etag_of(response.get("CopyObjectResult", {}))
    # Above 5 GiB CopyObject is refused: copy in parts, keeping the object's metadata and content headers.
    upload = S3Upload(ctx, destination, write_args)
    try:
        await upload.start(Metadata=head.get("Metadata", {}) if metadata is None else metadata, **content)
        await copy_head(upload, source, size, str(head["ETag"]))
        await upload.commit()
    finally:
        await upload.abort()
    return upload.etag


async def rename_prefix(ctx: S3Context, source: str, destination: str) -> None:
    """Copy every key under ``source`` to ``destination`` (concurrently, bounded), then delete the sources.
    A failure on the way deletes the copies made so far and leaves the source as it was. Copies of a page are
    never cancelled half-way: S3 may still finish a request whose client gave up, after the clean-up."""
    attempted: list[str] = []
    moved: list[FactMove] = []
    slots = asyncio.Semaphore(ctx.settings.copy_concurrency)

    async def copy(item: dict[str, Any]) -> None:
        target = destination + item["Key"][len(source) :]
        async with slots:
            attempted.append(target)
            listed = {"ContentLength": item["Size"], "ETag": item["ETag"], "StorageClass": item.get("StorageClass")}
            etag = await copy_object(ctx, item["Key"], target, listed)
            moved.append(FactMove(item["Key"], etag_of(item), target, etag))

    try:
        async for page in pages(ctx, source):
            results = await asyncio.gather(*(copy(item) for item in page), return_exceptions=True)
            failures = [result for result in results if isinstance(result, BaseException)]
            if failures:
                raise failures[0]
    except BaseException:
        await run_to_completion(delete_keys(ctx, attempted))
        raise
    async for page in pages(ctx, source):
        await delete_keys(ctx, [item["Key"] for item in page])
    await ctx.facts.move(moved)


async def pages(ctx: S3Context, prefix: str) -> AsyncIterator[Keys]:
    """Every key under ``prefix`` (no delimiter), a ListObjectsV2 page at a time."""
    token: dict[str, str] = {}
    while True:
        response = await ctx.call("list_objects_v2", Prefix=prefix, **token)
        yield response.get("Contents", [])
        if not response.get("IsTruncated"):
            return
        token = {"ContinuationToken": response["NextContinuationToken"]}


async def delete_keys(ctx: S3Context, keys: Sequence[str]) -> None:
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start : start + 1000]]
        response = await ctx.call("delete_objects", Delete={"Objects": batch, "Quiet": True})
        if response.get("Errors"):
            first = response["Errors"][0]
            raise OSError(errno.EIO, f"S3 could not delete {len(response['Errors'])} keys: {first}", first["Key"])
