"""Per-user byte and file quotas: checked before an upload starts, bounded while it streams, and the usage they are
checked against, kept in the user database.

Usage lives in ``ftp_users.used_bytes`` and ``used_files`` (so every replica sees the same numbers) and changes by
a delta in one ``UPDATE`` (``UserStore.add_usage``) after each change that took effect: an upload committed
(new file: its size and one file; an overwrite: the new size less the old; APPE: what was appended), a DELE (the
size and one file less), an RNTO over an existing file (that file less; renaming a directory changes nothing).
The size of what is replaced or deleted is learned with a stat before the change. The usage of every user is
kept, with or without a quota, so a quota set later applies at once.

What it does not promise:

* An upload is bounded by the room left when it starts. Uploads of one user running at once (several sessions,
  or replicas) each get that room, so together they may overshoot the quota by what they have in flight; the
  next upload then gets ``552`` at once. Reserving bytes up front would need the size in advance (FTP does not
  send it) or a reservation per block, one database write per block, which costs more than the overshoot.
* A failure of the database after a change took effect (the file is stored, deleted, renamed) does not undo
  the change or fail the command: it is logged, and the usage is off until ``ftp-gateway user rescan NAME``
  recounts it from the storage. So are files changed by other tools.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from gateway.errors import QuotaExceeded, QuotaUnavailable
from gateway.users.db import describe_error
from gateway.users.manager import GatewayUser
from gateway.users.store import UserStore
from pathio_backends.tasks import run_to_completion

logger = logging.getLogger(__name__)


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


class Quotas:
    """One per server: reads and changes usage through the user store, each call bounded by the database
    timeout."""

    def __init__(self, store: UserStore, timeout: float) -> None:
        self.store = store
        self.timeout = timeout

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
        try:
            await run_to_completion(self._add(user.user_id, delta_bytes, delta_files))
        except Exception as exc:  # noqa: BLE001 - the change is done; only its count is lost, and rescan finds it
            logger.warning(
                "usage of %s not updated after %s (%+d bytes, %+d files): %s; 'ftp-gateway user rescan %s' recounts it",
                user.login,
                what,
                delta_bytes,
                delta_files,
                describe_error(exc),
                user.login,
            )

    async def _add(self, user_id: int, delta_bytes: int, delta_files: int) -> None:
        async with asyncio.timeout(self.timeout):
            await self.store.add_usage(user_id, delta_bytes, delta_files)
