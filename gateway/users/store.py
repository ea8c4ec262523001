"""Reading and changing users in the database: used by the CLI and by the server's user manager."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import BigInteger, bindparam, case, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from gateway.users.models import PermissionRow, UserRow
from pathio_backends.uri import check_uri

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
PERMISSION_MODES = {"rw": (True, True), "r": (True, False), "w": (False, True), "none": (False, False)}
# A user's TLS requirement; "default" (stored as NULL) follows the server's tls.required.
TLS_MODES = ("required", "optional", "default")


class UserError(Exception):
    """A request about users that cannot be carried out; the message is one line for the operator."""


class UserNotFound(UserError):
    pass


class UserExists(UserError):
    pass


class InvalidUserInput(UserError, ValueError):
    pass


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidUserInput(
            f"invalid user name {name!r}: 1-64 characters of letters, digits, '.', '_', '@', '-', "
            "starting with a letter or digit"
        )
    return name


def normalize_virtual_path(path: str, what: str = "path") -> str:
    """An absolute virtual path without '.', '..' or doubled slashes, e.g. '/incoming/scans'."""
    if not path.startswith("/") or "\x00" in path or "\n" in path or "\r" in path:
        raise InvalidUserInput(f"{what} {path!r} must be an absolute path such as /incoming")
    parts = [p for p in PurePosixPath(path).parts[1:] if p != "."]
    if ".." in parts:
        raise InvalidUserInput(f"{what} {path!r} must not contain '..'")
    return str(PurePosixPath("/", *parts))


def parse_permission(text: str) -> tuple[str, bool, bool]:
    """``/incoming=rw`` (modes: rw, r, w, none) to ``("/incoming", True, True)``."""
    path, sep, mode = text.rpartition("=")
    if not sep or mode not in PERMISSION_MODES:
        raise InvalidUserInput(f"invalid permission {text!r}: expected PATH=MODE with MODE one of rw, r, w, none")
    readable, writable = PERMISSION_MODES[mode]
    return normalize_virtual_path(path, "permission path"), readable, writable


def check_storage_uri(uri: str) -> str:
    try:
        check_uri(uri.replace("{username}", "user"))
    except ValueError as exc:
        raise InvalidUserInput(str(exc)) from None
    return uri


def check_limit(value: int | None, what: str) -> int | None:
    """None or 0 mean unlimited."""
    if value is None or value == 0:
        return None
    if value < 0:
        raise InvalidUserInput(f"{what} must be 0 (unlimited) or a positive number, not {value}")
    return value


def check_tls(value: str | None) -> str | None:
    """``required`` or ``optional``; None or ``default``: the server's ``tls.required`` decides (stored as NULL)."""
    if value is None or value == "default":
        return None
    if value not in TLS_MODES:
        raise InvalidUserInput(f"invalid TLS mode {value!r}: expected one of {', '.join(TLS_MODES)}")
    return value


def permission_text(readable: bool, writable: bool) -> str:
    return {(True, True): "rw", (True, False): "r", (False, True): "w", (False, False): "none"}[(readable, writable)]


@dataclass(frozen=True)
class UserInfo:
    """A user as the CLI shows it: everything but the password hash."""

    name: str
    enabled: bool
    storage_uri: str | None
    home: str
    max_sessions: int | None
    upload_limit: int | None
    download_limit: int | None
    permissions: dict[str, str]
    created_at: datetime | None
    last_login_at: datetime | None
    tls: str | None = None
    quota_bytes: int | None = None
    quota_files: int | None = None
    used_bytes: int = 0
    used_files: int = 0

    @classmethod
    def from_row(cls, row: UserRow | UserRecord) -> UserInfo:
        return cls(
            name=row.name,
            enabled=row.enabled,
            storage_uri=row.storage_uri,
            home=row.home,
            max_sessions=row.max_sessions,
            upload_limit=row.upload_limit,
            download_limit=row.download_limit,
            permissions={p.path: permission_text(p.readable, p.writable) for p in row.permissions},
            created_at=row.created_at,
            last_login_at=row.last_login_at,
            tls=row.tls,
            quota_bytes=row.quota_bytes,
            quota_files=row.quota_files,
            used_bytes=row.used_bytes,
            used_files=row.used_files,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "enabled": self.enabled,
            "storage": self.storage_uri,
            "home": self.home,
            "max_sessions": self.max_sessions,
            "upload_limit": self.upload_limit,
            "download_limit": self.download_limit,
            "permissions": dict(self.permissions),
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "last_login_at": self.last_login_at.isoformat() if self.last_login_at else None,
            "tls": self.tls,
            "quota_bytes": self.quota_bytes,
            "quota_files": self.quota_files,
            "used_bytes": self.used_bytes,
            "used_files": self.used_files,
        }


