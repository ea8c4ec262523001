"""``ftp-gateway user rescan NAME``: count a user's files and bytes in its storage, through the same backend a
session uses, and set them as the user's usage (``gateway.quota``) -- for files changed by other tools, or
changes whose count was lost to a database error.

A change made by a session while the walk runs may be counted by both (or neither): run it again when the user
is idle to be exact.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Settings
from gateway.users.store import UserNotFound, UserStore
from pathio_backends import BackendResources, path_io_factory
from pathio_backends.base import TransactionalPathIO


@dataclass(frozen=True)
class Rescanned:
    name: str
    storage: str
    before: tuple[int, int]
    after: tuple[int, int]

    def describe(self) -> str:
        (old_bytes, old_files), (new_bytes, new_files) = self.before, self.after
        return (
            f"{self.name}: {new_bytes} bytes in {new_files} files in {self.storage} "
            f"(was {old_bytes} bytes in {old_files} files)"
        )


async def count(path_io: TransactionalPathIO, root: Path) -> tuple[int, int]:
    """Bytes and regular files under ``root``, walking its directories (each listed entry's stat comes with the
    listing). A directory reached twice (a symlink on local disk) is walked once."""
    total_bytes = total_files = 0
    pending = [root]
    seen: set[tuple[int, int]] = set()
    while pending:
        directory = pending.pop()
        async for path in path_io.list(directory):
            st = await path_io.stat(path)
            if stat.S_ISDIR(st.st_mode):
                if st.st_ino and (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                pending.append(path)
            elif stat.S_ISREG(st.st_mode):
                total_bytes += st.st_size
                total_files += 1
    return total_bytes, total_files


async def rescan(settings: Settings, store: UserStore, name: str) -> Rescanned:
    """Count the user's storage and store the result as its usage."""
    row = await store.get(name)
    if row is None:
        raise UserNotFound(f"no user {name!r}")
    uri = row.storage_uri or settings.storage.default_uri.replace("{username}", name)
    resources = BackendResources(s3=settings.s3)
    try:
        storage = path_io_factory(uri, resources)
        try:
            await storage.prepare(create=False)
        except FileNotFoundError:
            if not uri.startswith("file:"):
                raise
            usage = (0, 0)  # a local root is made at the first login: nothing stored yet
        else:
            usage = await count(storage(timeout=settings.timeouts.path), storage.base_path)
    finally:
        await resources.aclose()
    await store.set_usage(name, *usage)
    return Rescanned(name, uri, (row.used_bytes, row.used_files), usage)
