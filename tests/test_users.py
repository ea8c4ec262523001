"""Logins against users in SQLite and in PostgreSQL."""

from __future__ import annotations

import asyncio
import ftplib
import gc
import traceback
from pathlib import Path

import argon2
import pytest
from sqlalchemy import text

from gateway.config import DatabaseSettings
from gateway.users.db import create_engine
from gateway.users.passwords import Passwords
from gateway.users.store import UserChanges
from tests.clients import FtplibClient, ftp_login
from tests.helpers import GatewayThread, gateway_settings, running, scratch_postgres


def login(gateway: GatewayThread, name: str, password: str) -> FtplibClient:
    return ftp_login(gateway.host, gateway.port, name, password)


def refused(gateway: GatewayThread, name: str, password: str) -> str:
    with pytest.raises(ftplib.error_perm) as excinfo:
        login(gateway, name, password)
    return str(excinfo.value)


def change(gateway: GatewayThread, name: str, **changes: object) -> None:
    assert gateway.server is not None
    store = gateway.server.user_manager.store
    gateway.call(lambda: store.change(name, UserChanges(**changes)))  # type: ignore[arg-type]


def test_wrong_password_and_unknown_user_get_the_same_530(db_gateway: GatewayThread) -> None:
    db_gateway.add_user("alice", "right")
    wrong = refused(db_gateway, "alice", "wrong")
    unknown = refused(db_gateway, "nobody", "right")
    assert wrong.startswith("530")
    assert unknown == wrong
    login(db_gateway, "alice", "right").quit()


def test_user_needs_a_password_before_anything(db_gateway: GatewayThread) -> None:
    db_gateway.add_user("alice", "right")
    ftp = ftplib.FTP()
    ftp.connect(db_gateway.host, db_gateway.port, timeout=10)
    assert ftp.sendcmd("USER alice").startswith("331")
    for command in ("PWD", "CWD /", "MKD x", "PASV"):
        with pytest.raises(ftplib.error_perm) as excinfo:
            ftp.sendcmd(command)
        assert str(excinfo.value).startswith("530"), command
    with pytest.raises(ftplib.error_perm) as excinfo:
        ftp.sendcmd("PASS wrong")
    assert str(excinfo.value).startswith("530")
    # After a failed PASS the name must be given again.
    with pytest.raises(ftplib.error_perm) as excinfo:
        ftp.sendcmd("PASS right")
    assert str(excinfo.value).startswith("503")
    ftp.login("alice", "right")
    ftp.quit()


def test_disabled_user_is_refused_until_enabled(db_gateway: GatewayThread) -> None:
    db_gateway.add_user("alice", "right")
    change(db_gateway, "alice", enabled=False)
    assert refused(db_gateway, "alice", "right").startswith("530")
    change(db_gateway, "alice", enabled=True)
    login(db_gateway, "alice", "right").quit()


def test_max_sessions_counted_after_the_password(db_gateway: GatewayThread) -> None:
    db_gateway.add_user("alice", "right", max_sessions=1)
    # Bare USER commands, and wrong passwords, take no slot (aioftp's own manager would count them).
    lurkers = []
    for _ in range(3):
        ftp = ftplib.FTP()
        ftp.connect(db_gateway.host, db_gateway.port, timeout=10)
        ftp.sendcmd("USER alice")
        lurkers.append(ftp)
    assert refused(db_gateway, "alice", "wrong").startswith("530")
    first = login(db_gateway, "alice", "right")
    message = refused(db_gateway, "alice", "right")
    assert message.startswith("530") and "Too many sessions" in message
    assert db_gateway.sessions_of("alice") == 1
    first.quit()
    db_gateway.wait_for_sessions("alice", 0)
    login(db_gateway, "alice", "right").quit()
    for ftp in lurkers:
        ftp.close()


def test_stored_hash_is_argon2id_and_login_is_stamped(db_gateway: GatewayThread) -> None:
    db_gateway.add_user("alice", "correct horse")
    assert db_gateway.server is not None
    store = db_gateway.server.user_manager.store
    row = db_gateway.call(lambda: store.get("alice"))
    assert row is not None
    assert row.password_hash.startswith("$argon2id$")
    assert "correct horse" not in row.password_hash
    assert argon2.extract_parameters(row.password_hash).type is argon2.Type.ID
    assert row.last_login_at is None
    login(db_gateway, "alice", "correct horse").quit()
    info = db_gateway.call(lambda: store.info("alice"))
    assert info.last_login_at is not None


def test_sessions_of_a_user_share_one_throttle(db_gateway: GatewayThread) -> None:
    db_gateway.add_user("alice", "a", download_limit=10_000_000)
    db_gateway.add_user("bob", "b", download_limit=10_000_000)
    server = db_gateway.server
    assert server is not None
    clients = [login(db_gateway, "alice", "a"), login(db_gateway, "alice", "a"), login(db_gateway, "bob", "b")]

    async def throttles() -> dict[str, list[object]]:
        found: dict[str, list[object]] = {}
        for connection in server.connections.values():
            if connection.future.logged.done():
                found.setdefault(connection.user.login, []).append(
                    connection.command_connection.throttles["user_global"]
                )
        return found

    by_user = db_gateway.call(throttles)
    alice, bob = by_user["alice"], by_user["bob"]
    assert len(alice) == 2 and alice[0] is alice[1]
    assert bob[0] is not alice[0]
    assert alice[0].write.limit == 10_000_000  # type: ignore[attr-defined]
    for client in clients:
        client.quit()
    db_gateway.wait_for_sessions("alice", 0)
    db_gateway.wait_for_sessions("bob", 0)

    # Logins do not accumulate throttles: each user's goes with its last session.
    for _ in range(20):
        login(db_gateway, "alice", "a").quit()
    db_gateway.wait_for_sessions("alice", 0)

    async def throttle_count() -> int:
        gc.collect()
        return len(server.user_throttles)

    assert db_gateway.call(throttle_count) == 0


