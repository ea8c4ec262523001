"""Per-user byte and file quotas: checked before an upload starts, bounded while it streams, and the usage they are
checked against, kept in the user database.

Usage lives in ``ftp_users.used_bytes`` and ``used_files`` (so every replica sees the same numbers) and changes by
a delta in one ``UPDATE`` (``UserStore.add_usage``) after each change that took effect: an upload committed
(new file: its size and one file; an overwrite: the new size less the old; APPE: what was appended), a DELE (the
size and one file less), an RNTO over an existing file (that file less; renaming a directory changes nothing).
The usage of every user is kept, with or without a quota, so a quota set later applies at once. A user with a
quota has each change written at once (every replica checks against it); the changes of a user without one are
added up in memory and written once a second (``USAGE_FLUSH``; and when the server stops): their usage is only
shown and becomes a quota's starting point, and a write per upload and per delete took a quarter of the server's
CPU under a churn of small files. A gateway killed (``kill -9``) loses at most that second's changes of such
users, which ``user rescan`` recounts.

The size of what is replaced or deleted is learned with a stat, and the stat, the change and its count are one
critical section per user and path (``Quotas.changing``: an ``asyncio.Lock`` per path in use, weakly kept: it
goes with its last user). Without it two sessions sending ``DELE x`` at once would both see the file, both
delete it (S3's DeleteObject succeeds on a missing key) and both count it: "upload, double DELE" again and
again would store without limit. Now the second finds nothing (550) and counts nothing. An upload holds no lock
while it streams: it watches its path (``Quotas.watch``) and stats the file it replaces again, under the lock at
its commit, only if a change of that path took effect in this process meanwhile (else its first stat still
holds: no second HEAD on S3).

What it does not promise:

* An upload is bounded by the room left when it starts. Uploads of one user running at once (several sessions,
  or replicas) each get that room, so together they may overshoot the quota by what they have in flight; the
  next upload then gets ``552`` at once. Reserving bytes up front would need the size in advance (FTP does not
  send it) or a reservation per block, one database write per block, which costs more than the overshoot.
* The lock is per process. Replicas (or other tools) changing the same path at once can still count a change
  twice, e.g. two gateways that both get ``DELE x`` at the same moment; ``ftp-gateway user rescan NAME`` recounts
  it. (S3's DeleteObject succeeds on a missing key; no conditional delete is sent.) A rename of a directory
  moves files whose own paths are not locked: a ``DELE`` of one of them at that moment may count a file that
  the rename then keeps under its new name.
* A failure of the database after a change took effect (the file is stored, deleted, renamed) does not undo
  the change or fail the command: it is logged, and the usage is off until ``ftp-gateway user rescan NAME``
  recounts it from the storage. So are files changed by other tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import PurePath

from gateway.errors import QuotaExceeded, QuotaUnavailable
from gateway.users.db import describe_error
from gateway.users.manager import GatewayUser
from gateway.users.store import UserStore
from pathio_backends.tasks import run_to_completion

logger = logging.getLogger(__name__)

# Seconds the usage changes of users without a quota are added up before they are written.
USAGE_FLUSH = 1.0


@dataclass(frozen=True, slots=True)
class UploadPlan:
    """An upload as the quota sees it, learned before it starts."""

    # A regular file is replaced (or appended to), of this size.
    existed: bool
    old_size: int
    # Bytes of the old file the new one keeps: its size for APPE, the REST offset for STOR.
    kept: int
    # The most bytes the upload may store, or None: no byte quota.
    room: int | None

    def change(self, stored: int) -> tuple[int, int]:
        """The usage's change, in bytes and files, once the upload stored ``stored`` bytes and committed."""
        return self.kept + stored - self.old_size, 0 if self.existed else 1

    def replacing(self, replaced: int | None) -> UploadPlan:
        """The plan with the file replaced as it is at the commit (``replaced``: its size, None: none): the new
        file is still ``kept`` and what was stored."""
        return dataclasses.replace(self, existed=replaced is not None, old_size=replaced or 0)


