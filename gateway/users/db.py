"""Database URLs, engines and the schema (Alembic migrations shipped inside the package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Connection, event, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.config import DatabaseSettings

ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


class DatabaseError(Exception):
    """The database cannot be used as configured; the message is one line for the operator."""


class SchemaOutOfDate(DatabaseError):
    pass


def normalize_url(url: str) -> URL:
    """Accept plain ``sqlite:///path`` and ``postgresql://user@host/db`` and give them their async drivers."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"database URL {url!r} is not a valid SQLAlchemy URL") from None
    driver = ASYNC_DRIVERS.get(parsed.drivername)
    if driver is None:
        raise DatabaseError(
            f"database URL scheme {parsed.drivername!r} is not supported (use sqlite:///path or postgresql://...)"
        )
    parsed = parsed.set(drivername=driver)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise DatabaseError("an in-memory SQLite database cannot keep users: give a file, sqlite:///path/to/users.db")
    return parsed


def display_url(url: str | URL) -> str:
    """The URL with any password masked, for logs and messages."""
    try:
        return (make_url(url) if isinstance(url, str) else url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid URL>"


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def create_engine(settings: DatabaseSettings) -> AsyncEngine:
    url = normalize_url(settings.url)
    if is_sqlite(url):
        Path(url.database or "").expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": settings.timeout}, hide_parameters=True)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL: the CLI can change users while a server reads them.
            cursor.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL cannot corrupt the database; a power cut may lose the last login stamps.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(settings.timeout * 1000)}")
            cursor.close()

        return engine
    return create_async_engine(
        url,
        pool_pre_ping=True,
        # An error's message and traceback then hold no query parameters (user names, password hashes).
        hide_parameters=True,
        connect_args={"timeout": settings.timeout, "command_timeout": settings.timeout},
    )


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", "gateway.users:migrations")
    return config


def _upgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _revisions(connection: Connection) -> tuple[str | None, str | None]:
    current = MigrationContext.configure(connection).get_current_revision()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    return current, head


async def upgrade(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (``ftp-gateway db upgrade``)."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)


async def schema_revisions(engine: AsyncEngine) -> tuple[str | None, str | None]:
    async with engine.connect() as connection:
        return await connection.run_sync(_revisions)


async def ensure_schema(engine: AsyncEngine) -> None:
    """An embedded SQLite database is created or upgraded in place; any other must already be current."""
    if is_sqlite(engine.url):
        await upgrade(engine)
        return
    current, head = await schema_revisions(engine)
    if current != head:
        state = "has no ftp-gateway schema" if current is None else f"is at schema revision {current}"
        raise SchemaOutOfDate(
            f"database {display_url(engine.url)} {state}, this version needs {head}: run 'ftp-gateway db upgrade'"
        )


def describe_error(exc: BaseException) -> str:
    """One line for an error raised while talking to the database."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        first = exc.strerror
    return first.removeprefix("(") if first else type(exc).__name__


__all__ = [
    "DatabaseError",
    "SchemaOutOfDate",
    "create_engine",
    "describe_error",
    "display_url",
    "ensure_schema",
    "normalize_url",
    "schema_revisions",
    "upgrade",
]
