"""aioftp's user manager on the user database.

Differences from aioftp's ``MemoryUserManager``, each on purpose:

* ``USER`` takes nothing: every name gets ``331`` (aioftp's ``get_user`` returns a placeholder,
  :class:`PendingLogin`), so neither the reply nor its timing tells which names exist, and bare ``USER``
  commands cannot use up a user's session slots. The password is checked at ``PASS`` (:meth:`login`), then
  ``max_sessions`` (:meth:`acquire`).
* While a user has sessions, all of them share one :class:`GatewayUser` object, so the server's per-user
  throttle (weakly keyed by that object) is shared by them; with the last session the object is dropped, and so
  is its throttle. A change to the user in the database makes the next login build a fresh object.
* The user's row is read at every login, also when the password is in the :class:`PasswordCache`: whether
  the user may log in and with what comes from the database, only argon2id's verdict from memory.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath

import aioftp

from gateway.config import Settings
from gateway.users.db import describe_error
from gateway.users.password_cache import PasswordCache
from gateway.users.passwords import Passwords
from gateway.users.store import UserRecord, UserStore
from pathio_backends import BackendResources, StorageFactory, path_io_factory

logger = logging.getLogger(__name__)


class UserDatabaseUnavailable(Exception):
    """The user database could not answer; the login is refused with 421, the server keeps running."""


class PendingLogin(aioftp.User):
    """A name given with ``USER`` whose password has not been checked; it may read or write nothing."""

    def __init__(self, login: str) -> None:
        super().__init__(login=login, permissions=[aioftp.Permission("/", readable=False, writable=False)])


class GatewayUser(aioftp.User):
    """A logged-in user: aioftp's ``User`` plus its storage and where it came from in the database."""

    def __init__(self, row: UserRecord, storage: StorageFactory) -> None:
        permissions = [aioftp.Permission(p.path, readable=p.readable, writable=p.writable) for p in row.permissions]
        if not any(p.path == PurePosixPath("/") for p in permissions):
            # aioftp grants read+write where no entry matches; a missing "/" row must not mean that.
            permissions.append(aioftp.Permission("/", readable=False, writable=False))
        super().__init__(
            login=row.name,
            base_path=storage.base_path,
            home_path=row.home,
            permissions=permissions,
            maximum_connections=row.max_sessions,
            # aioftp's "read" is the server reading from the client: uploads.
            read_speed_limit=row.upload_limit,
            write_speed_limit=row.download_limit,
        )
        self.user_id = row.id
        self.revision = row.revision
        # With id and revision, what tells a user from one deleted before it: SQLite gives a user added after a
        # delete the old row's id (when it was the highest), and revisions start at 1 again.
        self.created_at = row.created_at
        self.storage = storage
        # "required" or "optional"; None: the server's tls.required decides.
        self.tls = row.tls
        # None: no quota. The usage is not kept here: it is read from the database (gateway.quota).
        self.quota_bytes = row.quota_bytes
        self.quota_files = row.quota_files


@dataclass(frozen=True)
class LoginOutcome:
    user: GatewayUser | None
    # Why a login was refused, for the log only: the client always hears the same "Login incorrect".
    reason: str = ""
    new_password_hash: str | None = None
    # The user's last login as the database had it before this one.
    last_login_at: datetime | None = None


class DatabaseUserManager(aioftp.AbstractUserManager):
    def __init__(
        self,
        store: UserStore,
        settings: Settings,
        resources: BackendResources,
        passwords: Passwords,
    ) -> None:
        super().__init__(timeout=settings.database.timeout)
        self.store = store
        self.settings = settings
        self.resources = resources
        self.passwords = passwords
        login = settings.login
        self.password_cache = (
            PasswordCache(login.password_cache_ttl, login.password_cache_size) if login.password_cache else None
        )
        self._active: dict[str, GatewayUser] = {}
        self._sessions: dict[str, int] = {}

    # -- aioftp's interface ----------------------------------------------------------------------------

    async def get_user(self, login: str) -> tuple[aioftp.AbstractUserManager.GetUserResponse, aioftp.User, str]:
        return self.GetUserResponse.PASSWORD_REQUIRED, PendingLogin(login), "password required"

    async def authenticate(self, user: aioftp.User, password: str) -> bool:
        return (await self.login(user.login or "", password)).user is not None

    async def notify_logout(self, user: aioftp.User) -> None:
        if isinstance(user, GatewayUser):
            self.release(user)

    # -- the gateway's login -----------------------------------------------------------------------------

    async def login(self, name: str, password: str) -> LoginOutcome:
        """Check the password against the database; the caller then calls :meth:`acquire`."""
        try:
            async with asyncio.timeout(self.settings.database.timeout):
                row = await self.store.get(name)
        except Exception as exc:
            logger.error("user database unavailable: %s", describe_error(exc))
            raise UserDatabaseUnavailable(describe_error(exc)) from exc
        if row is None:
            await self.passwords.verify(None, password)
            return LoginOutcome(None, "unknown user")
        cache = self.password_cache
        remembered = cache is not None and cache.check(name, password, row)
        if not remembered and not await self.passwords.verify(row.password_hash, password):
            return LoginOutcome(None, "wrong password")
        if not row.enabled:
            return LoginOutcome(None, "user disabled")
        try:
            user = self._user_for(row)
        except ValueError as exc:
            return LoginOutcome(None, f"unusable storage: {exc}")
        rehash = None
        if not remembered:
            # A remembered login was verified against this same hash, which was rehashed then if it needed to be.
            if self.passwords.needs_rehash(row.password_hash):
                rehash = await self.passwords.hash(password)
            if cache is not None:
                cache.remember(name, password, row, rehash)
        return LoginOutcome(user, new_password_hash=rehash, last_login_at=row.last_login_at)

    def _user_for(self, row: UserRecord) -> GatewayUser:
        cached = self._active.get(row.name)
        if (
            cached is not None
            and cached.revision == row.revision
            and cached.user_id == row.id
            and cached.created_at == row.created_at
        ):
            return cached
        default = self.settings.storage.default_uri
        uri = row.storage_uri or default.replace("{username}", row.name)
        storage = path_io_factory(uri, self.resources)
        return GatewayUser(row, storage)

    def acquire(self, user: GatewayUser) -> bool:
        """Take one of the user's session slots; False when ``max_sessions`` are already in use."""
        count = self._sessions.get(user.login or "", 0)
        if user.maximum_connections is not None and count >= user.maximum_connections:
            return False
        self._sessions[user.login or ""] = count + 1
        self._active[user.login or ""] = user
        return True

    def release(self, user: GatewayUser) -> None:
        name = user.login or ""
        count = self._sessions.get(name, 0) - 1
        if count > 0:
            self._sessions[name] = count
        else:
            self._sessions.pop(name, None)
            self._active.pop(name, None)

    def sessions(self, name: str) -> int:
        return self._sessions.get(name, 0)

    async def record_login(self, user: GatewayUser, outcome: LoginOutcome) -> None:
        """Stamp the login time, unless the stored one is recent (``login.last_login_resolution``), and write a
        rehashed password; a failure is logged and does not undo the login."""
        resolution = timedelta(seconds=self.settings.login.last_login_resolution)
        last = outcome.last_login_at
        if outcome.new_password_hash is None and last is not None and datetime.now(UTC) - last < resolution:
            return
        try:
            async with asyncio.timeout(self.settings.database.timeout):
                await self.store.record_login(user.user_id, user.revision, outcome.new_password_hash)
        except Exception as exc:
            logger.warning("could not record the login of %s: %s", user.login, describe_error(exc))
