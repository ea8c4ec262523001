"""``ftp-gateway s3 cleanup``: abort the multipart uploads a killed gateway left behind.

A gateway aborts its own failed uploads (``AbortJanitor``), but one killed with SIGKILL, or whose S3 stayed
unreachable until it stopped, leaves multipart uploads whose parts stay stored, and billed, unseen by any
listing. This lists them (ListMultipartUploads, page by page: never the whole list in memory) and aborts those
initiated before a cut-off. The cut-off is what keeps uploads still running on a live gateway: S3 has no way to
tell an abandoned upload from a slow one.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from pathio_backends.s3.settings import S3Settings
from pathio_backends.uri import S3Location, parse_uri

DURATION = re.compile(r"(\d+)([smhd]?)")
UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# A progress line on stderr at most this often (seconds), so that a bucket with a million uploads is not a
# million lines.
PROGRESS_EVERY = 1.0


class CleanupFailed(Exception):
    """S3 refused or could not be reached: one line for the operator (exit 1)."""


def duration(text: str) -> timedelta:
    """``--older-than``: ``30m``, ``24h``, ``7d``, ``90s`` or ``0`` (every upload). A bare number is seconds."""
    match = DURATION.fullmatch(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 30m, 24h, 7d, or 0 for all)")
    return timedelta(seconds=int(match[1]) * UNIT_SECONDS[match[2]])


def bucket_and_prefix(text: str) -> S3Location:
    """The ``s3://BUCKET[/PREFIX]`` argument (argparse type: a bad one is exit 2)."""
    try:
        location = parse_uri(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(location, S3Location):
        raise argparse.ArgumentTypeError(f"{text!r}: expected s3://BUCKET[/PREFIX]")
    return location


@dataclass
class Tally:
    found: int = 0
    old: int = 0
    aborted: int = 0
    failed: int = 0

    def summary(self, dry_run: bool) -> str:
        done = f"would abort {self.old}" if dry_run else f"aborted {self.aborted}, failed {self.failed}"
        return f"multipart uploads: found {self.found}, older than the cut-off {self.old}, {done}"


async def _uploads(client: Any, location: S3Location) -> AsyncIterator[dict[str, Any]]:
    """Every multipart upload under the prefix, one page in memory at a time."""
    paginator = client.get_paginator("list_multipart_uploads")
    async for page in paginator.paginate(Bucket=location.bucket, Prefix=location.prefix):
        for upload in page.get("Uploads", []):
            yield upload


async def cleanup(
    settings: S3Settings,
    location: S3Location,
    older_than: timedelta,
    dry_run: bool,
    out: TextIO | None = None,
    err: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Tally:
    """List, and unless ``dry_run`` abort, the uploads under ``location`` initiated before now - ``older_than``.

    Uploads are aborted while the listing goes on (not collected first): memory stays one page whatever the
    bucket holds. An abort that fails is counted and reported, and the rest go on; a listing that fails ends the
    run (:class:`CleanupFailed`), since nothing after it can be seen. Each request is bounded by the client's
    ``s3.connect_timeout`` / ``s3.read_timeout`` and ``s3.max_attempts``.
    """
    # Imported here: the CLI imports this module for its argument types, and a local-disk install never loads
    # an S3 client.
    from pathio_backends.s3.client import S3Shared
    from pathio_backends.s3.errors import S3_ERRORS, translate

    out, err = out or sys.stdout, err or sys.stderr  # looked up now, not at import (tests replace them)
    cutoff = datetime.now(UTC) - older_than
    tally = Tally()
    last_progress = clock()
    try:
        async with AsyncExitStack() as stack:
            client = (await S3Shared.open(settings, stack)).client
            async for upload in _uploads(client, location):
                tally.found += 1
                key, upload_id, initiated = upload["Key"], upload["UploadId"], upload.get("Initiated")
                if older_than and (initiated is None or initiated > cutoff):
                    continue  # too young: perhaps a gateway is still sending its parts
                tally.old += 1
                when = initiated.isoformat() if initiated is not None else "-"
                if dry_run:
                    print(f"would abort {key} {upload_id} initiated {when}", file=out, flush=True)
                else:
                    await _abort(client, location.bucket, key, upload_id, tally, err)
                if clock() - last_progress >= PROGRESS_EVERY:
                    last_progress = clock()
                    print(f"... {tally.summary(dry_run)}", file=err, flush=True)
    except S3_ERRORS as exc:
        error = translate(exc, "ListMultipartUploads", None)
        raise CleanupFailed(f"s3://{location.bucket}/{location.prefix}: {error.strerror}") from None
    print(tally.summary(dry_run), file=out, flush=True)
    return tally


async def _abort(client: Any, bucket: str, key: str, upload_id: str, tally: Tally, err: TextIO) -> None:
    from pathio_backends.s3.errors import S3_ERRORS, translate

    try:
        await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except S3_ERRORS as exc:
        error = translate(exc, "AbortMultipartUpload", key)
        if isinstance(error, FileNotFoundError):
            tally.aborted += 1  # NoSuchUpload: gone meanwhile (completed or aborted by someone else)
            return
        tally.failed += 1
        print(f"cannot abort {key} {upload_id}: {error.strerror}", file=err, flush=True)
        return
    tally.aborted += 1