@dataclass
class UserChanges:
    """What ``user set`` changes; fields left at their default are not touched."""

    storage_uri: str | None = None
    default_storage: bool = False
    home: str | None = None
    max_sessions: int | None = None
    upload_limit: int | None = None
    download_limit: int | None = None
    tls: str | None = None
    quota_bytes: int | None = None
    quota_files: int | None = None
    enabled: bool | None = None
    password_hash: str | None = None
    permissions: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    remove_permissions: list[str] = field(default_factory=list)
    # Limits (and tls) are applied when their name is listed here (so "set to unlimited" or "back to the server's
    # default" differs from "leave as is").
    set_limits: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class PermissionRecord:
    path: str
    readable: bool
    writable: bool


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user as a login reads it (:meth:`UserStore.get`): its row and its permissions, detached from any session."""

    id: int
    name: str
    password_hash: str
    storage_uri: str | None
    home: str
    enabled: bool
    max_sessions: int | None
    upload_limit: int | None
    download_limit: int | None
    created_at: datetime
    updated_at: datetime
    last_login_at: datetime | None
    revision: int
    tls: str | None
    quota_bytes: int | None
    quota_files: int | None
    used_bytes: int
    used_files: int
    permissions: tuple[PermissionRecord, ...]


_USERS = UserRow.__table__
_PERMISSIONS = PermissionRow.__table__
_GET_USER = (
    select(
        _USERS,
        _PERMISSIONS.c.path.label("permission_path"),
        _PERMISSIONS.c.readable,
        _PERMISSIONS.c.writable,
    )
    .outerjoin(_PERMISSIONS, _PERMISSIONS.c.user_id == _USERS.c.id)
    .where(_USERS.c.name == bindparam("name"))
    .order_by(_PERMISSIONS.c.path)
)

_USAGE = select(_USERS.c.used_bytes, _USERS.c.used_files).where(_USERS.c.id == bindparam("user_id"))


def _at_least_zero(column: Any, delta: Any) -> Any:
    return case((column + delta < 0, 0), else_=column + delta)


_ADD_USAGE = (
    update(UserRow)
    .where(UserRow.id == bindparam("user_id"))
    .values(
        used_bytes=_at_least_zero(UserRow.used_bytes, bindparam("bytes", type_=BigInteger)),
        used_files=_at_least_zero(UserRow.used_files, bindparam("files", type_=BigInteger)),
    )
)


def _now() -> datetime:
    return datetime.now(UTC)


class UserStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def add(
        self,
        name: str,
        password_hash: str,
        *,
        storage_uri: str | None = None,
        home: str = "/",
        read_only: bool = False,
        max_sessions: int | None = None,
        upload_limit: int | None = None,
        download_limit: int | None = None,
        tls: str | None = None,
        quota_bytes: int | None = None,
        quota_files: int | None = None,
        permissions: Mapping[str, tuple[bool, bool]] | None = None,
    ) -> UserInfo:
        check_name(name)
        grants = dict(permissions or {})
        grants.setdefault("/", (True, not read_only))
        now = _now()
        row = UserRow(
            name=name,
            password_hash=password_hash,
            storage_uri=check_storage_uri(storage_uri) if storage_uri else None,
            home=normalize_virtual_path(home, "home"),
            enabled=True,
            max_sessions=check_limit(max_sessions, "max sessions"),
            upload_limit=check_limit(upload_limit, "upload limit"),
            download_limit=check_limit(download_limit, "download limit"),
            tls=check_tls(tls),
            quota_bytes=check_limit(quota_bytes, "byte quota"),
            quota_files=check_limit(quota_files, "file quota"),
            used_bytes=0,
            used_files=0,
            created_at=now,
            updated_at=now,
            revision=1,
            permissions=[
                PermissionRow(path=normalize_virtual_path(path, "permission path"), readable=r, writable=w)
                for path, (r, w) in grants.items()
            ],
        )
        async with self._sessions() as session:
            session.add(row)
            try:
                await session.commit()
            except IntegrityError:
                raise UserExists(f"user {name!r} already exists") from None
            return UserInfo.from_row(row)

    async def get(self, name: str) -> UserRecord | None:
        """The user with its permissions, in one query (every login runs it). Read with SQLAlchemy Core into plain
        records: the ORM's unit of work cost three times the CPU (1.5 ms against 0.5 ms a login, SQLite)."""
        async with self.engine.connect() as connection:
            rows = (await connection.execute(_GET_USER, {"name": name})).all()
        if not rows:
            return None
        first = rows[0]._mapping
        permissions = tuple(
            PermissionRecord(row.permission_path, row.readable, row.writable)
            for row in rows
            if row.permission_path is not None
        )
        return UserRecord(**{column.name: first[column] for column in _USERS.columns}, permissions=permissions)

    async def info(self, name: str) -> UserInfo:
        row = await self.get(name)
        if row is None:
            raise UserNotFound(f"no user {name!r}")
        return UserInfo.from_row(row)

    async def count(self) -> int:
        async with self._sessions() as session:
            return int((await session.execute(select(func.count()).select_from(UserRow))).scalar_one())

    async def list(self) -> list[UserInfo]:
        async with self._sessions() as session:
            result = await session.execute(select(UserRow).order_by(UserRow.name))
            return [UserInfo.from_row(row) for row in result.scalars()]

    async def change(self, name: str, changes: UserChanges) -> UserInfo:
        async with self._sessions() as session:
            result = await session.execute(select(UserRow).where(UserRow.name == name))
            row = result.scalar_one_or_none()
            if row is None:
                raise UserNotFound(f"no user {name!r}")
            if changes.default_storage:
                row.storage_uri = None
            elif changes.storage_uri is not None:
                row.storage_uri = check_storage_uri(changes.storage_uri)
            if changes.home is not None:
                row.home = normalize_virtual_path(changes.home, "home")
            if "max_sessions" in changes.set_limits:
                row.max_sessions = check_limit(changes.max_sessions, "max sessions")
            if "upload_limit" in changes.set_limits:
                row.upload_limit = check_limit(changes.upload_limit, "upload limit")
            if "download_limit" in changes.set_limits:
                row.download_limit = check_limit(changes.download_limit, "download limit")
            if "tls" in changes.set_limits:
                row.tls = check_tls(changes.tls)
            if "quota_bytes" in changes.set_limits:
                row.quota_bytes = check_limit(changes.quota_bytes, "byte quota")
            if "quota_files" in changes.set_limits:
                row.quota_files = check_limit(changes.quota_files, "file quota")
            if changes.enabled is not None:
                row.enabled = changes.enabled
            if changes.password_hash is not None:
                row.password_hash = changes.password_hash
            by_path = {p.path: p for p in row.permissions}
            for raw_path in changes.remove_permissions:
                path = normalize_virtual_path(raw_path, "permission path")
                if path == "/":
                    raise InvalidUserInput("the '/' permission cannot be removed; set it to r, w, rw or none")
                if path not in by_path:
                    raise InvalidUserInput(f"user {name!r} has no permission entry for {path!r}")
                row.permissions.remove(by_path.pop(path))
            for raw_path, (readable, writable) in changes.permissions.items():
                path = normalize_virtual_path(raw_path, "permission path")
                if path in by_path:
                    by_path[path].readable, by_path[path].writable = readable, writable
                else:
                    by_path[path] = PermissionRow(path=path, readable=readable, writable=writable)
                    row.permissions.append(by_path[path])
            row.updated_at = _now()
            row.revision = row.revision + 1
            await session.commit()
            await session.refresh(row, ["permissions"])
            return UserInfo.from_row(row)

    async def delete(self, name: str) -> None:
        async with self._sessions() as session:
            result = await session.execute(select(UserRow).where(UserRow.name == name))
            row = result.scalar_one_or_none()
            if row is None:
                raise UserNotFound(f"no user {name!r}")
            await session.delete(row)
            await session.commit()

    async def usage(self, user_id: int) -> tuple[int, int] | None:
        """The user's bytes and files in use, as accounted, or None if the user is gone."""
        async with self.engine.connect() as connection:
            row = (await connection.execute(_USAGE, {"user_id": user_id})).first()
        return None if row is None else (int(row.used_bytes), int(row.used_files))

    async def add_usage(self, user_id: int, delta_bytes: int, delta_files: int) -> None:
        """Change the usage by a delta in one statement, so changes from several sessions and replicas add up
        (never below 0: a file removed behind the gateway's back may be deleted again). Neither the revision nor
        ``updated_at`` moves: usage is no change to the user, and must not invalidate its cached logins."""
        async with self.engine.begin() as connection:
            await connection.execute(_ADD_USAGE, {"user_id": user_id, "bytes": delta_bytes, "files": delta_files})

    async def set_usage(self, name: str, used_bytes: int, used_files: int) -> None:
        """Set the usage counted from the storage (``user rescan``)."""
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(UserRow).where(UserRow.name == name).values(used_bytes=used_bytes, used_files=used_files)
            )
        if result.rowcount == 0:
            raise UserNotFound(f"no user {name!r}")

    async def record_login(self, user_id: int, revision: int, new_password_hash: str | None = None) -> None:
        """Stamp the last login. A hash made with newer parameters replaces the old one at the same time, unless the
        user has changed since its login read it (revision): a ``user passwd`` in between must win."""
        async with self._sessions() as session:
            await session.execute(update(UserRow).where(UserRow.id == user_id).values(last_login_at=_now()))
            if new_password_hash is not None:
                await session.execute(
                    update(UserRow)
                    .where(UserRow.id == user_id, UserRow.revision == revision)
                    .values(password_hash=new_password_hash)
                )
            await session.commit()
