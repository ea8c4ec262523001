"""Uploads and downloads on local disk and S3: resume, append, and interrupted uploads that leave nothing behind."""

from __future__ import annotations

import asyncio
import ftplib
import io
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioftp
import pytest

from gateway.config import Settings
from pathio_backends.base import RESERVED_PREFIX
from tests.clients import FtplibClient, assert_refused, ftp_login
from tests.helpers import (
    GatewayThread,
    MiB,
    gateway_settings,
    random_bytes,
    require_binary,
    running,
    sha256,
    wait_until,
)

OLD = b"the previous version\n"


VARIANTS = ["local-pump", "local-event-loop", "s3"]


def variant_settings(request: pytest.FixtureRequest, tmp_path: Path, variant: str, **overrides: Any) -> Settings:
    """local-pump: local-disk transfers through the worker-thread pump (the default); local-event-loop: through
    the event loop (used under speed limits, or when all pump threads are busy); s3: moto over HTTP, with
    S3's smallest part size so that multipart uploads start at 5 MiB."""
    if variant == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        return gateway_settings(tmp_path, s3_endpoint=endpoint, s3={"part_size": 5 * MiB}, **overrides)
    threads = 64 if variant == "local-pump" else 0
    return gateway_settings(tmp_path, transfer={"pump_threads": threads}, **overrides)


@pytest.fixture(params=VARIANTS)
def variant_gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GatewayThread]:
    with running(variant_settings(request, tmp_path, request.param)) as gw:
        yield gw


@pytest.fixture
def alice(variant_gateway: GatewayThread) -> Iterator[FtplibClient]:
    variant_gateway.add_user("alice")
    client = ftp_login(variant_gateway.host, variant_gateway.port, "alice")
    yield client
    client.ftp.close()


def test_rest_retr_append_and_resumed_stor(alice: FtplibClient, variant_gateway: GatewayThread) -> None:
    data = random_bytes(3 * MiB + 17, seed=3)
    alice.stor("file.bin", data)
    buffer = io.BytesIO()
    alice.ftp.retrbinary("RETR file.bin", buffer.write, rest=MiB + 5)
    assert buffer.getvalue() == data[MiB + 5 :]

    tail = random_bytes(100_000, seed=4)
    alice.ftp.storbinary("APPE file.bin", io.BytesIO(tail))
    assert sha256(alice.retr("file.bin")) == sha256(data + tail)

    # REST + STOR keeps the head and replaces everything after the offset.
    new_tail = b"resumed"
    alice.ftp.storbinary("STOR file.bin", io.BytesIO(new_tail), rest=1000)
    assert alice.retr("file.bin") == data[:1000] + new_tail
    # APPE creates a missing file.
    alice.ftp.storbinary("APPE new.log", io.BytesIO(b"line 1\n"))
    alice.ftp.storbinary("APPE new.log", io.BytesIO(b"line 2\n"))
    assert alice.retr("new.log") == b"line 1\nline 2\n"
    assert variant_gateway.files.pending_uploads("alice") == []


def test_rest_applies_to_the_next_transfer_only(alice: FtplibClient) -> None:
    alice.stor("a.txt", b"0123456789")
    assert alice.ftp.sendcmd("REST 4").startswith("350")
    buffer = io.BytesIO()
    alice.ftp.retrbinary("RETR a.txt", buffer.write)
    assert buffer.getvalue() == b"456789"
    assert alice.retr("a.txt") == b"0123456789"