@dataclass(slots=True, weakref_slot=True)
class _PathGuard:
    """The lock of one user's path, while anything changes or uploads to it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Changes made under the lock so far.
    changes: int = 0


class PathWatch:
    """One path watched by an upload from before its first stat to its end."""

    def __init__(self, guard: _PathGuard) -> None:
        self._guard = guard
        self._seen = guard.changes

    @property
    def changed(self) -> bool:
        """Did a change of the path (in this process) take effect since the watch began? A stat taken after
        it began and before this answers False still holds."""
        return self._guard.changes != self._seen

    @contextlib.asynccontextmanager
    async def changing(self) -> AsyncIterator[None]:
        """The critical section of a change of the path: stat, change, count. Counted as a change however it
        ends (a change that failed half-way may have taken effect)."""
        async with self._guard.lock:
            try:
                yield
            finally:
                self._guard.changes += 1


class Quotas:
    """One per server: reads and changes usage through the user store, each call bounded by the database
    timeout."""

    def __init__(self, store: UserStore, timeout: float) -> None:
        self.store = store
        self.timeout = timeout
        # The paths being changed or uploaded to, by user id and path. Weakly held: an entry goes with the last
        # change or upload that uses it (however that ends), so the dict holds only what is in use.
        self._guards: weakref.WeakValueDictionary[tuple[int, str], _PathGuard] = weakref.WeakValueDictionary()
        # Usage changes of users without a quota not written yet, by user id: bytes, files, and the login (for the log).
        self._pending: dict[int, tuple[int, int, str | None]] = {}
        self._flusher: asyncio.Task[None] | None = None

    def watch(self, user: GatewayUser, path: PurePath) -> PathWatch:
        """Watch a path of the user's: an upload, from before it learns the size of the file it replaces to its
        commit (the watch keeps the path's lock while it is referenced)."""
        key = (user.user_id, str(path))
        guard = self._guards.get(key)
        if guard is None:
            guard = self._guards[key] = _PathGuard()
        return PathWatch(guard)

    @contextlib.asynccontextmanager
    async def changing(self, user: GatewayUser, *paths: PurePath) -> AsyncIterator[None]:
        """The critical section of a change of the user's paths (DELE: one; RNTO: source and target): the stat
        of what it removes, the change and its count. Locks are taken in the paths' order (no deadlock between
        a rename a to b and one b to a)."""
        async with contextlib.AsyncExitStack() as stack:
            for path in sorted({str(path): path for path in paths}.values(), key=str):
                await stack.enter_async_context(self.watch(user, path).changing())
            yield

    async def plan_upload(self, user: GatewayUser, replaced: int | None, *, offset: int, append: bool) -> UploadPlan:
        """The upload's plan; QuotaExceeded (552) if the user is already at a quota, QuotaUnavailable (451) if
        the usage cannot be read. ``replaced`` is the size of the file uploaded to, or None if there is none."""
        existed = replaced is not None
        old_size = replaced or 0
        kept = old_size if append else min(offset, old_size)
        if user.quota_bytes is None and user.quota_files is None:
            return UploadPlan(existed, old_size, kept, None)
        try:
            async with asyncio.timeout(self.timeout):
                usage = await self.store.usage(user.user_id)
        except Exception as exc:
            logger.error("usage of %s unavailable: %s", user.login, describe_error(exc))
            raise QuotaUnavailable(describe_error(exc)) from exc
        used_bytes, used_files = usage or (0, 0)
        if user.quota_bytes is not None and used_bytes >= user.quota_bytes:
            raise QuotaExceeded(f"byte quota reached: {used_bytes} of {user.quota_bytes} bytes in use")
        if user.quota_files is not None and not existed and used_files >= user.quota_files:
            raise QuotaExceeded(f"file quota reached: {used_files} of {user.quota_files} files in use")
        room = None if user.quota_bytes is None else user.quota_bytes - used_bytes + old_size - kept
        return UploadPlan(existed, old_size, kept, room)

    async def record(self, user: GatewayUser, delta_bytes: int, delta_files: int, what: str) -> None:
        """Add a change to the user's usage. Runs to its end when the caller is cancelled (the change it counts
        has taken effect); a failure is logged, never raised."""
        if delta_bytes == 0 and delta_files == 0:
            return
        if user.quota_bytes is None and user.quota_files is None:
            pending_bytes, pending_files, _ = self._pending.get(user.user_id, (0, 0, user.login))
            self._pending[user.user_id] = (pending_bytes + delta_bytes, pending_files + delta_files, user.login)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush_later(), name="usage-flush")
            return
        await self._write(user.user_id, user.login, delta_bytes, delta_files, what)

    async def _write(self, user_id: int, login: str | None, delta_bytes: int, delta_files: int, what: str) -> None:
        try:
            await run_to_completion(self._add(user_id, delta_bytes, delta_files))
        except Exception as exc:  # noqa: BLE001 - the change is done; only its count is lost, and rescan finds it
            logger.warning(
                "usage of %s not updated after %s (%+d bytes, %+d files): %s; 'ftp-gateway user rescan %s' recounts it",
                login,
                what,
                delta_bytes,
                delta_files,
                describe_error(exc),
                login,
            )

    async def _flush_later(self) -> None:
        while True:
            await asyncio.sleep(USAGE_FLUSH)
            await self.flush()
            if not self._pending:
                return

    async def flush(self) -> None:
        """Write the usage changes added up so far (each user's in one statement). Changes that come meanwhile
        stay for the next flush."""
        for user_id, (delta_bytes, delta_files, login) in list(self._pending.items()):
            await self._write(user_id, login, delta_bytes, delta_files, "changes")
            now_bytes, now_files, _ = self._pending[user_id]
            rest = (now_bytes - delta_bytes, now_files - delta_files)
            if rest == (0, 0):
                del self._pending[user_id]
            else:
                self._pending[user_id] = (*rest, login)

    async def aclose(self) -> None:
        """When the server stops (its sessions have ended): what is left is written."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()

    async def _add(self, user_id: int, delta_bytes: int, delta_files: int) -> None:
        async with asyncio.timeout(self.timeout):
            await self.store.add_usage(user_id, delta_bytes, delta_files)
