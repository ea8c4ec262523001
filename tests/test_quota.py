"""Per-user quotas (issue 13 item 4) and the user columns they and the per-user TLS setting live in."""

from __future__ import annotations

import asyncio
import ftplib
import gc
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Connection, text

from gateway.cli import main
from gateway.config import DatabaseSettings
from gateway.users.db import alembic_config, create_engine, schema_revisions, upgrade
from gateway.users.store import UserStore
from tests.helpers import (
    GatewayThread,
    create_test_bucket,
    gateway_settings,
    random_bytes,
    reset_moto,
    running,
)

# -- the schema ------------------------------------------------------------------------------------------------


def _alembic(connection: Connection, action: str, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    getattr(command, action)(config, revision)


async def _migrate_from_0002(url: str) -> None:
    engine = create_engine(DatabaseSettings(url=url))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_alembic, "upgrade", "head")
            await connection.run_sync(_alembic, "downgrade", "0002")
        # A user (with a permission row, which SQLite's table copy could cascade away) made before 0003.
        async with engine.begin() as connection:
            await connection.execute(text("INSERT INTO ftp_users (name, password_hash) VALUES ('old', 'h')"))
            await connection.execute(
                text(
                    "INSERT INTO ftp_user_permissions (user_id, path, readable, writable) "
                    "SELECT id, '/', true, false FROM ftp_users WHERE name = 'old'"
                )
            )
        assert (await schema_revisions(engine))[0] == "0002"
        await upgrade(engine)
        assert (await schema_revisions(engine))[0] == "0003"
        old = await UserStore(engine).info("old")
        assert (old.tls, old.quota_bytes, old.quota_files, old.used_bytes, old.used_files) == (None, None, None, 0, 0)
        assert old.permissions == {"/": "r"}
        new = await UserStore(engine).add("new", "h", tls="required", quota_bytes=10 << 30, quota_files=5)
        assert (new.tls, new.quota_bytes, new.quota_files, new.used_bytes) == ("required", 10 << 30, 5, 0)
        with pytest.raises(ValueError, match="invalid TLS mode"):
            await UserStore(engine).add("bad", "h", tls="always")
        # And back: the columns go, the users and their permissions stay.
        async with engine.begin() as connection:
            await connection.run_sync(_alembic, "downgrade", "0002")
        async with engine.connect() as connection:
            names = (await connection.execute(text("SELECT name FROM ftp_users ORDER BY name"))).scalars().all()
            perms = (await connection.execute(text("SELECT count(*) FROM ftp_user_permissions"))).scalar_one()
        assert (names, perms) == (["new", "old"], 2)
    finally:
        await engine.dispose()


def test_migration_0003_keeps_users_and_adds_the_columns(database_url: str) -> None:
    asyncio.run(_migrate_from_0002(database_url))


# -- quotas on a running gateway, both backends ------------------------------------------------------------------

MiB = 1024 * 1024


