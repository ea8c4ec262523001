"""HASH and its X-command cousins, MFMT and the other ways clients set a modification time, on both backends.

On S3 the SHA-256 of an upload is stored while it streams (object metadata for a single PutObject, the facts
table for a multipart upload), so HASH reads nothing back; a time set by MFMT shows in MDTM, LIST and MLSD.
"""

from __future__ import annotations

import asyncio
import ftplib
import hashlib
import io
import logging
import re
import sqlite3
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.config import DatabaseSettings
from gateway.users.db import create_engine
from gateway.users.models import ObjectFactRow
from tests.clients import assert_refused, ftp_login
from tests.helpers import S3_BUCKET, GatewayThread, MiB, gateway_settings, random_bytes, require_binary, running

SMALL = random_bytes(100_000, seed=1)
LARGE = random_bytes(11 * MiB, seed=2)  # two 5 MiB parts and a tail on S3


def expected(data: bytes) -> dict[str, str]:
    return {
        "SHA-256": hashlib.sha256(data).hexdigest(),
        "SHA-1": hashlib.sha1(data).hexdigest(),  # noqa: S324 - what the client asks for
        "MD5": hashlib.md5(data).hexdigest(),  # noqa: S324
        "CRC32": f"{zlib.crc32(data):08x}",
    }


@pytest.fixture
def facts_gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GatewayThread]:
    """``backend_gateway`` with 5 MiB S3 parts, so an 11 MiB upload is a multipart upload."""
    endpoint = request.getfixturevalue("s3_endpoint") if request.param == "s3" else None
    with running(gateway_settings(tmp_path, s3_endpoint=endpoint, s3={"part_size": 5 * MiB})) as gw:
        yield gw


both_backends = pytest.mark.parametrize("facts_gateway", ["local", "s3"], indirect=True)


def feat_lines(client: ftplib.FTP) -> list[str]:
    return [line.strip() for line in client.sendcmd("FEAT").splitlines()[1:-1]]


def store(client: ftplib.FTP, name: str, data: bytes) -> None:
    client.storbinary(f"STOR {name}", io.BytesIO(data))


@both_backends
def test_hash_with_every_algorithm(facts_gateway: GatewayThread) -> None:
    facts_gateway.add_user("alice")
    client = ftp_login(facts_gateway.host, facts_gateway.port, "alice").ftp
    client.mkd("dir")
    files = {"small.bin": SMALL, "large file.bin": LARGE, "empty": b""}
    for name, data in files.items():
        store(client, name, data)

    assert "HASH SHA-256*;SHA-1;MD5;CRC32" in feat_lines(client)
    assert client.sendcmd("OPTS HASH") == "200 SHA-256"
    for name, data in files.items():
        assert client.sendcmd(f"HASH {name}") == f"213 SHA-256 0-{len(data)} {expected(data)['SHA-256']} {name}"
    for algorithm in ("SHA-1", "MD5", "CRC32"):
        assert client.sendcmd(f"OPTS HASH {algorithm.lower()}") == f"200 {algorithm}"
        names = ("SHA-256", "SHA-1", "MD5", "CRC32")
        assert "HASH " + ";".join(name + "*" * (name == algorithm) for name in names) in feat_lines(client)
        for name, data in files.items():
            assert client.sendcmd(f"HASH {name}").split(" ")[1:4] == [
                algorithm,
                f"0-{len(data)}",
                expected(data)[algorithm],
            ]
    assert_refused("501", lambda: client.sendcmd("OPTS HASH SHA-3"))
    assert client.sendcmd("OPTS HASH") == "200 CRC32"  # unchanged by the refused switch

    # The older commands: upper-case hex with 250, optionally for the range 0..size.
    for verb, algorithm in (("XSHA256", "SHA-256"), ("XSHA1", "SHA-1"), ("XMD5", "MD5"), ("XCRC", "CRC32")):
        assert client.sendcmd(f"{verb} small.bin") == f"250 {expected(SMALL)[algorithm].upper()}"
    assert client.sendcmd('XMD5 "large file.bin"') == f"250 {expected(LARGE)['MD5'].upper()}"
    assert client.sendcmd(f'XCRC "small.bin" 0 {len(SMALL)}') == f"250 {expected(SMALL)['CRC32'].upper()}"

    assert_refused("504", lambda: client.sendcmd("XCRC small.bin 10 20"), lambda: client.sendcmd("RANG 0 10"))
    assert_refused("553", lambda: client.sendcmd("HASH dir"))
    assert_refused("550", lambda: client.sendcmd("HASH missing"), lambda: client.sendcmd("XSHA1 dir"))
    assert_refused("501", lambda: client.sendcmd("HASH"))
    client.quit()