def test_bad_transfer_requests_get_replies_and_the_session_goes_on(alice: FtplibClient) -> None:
    alice.stor("a.txt", b"0123456789")
    alice.mkd("dir")
    cases = [
        (lambda: alice.stor("dir", b"x"), "550"),
        (lambda: alice.stor("missing/a.txt", b"x"), "550"),
        (lambda: alice.retr("dir"), "550"),
        (lambda: alice.retr("nothing.txt"), "550"),
        (lambda: alice.ftp.retrbinary("RETR a.txt", print, rest=11), "554"),
        (lambda: alice.ftp.storbinary("STOR a.txt", io.BytesIO(b"x"), rest=11), "554"),
        (lambda: alice.ftp.storbinary("STOR nothing.txt", io.BytesIO(b"x"), rest=3), "550"),
        (lambda: alice.mkd("dir"), "550"),
        (lambda: alice.mkd("no/such/parent"), "550"),
        (lambda: alice.rmd("a.txt"), "550"),
        (lambda: alice.dele("dir"), "550"),
        (lambda: alice.stor(RESERVED_PREFIX + "x", b"x"), "553"),
        (lambda: alice.ftp.sendcmd("SIZE dir"), "550"),
        (lambda: alice.ftp.sendcmd("FROB"), "502"),
    ]
    for attempt, code in cases:
        assert_refused(code, attempt)
    assert alice.ftp.sendcmd("NOOP").startswith("200")
    assert alice.ftp.sendcmd("SIZE a.txt") == "213 10"
    assert alice.retr("a.txt") == b"0123456789"


def test_rename_replaces_a_file_but_never_a_directory(alice: FtplibClient) -> None:
    alice.stor("upload.tmp", b"new")
    alice.stor("final.txt", b"old")
    alice.rename("upload.tmp", "final.txt")
    assert alice.retr("final.txt") == b"new"
    alice.mkd("d")
    alice.mkd("d/sub")
    for source, destination in (("final.txt", "d"), ("d", "d/sub/inside")):
        alice.ftp.sendcmd(f"RNFR {source}")
        with pytest.raises(ftplib.error_perm) as excinfo:
            alice.ftp.sendcmd(f"RNTO {destination}")
        assert str(excinfo.value).startswith("550")
    alice.rename("d", "e")
    assert alice.list() == {"final.txt": ("file", 3), "e": ("dir", 0)}


def test_data_connection_reset_mid_upload_keeps_the_old_file(
    alice: FtplibClient, variant_gateway: GatewayThread
) -> None:
    alice.stor("doc.bin", OLD)
    data_socket = alice.ftp.transfercmd("STOR doc.bin")
    data_socket.sendall(random_bytes(12 * MiB))
    # SO_LINGER 0: close with a TCP reset, as a crashed client or a broken network path would.
    data_socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    data_socket.close()
    with pytest.raises(ftplib.error_temp) as excinfo:
        alice.ftp.voidresp()
    assert str(excinfo.value).startswith("426")
    assert alice.retr("doc.bin") == OLD
    variant_gateway.wait_for_no_pending_uploads("alice")
    assert variant_gateway.files.files("alice") == {"doc.bin": OLD}


def test_abor_mid_upload_keeps_the_old_file(variant_gateway: GatewayThread) -> None:
    variant_gateway.add_user("alice")

    async def scenario() -> list[str]:
        client = aioftp.Client(socket_timeout=10)
        await client.connect(variant_gateway.host, variant_gateway.port)
        await client.login("alice", "secret")
        async with client.upload_stream("doc.bin") as stream:
            await stream.write(OLD)
        stream = await client.upload_stream("doc.bin")
        await stream.write(random_bytes(12 * MiB))  # on S3: two parts sent, the third under way
        await client.abort()
        stream.close()
        names = [str(path) for path, _ in await client.list()]
        async with client.download_stream("doc.bin") as download:
            assert await download.read() == OLD
        assert (await client.command("NOOP", "200"))[0] == "200"
        await client.quit()
        return names

    assert asyncio.run(scenario()) == ["doc.bin"]
    variant_gateway.wait_for_no_pending_uploads("alice")
    assert variant_gateway.files.files("alice") == {"doc.bin": OLD}


