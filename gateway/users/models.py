"""Tables of the user database. Changes to them go through an Alembic migration in ``migrations/versions``."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Double, ForeignKey, Integer, String, UniqueConstraint, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class UserRow(Base):
    __tablename__ = "ftp_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    # None: the server's default storage (storage.default_uri with {username}).
    storage_uri: Mapped[str | None] = mapped_column(String(2048))
    home: Mapped[str] = mapped_column(String(1024), default="/")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    max_sessions: Mapped[int | None] = mapped_column(Integer)
    # Bytes per second over all of the user's sessions; None: unlimited.
    upload_limit: Mapped[int | None] = mapped_column(BigInteger)
    download_limit: Mapped[int | None] = mapped_column(BigInteger)
    # "required" or "optional"; None: the server's tls.required decides.
    tls: Mapped[str | None] = mapped_column(String(16))
    # None: no quota. The usage is what the gateway accounted (gateway.quota); `user rescan` recounts it.
    quota_bytes: Mapped[int | None] = mapped_column(BigInteger)
    quota_files: Mapped[int | None] = mapped_column(Integer)
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    used_files: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Bumped on every change, so a server can tell a cached login is out of date.
    revision: Mapped[int] = mapped_column(Integer, default=1)

    permissions: Mapped[list[PermissionRow]] = relationship(
        back_populates="user", cascade="all, delete-orphan", lazy="selectin", order_by="PermissionRow.path"
    )


class PermissionRow(Base):
    __tablename__ = "ftp_user_permissions"
    __table_args__ = (UniqueConstraint("user_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("ftp_users.id", ondelete="CASCADE"), index=True)
    # A virtual path ("/", "/incoming"); the nearest entry above a path decides.
    path: Mapped[str] = mapped_column(String(1024))
    readable: Mapped[bool] = mapped_column(Boolean)
    writable: Mapped[bool] = mapped_column(Boolean)

    user: Mapped[UserRow] = relationship(back_populates="permissions")


class ObjectFactRow(Base):
    """What the gateway knows of a stored object that the object cannot hold or a listing does not return: the
    SHA-256 of a multipart upload (whose metadata is fixed before its data arrives) and a time set by MFMT (so
    LIST shows it without a HEAD per entry). A row counts only while the object still has ``etag``; rows of
    objects changed or deleted behind the gateway's back are thereby ignored."""

    __tablename__ = "ftp_object_facts"

    # The bucket (or another backend's container) and the object's key.
    container: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(1024), primary_key=True)
    etag: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str | None] = mapped_column(String(64))
    # Seconds since the epoch, UTC.
    mtime: Mapped[float | None] = mapped_column(Double)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())