def test_hash_needs_read_permission(local_gateway: GatewayThread) -> None:
    local_gateway.add_user("alice", permissions={"/secret": (False, False)})
    local_gateway.files.put("alice", "secret/key", b"k")
    client = ftp_login(local_gateway.host, local_gateway.port, "alice").ftp
    assert_refused("550", lambda: client.sendcmd("HASH secret/key"), lambda: client.sendcmd("XMD5 secret/key"))
    client.quit()
    assert_refused("530", lambda: _anonymous_hash(local_gateway))


def _anonymous_hash(gateway: GatewayThread) -> None:
    client = ftplib.FTP()
    client.connect(gateway.host, gateway.port)
    try:
        client.sendcmd("HASH x")
    finally:
        client.close()


def requests_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "werkzeug"]


@pytest.mark.parametrize("facts_gateway", ["s3"], indirect=True)
def test_s3_hash_uses_the_stored_sha256(facts_gateway: GatewayThread, caplog: pytest.LogCaptureFixture) -> None:
    """Uploads through the gateway (one PutObject, and multipart) are not read back for HASH; an object written
    by another tool is read once, then its SHA-256 is known for as long as it is unchanged."""
    facts_gateway.add_user("alice")
    client = ftp_login(facts_gateway.host, facts_gateway.port, "alice").ftp
    store(client, "small.bin", SMALL)
    store(client, "large.bin", LARGE)
    facts_gateway.files.put("alice", "foreign.bin", b"written by someone else")
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        caplog.clear()
        assert client.sendcmd("HASH small.bin").split()[3] == expected(SMALL)["SHA-256"]
        assert client.sendcmd("HASH large.bin").split()[3] == expected(LARGE)["SHA-256"]
        reads = [r for r in requests_of(caplog) if re.search(r'"GET /\S*/(small|large)\.bin HTTP', r)]
        assert any('"HEAD /' in r for r in requests_of(caplog)), "the log shows the requests"
        assert reads == []

        caplog.clear()
        assert client.sendcmd("HASH foreign.bin").split()[3] == expected(b"written by someone else")["SHA-256"]
        assert client.sendcmd("HASH foreign.bin").split()[3] == expected(b"written by someone else")["SHA-256"]
        reads = [r for r in requests_of(caplog) if re.search(r'"GET /\S*/foreign\.bin HTTP', r)]
        assert len(reads) == 1

    # Changed behind the gateway's back: the stored facts no longer apply.
    facts_gateway.files.put("alice", "large.bin", b"replaced")
    facts_gateway.files.put("alice", "foreign.bin", b"replaced too")
    assert client.sendcmd("HASH large.bin").split()[3] == expected(b"replaced")["SHA-256"]
    assert client.sendcmd("HASH foreign.bin").split()[3] == expected(b"replaced too")["SHA-256"]

    # A resumed upload whose head S3 copied has no streamed hash; HASH computes it.
    store(client, "resumed.bin", LARGE)
    client.voidcmd("TYPE I")
    client.storbinary("STOR resumed.bin", io.BytesIO(b"tail"), rest=6 * MiB)
    assert client.sendcmd("HASH resumed.bin").split()[3] == expected(LARGE[: 6 * MiB] + b"tail")["SHA-256"]
    client.quit()


def listed_time(client: ftplib.FTP, name: str) -> str:
    lines: list[str] = []
    client.retrlines("LIST", lines.append)
    line = next(line for line in lines if line.endswith(" " + name))
    return " ".join(line.split()[5:8])