def test_killed_client_leaves_no_partial_file(variant_gateway: GatewayThread, tmp_path: Path) -> None:
    curl = require_binary("curl")
    variant_gateway.add_user("alice")
    variant_gateway.files.put("alice", "big.bin", OLD)
    big = tmp_path / "big.bin"
    big.write_bytes(random_bytes(32 * MiB))
    url = f"ftp://127.0.0.1:{variant_gateway.port}/big.bin"
    process = subprocess.Popen(
        [curl, "--silent", "--user", "alice:secret", "--limit-rate", "4M", "--upload-file", str(big), url]
    )

    def upload_started() -> list[str]:
        pending = variant_gateway.files.pending_uploads("alice")
        assert pending or process.poll() is None
        return pending

    try:
        # Local disk: the temporary file exists; S3: the multipart upload has begun (its first part is out).
        wait_until(upload_started, timeout=30, what="the upload to start")
        time.sleep(1.0)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    variant_gateway.wait_for_no_pending_uploads("alice")
    assert variant_gateway.files.files("alice") == {"big.bin": OLD}


@pytest.mark.parametrize("variant", ["local-pump", "s3"])
def test_small_uploads_wait_no_fixed_time(request: pytest.FixtureRequest, tmp_path: Path, variant: str) -> None:
    """The killed-client watch lasts a share of each upload's duration: 200 small files in a row on one
    connection take about as long up as down. A fixed wait of ``close_grace`` (20 ms) per file would add 4 s,
    many times what the same files take to come back down in the same run."""
    with running(variant_settings(request, tmp_path, variant)) as gateway:
        gateway.add_user("alice")
        client = ftp_login(gateway.host, gateway.port, "alice")
        files = {f"f{i:03}.bin": random_bytes(4096, seed=i) for i in range(200)}
        for name, data in list(files.items())[:10]:  # warm-up: first connections, first files
            client.stor(name, data)
            client.retr(name)
        started = time.monotonic()
        for name, data in files.items():
            client.stor(name, data)
        uploading = time.monotonic() - started
        started = time.monotonic()
        received = {name: client.retr(name) for name in files}
        downloading = time.monotonic() - started
        client.quit()
    assert received == files
    fixed_wait = 200 * gateway.settings.transfer.close_grace
    assert uploading < 2 * downloading + fixed_wait / 4, (uploading, downloading)


@pytest.mark.parametrize("variant", VARIANTS)
def test_client_that_never_opens_the_data_connection(
    request: pytest.FixtureRequest, tmp_path: Path, variant: str
) -> None:
    with running(variant_settings(request, tmp_path, variant, timeouts={"data_connection": 0.5})) as gateway:
        gateway.add_user("alice")
        client = ftp_login(gateway.host, gateway.port, "alice")
        client.ftp.sendcmd("TYPE I")
        client.ftp.sendcmd("PASV")
        assert client.ftp.sendcmd("STOR never.bin").startswith("150")
        with pytest.raises(ftplib.error_temp) as excinfo:
            client.ftp.voidresp()
        assert str(excinfo.value).startswith("425")
        assert client.ftp.sendcmd("NOOP").startswith("200")
        client.quit()
        gateway.wait_for_no_pending_uploads("alice")
        assert gateway.files.files("alice") == {}