@pytest.fixture(scope="module", params=["local", "s3"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    """One gateway per backend for the module (each test has its own users); S3 parts of 5 MiB, so an upload of
    a few MiB is a multipart upload."""
    endpoint = None
    if request.param == "s3":
        endpoint = request.getfixturevalue("moto_server")
        reset_moto(endpoint)
        create_test_bucket(endpoint)
    settings = gateway_settings(
        tmp_path_factory.mktemp(request.param), s3_endpoint=endpoint, s3={"part_size": 5 * MiB} if endpoint else {}
    )
    with running(settings) as gw:
        yield gw


def connect(gw: GatewayThread, name: str) -> ftplib.FTP:
    ftp = ftplib.FTP()
    ftp.connect(gw.host, gw.port, timeout=10)
    ftp.login(name, "secret")
    return ftp


def upload(ftp: ftplib.FTP, name: str, data: bytes, command: str = "STOR") -> str:
    """The upload's final reply, also when the server stops reading before the client has sent everything."""
    try:
        with ftp.transfercmd(f"{command} {name}") as conn:
            try:
                conn.sendall(data)
            except OSError:
                pass  # the server closed the data connection: its reply tells why
    except ftplib.Error as exc:
        return str(exc)  # refused before the 150
    try:
        return ftp.voidresp()
    except ftplib.Error as exc:
        return str(exc)


def s3_requests(gw: GatewayThread, operation: str) -> float:
    assert gw.server is not None
    labels = {"operation": operation, "outcome": "ok"}
    return gw.server.metrics.registry.get_sample_value("ftp_gateway_s3_requests_total", labels) or 0.0


def usage(gw: GatewayThread, name: str) -> tuple[int, int]:
    """The usage in the database, once the changes of users without a quota, added up for a second, are written."""
    assert gw.server is not None
    server = gw.server
    gw.call(server.quotas.flush)
    info = gw.call(lambda: server.user_manager.store.info(name))
    return info.used_bytes, info.used_files


def stored(gw: GatewayThread, name: str) -> tuple[int, int]:
    """Bytes and files the storage holds for the user, looked at from outside the gateway."""
    files = gw.files.files(name)
    return sum(len(data) for data in files.values()), len(files)


def test_an_upload_crossing_the_byte_quota_gets_552_and_leaves_nothing(gateway: GatewayThread) -> None:
    gateway.add_user("crossing", quota_bytes=6 * MiB)
    ftp = connect(gateway, "crossing")
    assert upload(ftp, "first.bin", random_bytes(MiB)).startswith("226")
    # 7 MiB: on S3 a multipart upload whose first part is stored before the quota is crossed.
    assert upload(ftp, "big.bin", random_bytes(7 * MiB, seed=1)).startswith("552")
    gateway.wait_for_no_pending_uploads("crossing")
    if gateway.backend == "s3":  # it was a multipart upload, and it was aborted
        assert s3_requests(gateway, "CreateMultipartUpload") == s3_requests(gateway, "AbortMultipartUpload") == 1
    assert set(gateway.files.files("crossing")) == {"first.bin"}
    assert usage(gateway, "crossing") == (MiB, 1)
    # Converted on the event loop (TYPE A), not in the pump: the same bound.
    ftp.sendcmd("TYPE A")
    assert upload(ftp, "text.txt", b"line\r\n" * (MiB + 1)).startswith("552")
    ftp.sendcmd("TYPE I")
    # Exactly up to the quota is allowed; after that nothing more, refused before it starts.
    assert upload(ftp, "rest.bin", random_bytes(5 * MiB, seed=2)).startswith("226")
    assert usage(gateway, "crossing") == (6 * MiB, 2) == stored(gateway, "crossing")
    assert upload(ftp, "one-more.bin", b"x").startswith("552")
    assert upload(ftp, "first.bin", b"x", "APPE").startswith("552")
    # Deleting makes room again.
    ftp.delete("first.bin")
    assert upload(ftp, "small.bin", b"fits").startswith("226")
    assert usage(gateway, "crossing") == (5 * MiB + 4, 2) == stored(gateway, "crossing")
    gateway.wait_for_no_pending_uploads("crossing")
    ftp.quit()


def test_usage_follows_uploads_overwrites_appends_deletes_and_renames(gateway: GatewayThread) -> None:
    gateway.add_user("counted")  # no quota: usage is counted all the same
    ftp = connect(gateway, "counted")

    def step(expected: tuple[int, int]) -> None:
        assert usage(gateway, "counted") == expected == stored(gateway, "counted")

    upload(ftp, "a.bin", random_bytes(1000))
    upload(ftp, "b.bin", random_bytes(500))
    step((1500, 2))
    upload(ftp, "a.bin", random_bytes(200))  # overwrite: new size less the old
    step((700, 2))
    assert upload(ftp, "b.bin", random_bytes(300), "APPE").startswith("226")
    step((1000, 2))
    assert upload(ftp, "c.bin", random_bytes(50), "APPE").startswith("226")  # APPE makes a new file
    step((1050, 3))
    ftp.sendcmd("REST 100")
    assert upload(ftp, "a.bin", random_bytes(50)).startswith("226")  # keeps 100 bytes of 200: 150
    step((1000, 3))
    ftp.rename("c.bin", "b.bin")  # over b (800 bytes): b leaves the usage
    step((200, 2))
    ftp.mkd("d")
    ftp.rename("a.bin", "d/a.bin")
    ftp.rename("d", "e")  # a directory: nothing changes
    step((200, 2))
    ftp.delete("e/a.bin")
    step((50, 1))
    assert upload(ftp, "s.bin", random_bytes(30), "STOU").startswith("226")
    assert upload(ftp, "s.bin", random_bytes(40), "STOU").startswith("226")  # stored as s.bin.1
    step((120, 3))
    ftp.quit()


def test_files_quota(gateway: GatewayThread) -> None:
    gateway.add_user("few", quota_files=2)
    ftp = connect(gateway, "few")
    assert upload(ftp, "a", b"1").startswith("226")
    assert upload(ftp, "b", b"2").startswith("226")
    assert upload(ftp, "c", b"3").startswith("552")
    assert upload(ftp, "c", b"3", "APPE").startswith("552")
    # Changing a file the user has is no new file.
    assert upload(ftp, "a", b"longer").startswith("226")
    assert upload(ftp, "b", b"+", "APPE").startswith("226")
    ftp.delete("b")
    assert upload(ftp, "c", b"3").startswith("226")
    assert usage(gateway, "few") == (7, 2) == stored(gateway, "few")
    assert sorted(gateway.files.files("few")) == ["a", "c"]
    ftp.quit()


def test_rescan_counts_files_placed_behind_the_gateways_back(
    gateway: GatewayThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.add_user("outside", quota_bytes=1000)
    ftp = connect(gateway, "outside")
    assert upload(ftp, "mine.bin", random_bytes(100)).startswith("226")
    gateway.files.put("outside", "dir/one.bin", random_bytes(600))
    gateway.files.put("outside", "dir/sub/two.bin", random_bytes(400))
    gateway.files.makedirs("outside", "empty")
    assert usage(gateway, "outside") == (100, 1)

    settings = gateway.settings
    config = tmp_path / "gateway.toml"
    s3 = settings.s3
    s3_table = ""
    if gateway.backend == "s3":
        secret = s3.secret_access_key.get_secret_value() if s3.secret_access_key else ""
        s3_table = (
            f'[s3]\nendpoint_url = "{s3.endpoint_url}"\naccess_key_id = "{s3.access_key_id}"\n'
            f'secret_access_key = "{secret}"\nregion = "{s3.region}"\n'
        )
    config.write_text(
        f'[database]\nurl = "{settings.database.url}"\n'
        f'[storage]\ndefault_uri = "{settings.storage.default_uri}"\n{s3_table}'
    )
    config.chmod(0o600)
    assert main(["user", "rescan", "outside", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "outside: 1100 bytes in 3 files" in out and "(was 100 bytes in 1 files)" in out
    assert main(["user", "show", "outside", "--json", "--config", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["used_bytes"], shown["used_files"], shown["quota_bytes"]) == (1100, 3, 1000)
    # Over the quota now: refused before it starts.
    assert upload(ftp, "more.bin", b"x").startswith("552")
    assert main(["user", "rescan", "nobody", "--config", str(config)]) == 2
    assert "no user 'nobody'" in capsys.readouterr().err
    ftp.quit()


def test_a_database_error_while_counting_loses_no_upload(
    gateway: GatewayThread, caplog: pytest.LogCaptureFixture
) -> None:
    gateway.add_user("unlucky")
    assert gateway.server is not None
    quotas = gateway.server.quotas

    async def fail(user_id: int, delta_bytes: int, delta_files: int) -> None:
        raise ConnectionResetError("database gone")

    ftp = connect(gateway, "unlucky")
    original = quotas._add
    quotas._add = fail  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.quota"):
            assert upload(ftp, "kept.bin", b"data").startswith("226")
            gateway.call(quotas.flush)  # a user without a quota: its changes are written once a second
    finally:
        quotas._add = original  # type: ignore[method-assign]
    assert gateway.files.files("unlucky") == {"kept.bin": b"data"}
    assert any("user rescan unlucky" in record.getMessage() for record in caplog.records)
    # The session goes on.
    assert upload(ftp, "next.bin", b"more").startswith("226")
    assert usage(gateway, "unlucky") == (4, 1)
    ftp.quit()


def at_once(commands: list[tuple[ftplib.FTP, str]]) -> list[str]:
    """Send each command on its session before reading any reply, so that the gateway handles them at once; the
    reply codes, in the commands' order."""
    for ftp, line in commands:
        ftp.putcmd(line)
    return [ftp.getline()[:3] for ftp, _ in commands]


def guards_in_use(gw: GatewayThread) -> int:
    assert gw.server is not None
    quotas = gw.server.quotas

    async def count() -> int:
        gc.collect()  # a lock kept only by a reference cycle (an exception's traceback) goes as well
        return len(quotas._guards)

    return gw.call(count)


def test_changes_of_one_file_sent_at_once_are_counted_once(gateway: GatewayThread) -> None:
    """Two sessions deleting (or renaming) one file at once: one succeeds, the other finds nothing and counts
    nothing, so "upload, double DELE" gives no room for free. Two uploads over one file at once: each counts what
    it replaced."""
    gateway.add_user("racing", quota_bytes=5000)
    one, two = connect(gateway, "racing"), connect(gateway, "racing")
    for round_ in range(3):
        assert upload(one, "x.bin", random_bytes(1000, seed=round_)).startswith("226")
        assert sorted(at_once([(one, "DELE x.bin"), (two, "DELE x.bin")])) == ["250", "550"]
        assert usage(gateway, "racing") == (0, 0) == stored(gateway, "racing")

    # Two renames of one file (on S3 each a copy and a delete): one moves it, the other finds nothing.
    assert upload(one, "a.bin", random_bytes(700)).startswith("226")
    one.sendcmd("RNFR a.bin")
    two.sendcmd("RNFR a.bin")
    assert sorted(at_once([(one, "RNTO b.bin"), (two, "RNTO c.bin")])) == ["250", "550"]
    assert usage(gateway, "racing") == (700, 1) == stored(gateway, "racing")

    # Two overwrites of one file at once: the second to commit replaces the first one's file, not the old one.
    (name,) = gateway.files.files("racing")
    conns = [ftp.transfercmd(f"STOR {name}") for ftp in (one, two)]
    for conn, size in zip(conns, (300, 200), strict=True):
        conn.sendall(random_bytes(size, seed=size))
        conn.close()
    assert [one.voidresp()[:3], two.voidresp()[:3]] == ["226", "226"]
    assert usage(gateway, "racing") == stored(gateway, "racing")
    assert stored(gateway, "racing")[1] == 1
    one.quit()
    two.quit()
    assert guards_in_use(gateway) == 0