@both_backends
def test_mfmt_shows_in_mdtm_list_and_mlsd(facts_gateway: GatewayThread, caplog: pytest.LogCaptureFixture) -> None:
    facts_gateway.add_user("alice")
    client = ftp_login(facts_gateway.host, facts_gateway.port, "alice").ftp
    store(client, "small.bin", SMALL)
    store(client, "large.bin", LARGE)
    assert "MFMT" in feat_lines(client)

    assert client.sendcmd("MFMT 20200102030405 small.bin") == "213 Modify=20200102030405; small.bin"
    assert client.sendcmd("MFMT 19991231235959.5 large.bin") == "213 Modify=19991231235959.5; large.bin"
    assert client.sendcmd("MDTM small.bin") == "213 20200102030405"
    assert client.sendcmd("MDTM large.bin") == "213 19991231235959"
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        caplog.clear()
        assert listed_time(client, "small.bin") == "Jan 2 2020"
        assert listed_time(client, "large.bin") == "Dec 31 1999"
        facts = dict(client.mlsd("", facts=["modify", "size"]))
        heads = [r for r in requests_of(caplog) if re.search(r'"HEAD /\S*/(small|large)\.bin', r)]
    assert heads == []  # the times come with the listing, not from a HEAD per entry
    assert facts["small.bin"]["modify"] == "20200102030405"
    assert facts["large.bin"]["modify"] == "19991231235959"
    assert facts["large.bin"]["size"] == str(len(LARGE))
    # Setting the time changed nothing else.
    assert facts_gateway.files.files("alice") == {"small.bin": SMALL, "large.bin": LARGE}
    assert client.sendcmd("HASH large.bin").split()[3] == expected(LARGE)["SHA-256"]

    # A rename keeps the time; a new upload replaces it with the time of the upload.
    client.rename("large.bin", "renamed.bin")
    assert client.sendcmd("MDTM renamed.bin") == "213 19991231235959"
    assert listed_time(client, "renamed.bin") == "Dec 31 1999"
    store(client, "small.bin", b"new content")
    this_year = time.gmtime().tm_year
    assert int(client.sendcmd("MDTM small.bin")[4:8]) == this_year
    assert str(this_year) not in listed_time(client, "small.bin")  # "Nov 25 09:30": a recent time, not a year

    assert_refused(
        "501",
        lambda: client.sendcmd("MFMT 2020 small.bin"),
        lambda: client.sendcmd("MFMT 20201332000000 small.bin"),  # month 13
        lambda: client.sendcmd("MFMT 19691231235959 small.bin"),  # before the epoch
        lambda: client.sendcmd("MFMT 99991231235959 small.bin"),  # past what file systems keep
        lambda: client.sendcmd("MFMT 20200102030405"),
    )
    assert_refused("550", lambda: client.sendcmd("MFMT 20200102030405 missing"))
    client.quit()


@both_backends
def test_other_ways_to_set_the_time(facts_gateway: GatewayThread) -> None:
    """``MDTM time file`` (vsftpd, Pure-FTPd) and ``SITE UTIME`` in both of ProFTPD's forms (NcFTP)."""
    facts_gateway.add_user("alice")
    client = ftp_login(facts_gateway.host, facts_gateway.port, "alice").ftp
    store(client, "a.txt", b"a")
    store(client, "20240101000000 b.txt", b"a file whose name starts like a time")
    assert client.sendcmd("MDTM 20210203040506 a.txt").startswith("213 ")
    assert client.sendcmd("MDTM a.txt") == "213 20210203040506"
    assert client.sendcmd("MDTM 20240101000000 b.txt").startswith("213 2")  # the file exists: a query
    assert client.sendcmd("MDTM 20240101000000 b.txt") != "213 20240101000000"
    assert client.sendcmd("SITE UTIME 202203040506 a.txt") == "200 SITE UTIME command ok."
    assert client.sendcmd("MDTM a.txt") == "213 20220304050600"
    assert client.sendcmd("SITE UTIME a.txt 20230101000000 20230405060708 20230101000000 UTC").startswith("200")
    assert client.sendcmd("MDTM a.txt") == "213 20230405060708"
    assert_refused("501", lambda: client.sendcmd("SITE UTIME soon a.txt"))
    client.quit()


def test_mfmt_needs_write_permission(local_gateway: GatewayThread) -> None:
    local_gateway.add_user("alice", read_only=True)
    local_gateway.files.put("alice", "a.txt", b"a")
    client = ftp_login(local_gateway.host, local_gateway.port, "alice").ftp
    before = client.sendcmd("MDTM a.txt")
    assert_refused(
        "550",
        lambda: client.sendcmd("MFMT 20200102030405 a.txt"),
        lambda: client.sendcmd("SITE UTIME 202001020304 a.txt"),
    )
    assert client.sendcmd("MDTM a.txt") == before
    client.quit()


def test_local_mfmt_sets_the_file_time_and_directories_too(local_gateway: GatewayThread) -> None:
    local_gateway.add_user("alice")
    local_gateway.files.put("alice", "dir/a.txt", b"a")
    client = ftp_login(local_gateway.host, local_gateway.port, "alice").ftp
    client.sendcmd("MFMT 20200102030405 dir/a.txt")
    client.sendcmd("MFMT 20190102030405 dir")
    root = local_gateway.root_of("alice")
    assert (root / "dir" / "a.txt").stat().st_mtime == 1577934245
    assert (root / "dir").stat().st_mtime == 1546398245
    client.quit()