def test_long_transfer_is_not_idle_but_an_idle_session_is_closed(tmp_path: Path) -> None:
    settings = gateway_settings(tmp_path, timeouts={"idle": 1})
    with running(settings) as gateway:
        # 300 KB at 150 KB/s: the upload outlasts the idle timeout.
        gateway.add_user("slow", upload_limit=150_000)
        client = ftp_login(gateway.host, gateway.port, "slow")
        data = random_bytes(300_000)
        started = time.monotonic()
        client.stor("slow.bin", data)
        assert time.monotonic() - started > 1.5
        assert client.retr("slow.bin") == data
        time.sleep(1.5)
        with pytest.raises(ftplib.error_temp) as excinfo:
            client.ftp.voidresp()
        assert str(excinfo.value).startswith("421")
        client.ftp.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_stalled_data_connection_times_out_and_leaves_nothing(
    request: pytest.FixtureRequest, tmp_path: Path, variant: str
) -> None:
    with running(variant_settings(request, tmp_path, variant, timeouts={"socket": 1})) as gateway:
        gateway.add_user("alice")
        client = ftp_login(gateway.host, gateway.port, "alice")
        data_socket = client.ftp.transfercmd("STOR stalled.bin")
        data_socket.sendall(random_bytes(7 * MiB))
        # ... and nothing more, without closing: the server gives up after its socket timeout.
        with pytest.raises(ftplib.error_temp) as excinfo:
            client.ftp.voidresp()
        assert str(excinfo.value).startswith("426")
        data_socket.close()
        assert client.ftp.sendcmd("NOOP").startswith("200")
        client.quit()
        gateway.wait_for_no_pending_uploads("alice")
        assert gateway.files.files("alice") == {}


def test_abor_mid_download_keeps_the_session(variant_gateway: GatewayThread) -> None:
    variant_gateway.add_user("alice")
    big = random_bytes(64 * MiB)
    variant_gateway.files.put("alice", "big.bin", big)

    async def scenario() -> bytes:
        client = aioftp.Client(socket_timeout=10)
        await client.connect(variant_gateway.host, variant_gateway.port)
        await client.login("alice", "secret")
        stream = await client.download_stream("big.bin")
        await stream.read(100_000)
        await client.abort()
        stream.close()
        async with client.download_stream("big.bin", offset=64 * MiB - 5) as tail:
            data = await tail.read()
        await client.quit()
        return data

    assert asyncio.run(scenario()) == big[-5:]


@pytest.mark.parametrize("size", [0, 1, 5 * MiB, 5 * MiB + 1, 3 * 5 * MiB + 123])
def test_sizes_around_part_boundaries(alice: FtplibClient, variant_gateway: GatewayThread, size: int) -> None:
    data = random_bytes(size, seed=size)
    alice.stor("object.bin", data)
    assert alice.ftp.sendcmd("SIZE object.bin") == f"213 {size}"
    assert sha256(alice.retr("object.bin")) == sha256(data)
    assert {n: sha256(d) for n, d in variant_gateway.files.files("alice").items()} == {"object.bin": sha256(data)}
    assert variant_gateway.files.pending_uploads("alice") == []


@pytest.mark.parametrize("kept", [3 * MiB, 6 * MiB])
def test_append_and_resume_below_and_above_5_mib(
    alice: FtplibClient, variant_gateway: GatewayThread, kept: int
) -> None:
    """On S3 a kept head under 5 MiB is uploaded again, from 5 MiB on S3 copies it (UploadPartCopy)."""
    old = random_bytes(kept + 2 * MiB, seed=kept)
    alice.stor("data.bin", old)
    more = random_bytes(MiB + 7, seed=1)
    alice.ftp.storbinary("APPE data.bin", io.BytesIO(more))
    assert sha256(alice.retr("data.bin")) == sha256(old + more)
    resumed = random_bytes(6 * MiB + 3, seed=2)
    alice.ftp.storbinary("STOR data.bin", io.BytesIO(resumed), rest=kept)
    expected = (old + more)[:kept] + resumed
    assert sha256(alice.retr("data.bin")) == sha256(expected)
    assert {n: sha256(d) for n, d in variant_gateway.files.files("alice").items()} == {"data.bin": sha256(expected)}
    # An append that is interrupted leaves the file as it was.
    data_socket = alice.ftp.transfercmd("APPE data.bin")
    data_socket.sendall(random_bytes(6 * MiB))
    data_socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    data_socket.close()
    assert_refused("426", alice.ftp.voidresp)
    variant_gateway.wait_for_no_pending_uploads("alice")
    assert sha256(alice.retr("data.bin")) == sha256(expected)