def test_change_applies_at_next_login(db_gateway: GatewayThread) -> None:
    db_gateway.add_user("alice", "a")
    first = login(db_gateway, "alice", "a")
    first.stor("before.txt", b"1")
    change(db_gateway, "alice", permissions={"/": (True, False)})
    second = login(db_gateway, "alice", "a")
    with pytest.raises(ftplib.error_perm):
        second.stor("after.txt", b"2")
    assert second.retr("before.txt") == b"1"
    first.quit()
    second.quit()


@pytest.mark.parametrize("resolution", [3600, 0])
def test_last_login_is_stamped_once_per_resolution(tmp_path: Path, database_url: str, resolution: int) -> None:
    """A login writes last_login_at only when the stored one is older than login.last_login_resolution."""
    with running(gateway_settings(tmp_path, database_url, login={"last_login_resolution": resolution})) as gateway:
        assert gateway.server is not None
        store = gateway.server.user_manager.store
        gateway.add_user("alice", "a")
        stamps = []
        for _ in range(2):
            login(gateway, "alice", "a").quit()
            stamps.append(gateway.call(lambda: store.info("alice")).last_login_at)
        assert stamps[0] is not None and stamps[1] is not None
        assert (stamps[1] > stamps[0]) is (resolution == 0)


def test_a_rehash_does_not_overwrite_a_password_changed_meanwhile(db_gateway: GatewayThread) -> None:
    assert db_gateway.server is not None
    store = db_gateway.server.user_manager.store
    db_gateway.add_user("alice", "old")
    row = db_gateway.call(lambda: store.get("alice"))
    assert row is not None
    change(db_gateway, "alice", password_hash=Passwords().hash_now("new"))
    # The login that read revision 1 rehashes "old" and writes it after the change: the change wins.
    db_gateway.call(lambda: store.record_login(row.id, row.revision, Passwords().hash_now("old")))
    refused(db_gateway, "alice", "old")
    login(db_gateway, "alice", "new").quit()


def test_a_user_added_again_under_the_same_name_gets_its_own_settings(db_gateway: GatewayThread) -> None:
    """While the deleted user still has a session, its successor (on SQLite with the same id, also at revision 1)
    must not get the old user's object: its permissions, storage and limits."""
    assert db_gateway.server is not None
    store = db_gateway.server.user_manager.store
    db_gateway.add_user("alice", "a")
    first = login(db_gateway, "alice", "a")
    db_gateway.call(lambda: store.delete("alice"))
    db_gateway.add_user("alice", "a", read_only=True)
    second = login(db_gateway, "alice", "a")
    with pytest.raises(ftplib.error_perm):
        second.stor("after.txt", b"2")
    first.quit()
    second.quit()


def test_first_login_creates_a_missing_own_directory(local_gateway: GatewayThread, tmp_path: Path) -> None:
    """``user add --storage file:///...`` naming a directory that does not exist yet: the first login makes it (as
    for the default storage) and the user can upload there; a symlink inside still cannot lead out of it."""
    own = tmp_path / "own" / "dora"
    local_gateway.add_user("dora", storage_uri=f"file://{own}")
    assert not own.exists()
    dora = login(local_gateway, "dora", "secret")
    dora.stor("first.txt", b"made at first login")
    (own / "escape").symlink_to(tmp_path)
    assert set(dora.list()) == {"first.txt"}
    dora.quit()
    assert (own / "first.txt").read_bytes() == b"made at first login"


def test_own_directory_that_cannot_be_made_refuses_only_that_login(
    local_gateway: GatewayThread, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    local_gateway.add_user("erin", storage_uri=f"file://{tmp_path / 'a-file' / 'erin'}")
    assert refused(local_gateway, "erin", "secret") == "530 Login refused: storage unavailable."
    local_gateway.add_user("fred")
    login(local_gateway, "fred", "secret").quit()


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_database_errors_hold_no_query_parameters(database: str, tmp_path: Path) -> None:
    """A database error is logged with its message and traceback: the values bound to the query (user names,
    password hashes) stay out of both."""
    secret = "$argon2id$v=19$not-to-be-seen"

    async def fail(url: str) -> str:
        engine = create_engine(DatabaseSettings(url=url))
        try:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT password_hash FROM no_such_table WHERE x = :x"), {"x": secret})
        except Exception as exc:  # noqa: BLE001 - whatever the driver raises, its text is what a log would show
            return "".join(traceback.format_exception(exc))
        finally:
            await engine.dispose()
        raise AssertionError("the query did not fail")

    if database == "sqlite":
        shown = asyncio.run(fail(f"sqlite:///{tmp_path / 'users.db'}"))
    else:
        with scratch_postgres() as url:
            shown = asyncio.run(fail(url))
    assert "no_such_table" in shown
    assert secret not in shown