def test_s3_times_and_hashes_on_both_databases(tmp_path: Path, database_url: str, s3_endpoint: str) -> None:
    """The facts table works on SQLite and on PostgreSQL (a multipart upload's SHA-256, an MFMT time)."""
    settings = gateway_settings(tmp_path, database_url, s3_endpoint=s3_endpoint, s3={"part_size": 5 * MiB})
    with running(settings) as gw:
        gw.add_user("alice")
        client = ftp_login(gw.host, gw.port, "alice").ftp
        client.mkd("d")
        store(client, "d/large.bin", LARGE)
        client.sendcmd("MFMT 20200102030405 d/large.bin")
        client.rename("d", "e")
        lines: list[str] = []
        client.retrlines("LIST e", lines.append)
        assert "Jan  2  2020 large.bin" in lines[0]
        assert client.sendcmd("HASH e/large.bin").split()[3] == expected(LARGE)["SHA-256"]
        client.delete("e/large.bin")
        client.quit()

    async def rows() -> int:
        engine = create_engine(DatabaseSettings(url=database_url))
        try:
            async with engine.connect() as connection:
                return int((await connection.execute(select(func.count()).select_from(ObjectFactRow))).scalar_one())
        finally:
            await engine.dispose()

    assert asyncio.run(rows()) == 0  # forgotten with the object


def test_s3_directories_have_no_time_to_set(s3_endpoint: str, tmp_path: Path) -> None:
    with running(gateway_settings(tmp_path, s3_endpoint=s3_endpoint)) as gw:
        gw.add_user("alice")
        client = ftp_login(gw.host, gw.port, "alice").ftp
        client.mkd("d")
        assert_refused("550", lambda: client.sendcmd("MFMT 20200102030405 d"))
        client.quit()


def test_s3_mfmt_keeps_content_type_metadata_and_storage_class(s3_endpoint: str, tmp_path: Path) -> None:
    with running(gateway_settings(tmp_path, s3_endpoint=s3_endpoint)) as gw:
        gw.add_user("alice")
        s3 = gw.files.client  # type: ignore[union-attr]
        key = gw.files.prefix("alice") + "page.html"  # type: ignore[union-attr]
        s3.put_object(
            Bucket=S3_BUCKET,
            Key=key,
            Body=b"<p>",
            ContentType="text/html",
            Metadata={"owner": "bob"},
            StorageClass="STANDARD_IA",
        )
        client = ftp_login(gw.host, gw.port, "alice").ftp
        client.sendcmd("MFMT 20200102030405 page.html")
        client.quit()
        head = s3.head_object(Bucket=S3_BUCKET, Key=key)
        assert head["ContentType"] == "text/html"
        assert head["Metadata"]["owner"] == "bob"
        assert head["StorageClass"] == "STANDARD_IA"
        assert float(head["Metadata"]["mtime"]) == 1577934245  # as rclone and s3fs store it


def test_s3_goes_on_when_the_facts_table_fails(
    s3_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The facts table is a help: with it gone (a broken database), uploads, listings and HASH still work,
    MDTM still shows an MFMT time (from the object's metadata), and the failure is logged."""
    settings = gateway_settings(tmp_path, s3_endpoint=s3_endpoint, s3={"part_size": 5 * MiB})
    with running(settings) as gw:
        gw.add_user("alice")
        with sqlite3.connect(tmp_path / "users.db") as db:
            db.execute("DROP TABLE ftp_object_facts")
        client = ftp_login(gw.host, gw.port, "alice").ftp
        store(client, "large.bin", LARGE)
        store(client, "small.bin", SMALL)
        assert client.sendcmd("HASH large.bin").split()[3] == expected(LARGE)["SHA-256"]
        client.sendcmd("MFMT 20200102030405 large.bin")
        assert client.sendcmd("MDTM large.bin") == "213 20200102030405"
        assert sorted(client.nlst()) == ["large.bin", "small.bin"]
        client.rename("large.bin", "moved.bin")
        client.delete("small.bin")
        client.quit()
    assert "could not read object facts" in caplog.text
    assert "could not record object facts" in caplog.text


@both_backends
def test_curl_keeps_the_time_set_by_mfmt(facts_gateway: GatewayThread, tmp_path: Path) -> None:
    """``curl -R`` asks MDTM and gives the downloaded file the server's time."""
    curl = require_binary("curl")
    facts_gateway.add_user("alice")
    client = ftp_login(facts_gateway.host, facts_gateway.port, "alice").ftp
    store(client, "report.csv", SMALL)
    client.sendcmd("MFMT 20200102030405 report.csv")
    client.quit()
    out = tmp_path / "report.csv"
    url = f"ftp://alice:secret@{facts_gateway.host}:{facts_gateway.port}/report.csv"
    subprocess.run([curl, "--silent", "--show-error", "-R", "-o", str(out), url], check=True, timeout=60)
    assert out.read_bytes() == SMALL
    assert out.stat().st_mtime == 1577934245
