"""How the S3 backend talks to S3, and what S3's answers mean.

One aiobotocore client (one connection pool) and one :class:`AbortJanitor` serve every session of a server
(:class:`S3Shared`, made on first use by ``pathio_backends.resources.BackendResources`` and closed with the
server); an :class:`S3Context` is one bucket and prefix, and sends every request through :meth:`S3Context.call`,
where failures become builtin exceptions (``errors.translate``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from pathio_backends.facts import FactsIndex, ObjectFacts
from pathio_backends.observer import NoObserver, StorageObserver
from pathio_backends.s3.errors import S3_ERRORS, translate
from pathio_backends.s3.settings import S3Settings

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
# S3's limits: the smallest part but the last, the largest part (and the largest CopyObject), the most parts.
MIN_PART = 5 * MiB
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000
MAX_KEY_BYTES = 1024

# User metadata (x-amz-meta-*) the gateway writes and reads. "mtime" (seconds since the epoch, as a decimal) is
# what rclone's S3 backend and s3fs use too, so times set by either tool show here, and ours there.
META_SHA256 = "sha256"
META_MTIME = "mtime"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

DIR_MODE = stat.S_IFDIR | 0o755
FILE_MODE = stat.S_IFREG | 0o644


# -- what S3's answers mean --------------------------------------------------------------------------------


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


def metadata_sha256(metadata: dict[str, str]) -> str | None:
    value = str(metadata.get(META_SHA256, "")).lower()
    return value if SHA256_HEX.fullmatch(value) else None


def format_mtime(mtime: float) -> str:
    return f"{mtime:.3f}".rstrip("0").rstrip(".")


# -- the client ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Shared:
    """What every S3 storage of one server shares: the client with its connection pool, and the janitor."""

    client: Any
    janitor: AbortJanitor

    @classmethod
    async def open(cls, settings: S3Settings, stack: AsyncExitStack) -> S3Shared:
        """Make both; their clean-up goes on ``stack`` (the janitor's first, so it can still use the client)."""
        client = await stack.enter_async_context(_create_client(settings))
        janitor = AbortJanitor()
        stack.push_async_callback(janitor.close)
        return cls(client, janitor)


def _create_client(s: S3Settings) -> Any:
    session = get_session()
    if s.profile:
        session.set_config_variable("profile", s.profile)
    config = AioConfig(
        region_name=s.region,
        s3={"addressing_style": s.addressing_style, "payload_signing_enabled": s.payload_signing},
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        # Attempts in all, the first one included (botocore's own "max_attempts" counts the retries only).
        retries={"total_max_attempts": s.max_attempts, "mode": "standard"},
        max_pool_connections=s.max_pool_connections,
        # Checksums only where S3 requires them: other S3-compatible stores reject the newer defaults.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        warm_up_loader_caches=True,
    )
    return session.create_client(
        "s3",
        endpoint_url=s.endpoint_url,
        aws_access_key_id=s.access_key_id,
        aws_secret_access_key=s.secret_access_key.get_secret_value() if s.secret_access_key else None,
        aws_session_token=s.session_token.get_secret_value() if s.session_token else None,
        config=config,
    )


class S3Context:
    """One bucket and prefix, and how to talk to S3 about them."""

    def __init__(
        self,
        settings: S3Settings,
        shared: Callable[[], Awaitable[S3Shared]],
        facts: ObjectFacts | None,
        bucket: str,
        prefix: str,
        observer: StorageObserver | None = None,
    ) -> None:
        self.settings = settings
        self.shared = shared
        self.observer: StorageObserver = observer or NoObserver()
        self.bucket = bucket
        self.prefix = prefix
        self.facts = FactsIndex(facts, bucket, "s3")
        # Arguments of every request that writes an object.
        self.write_args: dict[str, str] = {}
        if settings.server_side_encryption:
            self.write_args["ServerSideEncryption"] = settings.server_side_encryption
        if settings.kms_key_id:
            self.write_args["SSEKMSKeyId"] = settings.kms_key_id
        if settings.storage_class:
            self.write_args["StorageClass"] = settings.storage_class

    async def call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """``client.<operation>(Bucket=..., **kwargs)``; a failure is a builtin OSError (``errors.translate``)."""
        client = (await self.shared()).client
        name = "".join(word.capitalize() for word in operation.split("_"))
        started = time.monotonic()
        try:
            response: dict[str, Any] = await getattr(client, operation)(Bucket=self.bucket, **kwargs)
        except S3_ERRORS as exc:
            self.observer.s3_request(name, outcome_of(exc), time.monotonic() - started)
            raise translate(exc, name, kwargs.get("Key") or kwargs.get("Prefix")) from exc
        self.observer.s3_request(name, "ok", time.monotonic() - started)
        return response

    async def abort_later(self, key: str, upload_id: str) -> None:
        """Hand a multipart upload whose abort failed to the janitor."""
        (await self.shared()).janitor.abort_later(self, key, upload_id)


def outcome_of(exc: BaseException) -> str:
    """A failed request's outcome label: the class of S3's HTTP status, or ``error`` when none came."""
    # botocore's ReadTimeoutError and ConnectionClosedError have a ``response`` attribute, set to None.
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if isinstance(status, int) and 400 <= status < 600:
        return f"{status // 100}xx"
    return "error"


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
                ctx.observer.multipart_ended()
                return  # already gone
            except Exception as exc:  # noqa: BLE001 - whatever it was, the upload is still there to abort
                if not isinstance(exc, OSError):
                    logger.warning("aborting multipart upload %s of %s failed: %r", upload_id, key, exc)
                delay = min(delay * 2, self.MAX_DELAY)
                continue
            ctx.observer.multipart_ended()
            logger.info("aborted multipart upload %s of %s on a later attempt", upload_id, key)
            return

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            logger.error("%d multipart uploads could not be aborted before shutdown", len(self._tasks))
            await asyncio.wait(set(self._tasks))
