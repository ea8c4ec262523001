"""Listings: ListObjectsV2 with ``Delimiter='/'``, a page at a time.

Each entry's stat comes from the page itself (and a time set by MFMT from one query to the facts store per
page), so listing N entries sends N/1000 requests, not a HEAD per entry; the path-io keeps the page's stats
for the ``stat`` calls aioftp makes per listed entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aioftp.common import AbstractAsyncLister
from aioftp.pathio import universal_exception

from pathio_backends.facts import ObjectFact
from pathio_backends.s3.client import S3Context, dir_stat, etag_of, file_stat
from pathio_backends.tasks import with_timeout

Entries = list[tuple[str, os.stat_result]]


def page_entries(prefix: str, response: dict[str, Any], facts: dict[str, ObjectFact]) -> Entries:
    """The names and stats of one ListObjectsV2 page under ``prefix``, sorted by name."""
    entries = []
    for common in response.get("CommonPrefixes", []):
        entries.append((common["Prefix"][len(prefix) : -1], dir_stat()))
    for item in response.get("Contents", []):
        fact = facts.get(item["Key"])
        mtime = fact.mtime if fact is not None and fact.etag == etag_of(item) else None
        entries.append((item["Key"][len(prefix) :], file_stat(item["Size"], item.get("LastModified"), mtime)))
    # Not representable as an FTP name: empty (the marker itself, "a//b") or with line breaks.
    return sorted((name, st) for name, st in entries if name and not set(name) & {"\r", "\n", "\0"})


class S3Lister(AbstractAsyncLister[Path]):
    """The entries of the directory ``path`` (its keys start with ``prefix_of(path)``), page by page; ``listed``
    is told each page's stats (the path-io's listing cache)."""

    def __init__(
        self,
        ctx: S3Context,
        path: Path,
        prefix_of: Callable[[Path], str],
        listed: Callable[[dict[Path, os.stat_result]], None],
        *,
        timeout: float | int | None,
    ) -> None:
        super().__init__(timeout=timeout)
        self.ctx = ctx
        self._path = path
        self._prefix_of = prefix_of
        self._prefix: str | None = None
        self._listed = listed
        self._token: dict[str, str] | None = {}
        self._batch: Entries = []

    @universal_exception
    @with_timeout
    async def __anext__(self) -> Path:
        if self._prefix is None:
            self._prefix = self._prefix_of(self._path)
            self._listed({})
        while not self._batch:
            if self._token is None:
                self._listed({})
                raise StopAsyncIteration
            response = await self.ctx.call("list_objects_v2", Prefix=self._prefix, Delimiter="/", **self._token)
            self._token = (
                {"ContinuationToken": response["NextContinuationToken"]} if response.get("IsTruncated") else None
            )
            # Times set by MFMT: one query to the facts store per page, not a HEAD per entry.
            facts = await self.ctx.facts.lookup([item["Key"] for item in response.get("Contents", [])])
            self._batch = page_entries(self._prefix, response, facts)
            self._listed({self._path / name: st for name, st in self._batch})
            self._batch.reverse()
        name, _ = self._batch.pop()
        return self._path / name
