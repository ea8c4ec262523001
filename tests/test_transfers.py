"""Uploads and downloads on local disk: resume, append, and interrupted uploads that leave nothing behind."""

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

import aioftp
import pytest

from pathio_backends.base import RESERVED_PREFIX
from tests.clients import FtplibClient, assert_refused, ftp_login
from tests.helpers import GatewayThread, MiB, gateway_settings, random_bytes, require_binary, running, sha256

OLD = b"the previous version\n"


@pytest.fixture(params=["pump", "event-loop"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GatewayThread]:
    """Every test here runs twice: local-disk transfers through the worker-thread pump (the default) and
    through the event loop (used under speed limits, or when all pump threads are busy)."""
    threads = 64 if request.param == "pump" else 0
    with running(gateway_settings(tmp_path, transfer={"pump_threads": threads})) as gw:
        yield gw


@pytest.fixture
def alice(gateway: GatewayThread) -> Iterator[FtplibClient]:
    gateway.add_user("alice")
    client = ftp_login(gateway.host, gateway.port, "alice")
    yield client
    client.ftp.close()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.startswith(RESERVED_PREFIX))


def wait_until_settled(root: Path, timeout: float = 10) -> None:
    """An aborted upload's temporary file is removed just after the client saw the error; wait for it."""
    deadline = time.monotonic() + timeout
    while leftovers(root):
        assert time.monotonic() < deadline, f"temporary files left: {leftovers(root)}"
        time.sleep(0.02)


def test_rest_retr_append_and_resumed_stor(alice: FtplibClient, gateway: GatewayThread) -> None:
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
    assert leftovers(gateway.root_of("alice")) == []


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


def test_data_connection_reset_mid_upload_keeps_the_old_file(alice: FtplibClient, gateway: GatewayThread) -> None:
    alice.stor("doc.bin", OLD)
    data_socket = alice.ftp.transfercmd("STOR doc.bin")
    data_socket.sendall(random_bytes(2 * MiB))
    # SO_LINGER 0: close with a TCP reset, as a crashed client or a broken network path would.
    data_socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    data_socket.close()
    with pytest.raises(ftplib.error_temp) as excinfo:
        alice.ftp.voidresp()
    assert str(excinfo.value).startswith("426")
    assert alice.retr("doc.bin") == OLD
    wait_until_settled(gateway.root_of("alice"))


def test_abor_mid_upload_keeps_the_old_file(gateway: GatewayThread) -> None:
    gateway.add_user("alice")
    root = gateway.root_of("alice")

    async def scenario() -> list[str]:
        client = aioftp.Client(socket_timeout=10)
        await client.connect(gateway.host, gateway.port)
        await client.login("alice", "secret")
        async with client.upload_stream("doc.bin") as stream:
            await stream.write(OLD)
        stream = await client.upload_stream("doc.bin")
        await stream.write(random_bytes(3 * MiB))
        await client.abort()
        stream.close()
        names = [str(path) for path, _ in await client.list()]
        async with client.download_stream("doc.bin") as download:
            assert await download.read() == OLD
        assert (await client.command("NOOP", "200"))[0] == "200"
        await client.quit()
        return names

    assert asyncio.run(scenario()) == ["doc.bin"]
    wait_until_settled(root)
    assert (root / "doc.bin").read_bytes() == OLD


def test_killed_client_leaves_no_partial_file(gateway: GatewayThread, tmp_path: Path) -> None:
    curl = require_binary("curl")
    gateway.add_user("alice")
    root = gateway.root_of("alice")
    big = tmp_path / "big.bin"
    big.write_bytes(random_bytes(8 * MiB))
    url = f"ftp://127.0.0.1:{gateway.port}/big.bin"
    process = subprocess.Popen(
        [curl, "--silent", "--user", "alice:secret", "--limit-rate", "1M", "--upload-file", str(big), url]
    )
    try:
        deadline = time.monotonic() + 20
        while not leftovers(root) or (root / leftovers(root)[0]).stat().st_size < 256 * 1024:
            assert time.monotonic() < deadline, "the upload never started"
            assert process.poll() is None
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    wait_until_settled(root)
    assert not (root / "big.bin").exists()


@pytest.mark.parametrize("pump_threads", [64, 0])
def test_client_that_never_opens_the_data_connection(tmp_path: Path, pump_threads: int) -> None:
    settings = gateway_settings(tmp_path, timeouts={"data_connection": 0.5}, transfer={"pump_threads": pump_threads})
    with running(settings) as gateway:
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
        wait_until_settled(gateway.root_of("alice"))
        assert not (gateway.root_of("alice") / "never.bin").exists()


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


@pytest.mark.parametrize("pump_threads", [64, 0])
def test_stalled_data_connection_times_out_and_leaves_nothing(tmp_path: Path, pump_threads: int) -> None:
    settings = gateway_settings(tmp_path, timeouts={"socket": 1}, transfer={"pump_threads": pump_threads})
    with running(settings) as gateway:
        gateway.add_user("alice")
        client = ftp_login(gateway.host, gateway.port, "alice")
        data_socket = client.ftp.transfercmd("STOR stalled.bin")
        data_socket.sendall(random_bytes(100_000))
        # ... and nothing more, without closing: the server gives up after its socket timeout.
        with pytest.raises(ftplib.error_temp) as excinfo:
            client.ftp.voidresp()
        assert str(excinfo.value).startswith("426")
        data_socket.close()
        assert client.ftp.sendcmd("NOOP").startswith("200")
        client.quit()
        wait_until_settled(gateway.root_of("alice"))
        assert not (gateway.root_of("alice") / "stalled.bin").exists()


def test_abor_mid_download_keeps_the_session(gateway: GatewayThread) -> None:
    gateway.add_user("alice")
    root = gateway.root_of("alice")
    root.mkdir(parents=True)
    (root / "big.bin").write_bytes(random_bytes(64 * MiB))

    async def scenario() -> bytes:
        client = aioftp.Client(socket_timeout=10)
        await client.connect(gateway.host, gateway.port)
        await client.login("alice", "secret")
        stream = await client.download_stream("big.bin")
        await stream.read(100_000)
        await client.abort()
        stream.close()
        async with client.download_stream("big.bin", offset=64 * MiB - 5) as tail:
            data = await tail.read()
        await client.quit()
        return data

    assert asyncio.run(scenario()) == (root / "big.bin").read_bytes()[-5:]
