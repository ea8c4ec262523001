"""What is particular to the S3 backend: its error table, outages, directory renames and huge listings."""

from __future__ import annotations

import errno
import ftplib
import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import reply_for
from pathio_backends.s3.errors import translate
from pathio_backends.s3.upload import part_size_for
from tests.clients import assert_refused, ftp_login
from tests.helpers import (
    S3_BUCKET,
    S3_CREDENTIALS,
    GatewayThread,
    MiB,
    create_test_bucket,
    gateway_settings,
    random_bytes,
    running,
    sha256,
    wait_until,
)

OLD = b"the previous version\n"


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "test"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


@pytest.mark.parametrize(
    ("error", "kind", "number", "reply"),
    [
        (client_error("NoSuchKey", 404), FileNotFoundError, errno.ENOENT, "550"),
        (client_error("", 404), FileNotFoundError, errno.ENOENT, "550"),
        (client_error("NoSuchBucket", 404), OSError, errno.ENXIO, "451"),
        (client_error("AccessDenied", 403), PermissionError, errno.EACCES, "550"),
        (client_error("SlowDown", 503), OSError, errno.EBUSY, "451"),
        (client_error("ServiceUnavailable", 503), OSError, errno.EBUSY, "451"),
        (client_error("RequestTimeout", 400), TimeoutError, errno.ETIMEDOUT, "451"),
        (client_error("EntityTooLarge", 400), OSError, errno.EFBIG, "452"),
        (client_error("KeyTooLongError", 400), OSError, errno.ENAMETOOLONG, "553"),
        (client_error("InternalError", 500), OSError, errno.EIO, "451"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), ConnectionRefusedError, errno.ECONNREFUSED, "451"),
    ],
)
def test_s3_errors_map_to_builtin_errors_and_replies(
    error: Exception, kind: type[OSError], number: int, reply: str
) -> None:
    translated = translate(error, "PutObject", "users/alice/x")
    assert type(translated) is kind
    assert translated.errno == number
    code, _, expected = reply_for(translated)
    assert code == reply and expected


def test_part_sizes_reach_5_tib_in_10000_parts() -> None:
    for base in (5 * MiB, 8 * MiB, 64 * MiB):
        sizes = [part_size_for(base, n) for n in range(1, 10_001)]
        assert sum(sizes) >= 5 * 1024**4
        assert all(5 * MiB <= size <= 5 * 1024**3 for size in sizes)
        assert sizes[0] == base and sizes == sorted(sizes)


@pytest.fixture
def s3_gateway(tmp_path: Path, s3_endpoint: str) -> Iterator[GatewayThread]:
    with running(gateway_settings(tmp_path, s3_endpoint=s3_endpoint, s3={"part_size": 5 * MiB})) as gw:
        yield gw


def test_missing_bucket_gets_451_and_the_session_goes_on(s3_gateway: GatewayThread) -> None:
    s3_gateway.add_user("alice")
    client = ftp_login(s3_gateway.host, s3_gateway.port, "alice")
    s3 = s3_gateway.files.client  # type: ignore[union-attr]
    s3.delete_bucket(Bucket=S3_BUCKET)
    assert_refused("451", lambda: client.list(), lambda: client.mkd("d"))
    assert client.ftp.sendcmd("NOOP").startswith("200")
    s3.create_bucket(Bucket=S3_BUCKET)
    client.mkd("d")
    assert client.list() == {"d": ("dir", 0)}
    client.quit()


def test_unreachable_endpoint_refuses_that_login_only(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings = gateway_settings(
        tmp_path,
        storage={"default_uri": f"s3://{S3_BUCKET}/{{username}}"},
        s3={"endpoint_url": f"http://127.0.0.1:{closed_port}", "max_attempts": 1, **S3_CREDENTIALS},
    )
    with running(settings) as gateway:
        gateway.add_user("alice")
        gateway.add_user("bob", storage_uri=f"file://{tmp_path / 'bob'}")
        (tmp_path / "bob").mkdir()
        with pytest.raises(ftplib.error_perm) as excinfo:
            ftp_login(gateway.host, gateway.port, "alice")
        assert str(excinfo.value) == "530 Login refused: storage unavailable."
        bob = ftp_login(gateway.host, gateway.port, "bob")
        bob.stor("still.txt", b"serving")
        bob.quit()


def test_s3_outage_mid_upload(tmp_path: Path) -> None:
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    create_test_bucket(endpoint)
    settings = gateway_settings(
        tmp_path, s3_endpoint=endpoint, s3={"part_size": 5 * MiB, "max_attempts": 2, "connect_timeout": 2}
    )
    try:
        with running(settings) as gateway:
            gateway.add_user("alice")
            gateway.files.put("alice", "doc.bin", OLD)
            client = ftp_login(gateway.host, gateway.port, "alice")
            data_socket = client.ftp.transfercmd("STOR doc.bin")
            data_socket.sendall(random_bytes(11 * MiB))
            wait_until(lambda: gateway.files.pending_uploads("alice"), timeout=20, what="the multipart upload to begin")
            moto.stop()
            try:
                data_socket.sendall(random_bytes(6 * MiB))
            except OSError:
                pass  # the server may have given up on the data connection already
            data_socket.close()
            with pytest.raises(ftplib.Error) as excinfo:
                client.ftp.voidresp()
            assert str(excinfo.value).startswith(("451", "426")), excinfo.value
            assert client.ftp.sendcmd("NOOP").startswith("200")

            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            moto.start()
            # The multipart upload that could not be aborted during the outage is aborted once S3 is back.
            gateway.wait_for_no_pending_uploads("alice", timeout=60)
            assert gateway.files.files("alice") == {"doc.bin": OLD}
            other = ftp_login(gateway.host, gateway.port, "alice")
            other.stor("after.bin", b"S3 is back")
            assert other.retr("after.bin") == b"S3 is back"
            other.quit()
            client.quit()
    finally:
        moto.stop()


def seed(count: int, prefix: str) -> None:
    """Objects put straight into moto's store (over HTTP this would take minutes); the gateway reads them over HTTP."""
    from moto.backends import get_backend

    backend = get_backend("s3")["123456789012"]["global"]
    for index in range(count):
        backend.put_object(S3_BUCKET, f"{prefix}{index:06d}.txt", f"object {index}".encode())


def test_directory_rename_of_1000_keys(s3_gateway: GatewayThread) -> None:
    s3_gateway.add_user("alice")
    seed(1000, "users/alice/photos/2026/img-")
    s3_gateway.files.makedirs("alice", "photos")
    client = ftp_login(s3_gateway.host, s3_gateway.port, "alice")
    client.rename("photos", "archive")
    files = s3_gateway.files.files("alice")
    assert len(files) == 1000
    assert all(name.startswith("archive/2026/img-") for name in files)
    assert files["archive/2026/img-000999.txt"] == b"object 999"
    assert client.list() == {"archive": ("dir", 0)}
    assert len(client.list("archive/2026")) == 1000
    client.quit()


def test_failed_directory_rename_leaves_the_source_complete(s3_gateway: GatewayThread) -> None:
    s3_gateway.add_user("alice")
    seed(200, "users/alice/docs/doc-")
    s3 = s3_gateway.files.client  # type: ignore[union-attr]
    # An archived object cannot be copied (ObjectNotInActiveTierError): the rename fails half-way.
    s3.put_object(Bucket=S3_BUCKET, Key="users/alice/docs/doc-000100.5.txt", Body=b"cold", StorageClass="GLACIER")

    def objects() -> dict[str, tuple[int, str]]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix="users/alice/")
        return {item["Key"]: (item["Size"], item["ETag"]) for page in pages for item in page.get("Contents", [])}

    before = objects()
    assert len(before) == 201
    client = ftp_login(s3_gateway.host, s3_gateway.port, "alice")
    client.ftp.sendcmd("RNFR docs")
    assert_refused("550", lambda: client.ftp.sendcmd("RNTO moved"))
    assert objects() == before
    assert set(client.list()) == {"docs"}
    client.quit()


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_listing_100000_keys_streams_with_bounded_memory(tmp_path: Path, s3_endpoint: str) -> None:
    """The gateway runs as its own process so that its memory alone is measured (peak RSS, from /proc)."""
    seed(100_000, "users/alice/big/key-")
    database = f"sqlite:///{tmp_path / 'users.db'}"
    env = {
        **os.environ,
        "FTP_GATEWAY_STORAGE__DEFAULT_URI": f"s3://{S3_BUCKET}/users/{{username}}",
        "FTP_GATEWAY_S3__ENDPOINT_URL": s3_endpoint,
        "FTP_GATEWAY_S3__ACCESS_KEY_ID": "testing",
        "FTP_GATEWAY_S3__SECRET_ACCESS_KEY": "testing",
        "FTP_GATEWAY_S3__REGION": "us-east-1",
        "FTP_GATEWAY_LOG__LEVEL": "warning",
        "FTP_GATEWAY_TIMEOUTS__PATH": "120",
    }
    command = [str(Path(sys.executable).with_name("ftp-gateway"))]
    subprocess.run(
        [*command, "user", "add", "alice", "--password-stdin", "--database", database],
        input="pw\n", text=True, check=True, env=env, capture_output=True,
    )  # fmt: skip
    process = subprocess.Popen(
        [*command, "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--passive-ports", "31300-31349", "--database", database],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline().rsplit(":", 1)[1])
        with ftplib.FTP() as ftp:
            ftp.connect("127.0.0.1", port, timeout=300)
            ftp.login("alice", "pw")
            ftp.retrlines("LIST")  # warm up: the S3 client, its pool, first-use allocations
            before = vm_kib(process.pid, "VmRSS")
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # restart the peak-RSS count from here
            count = 0

            def line(text: str) -> None:
                nonlocal count
                count += 1

            ftp.retrlines("LIST big", line)
            peak = vm_kib(process.pid, "VmHWM")
            ftp.quit()
        assert count == 100_000
        growth_mib = (peak - before) / 1024
        print(f"listing 100,000 keys: peak RSS grew by {growth_mib:.1f} MiB")
        # Holding the whole listing would take ~100 MiB (a Path and a stat_result per entry) plus the XML.
        assert growth_mib < 32
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        assert process.stdout is not None
        process.stdout.close()


def test_listing_sends_no_request_per_entry(s3_gateway: GatewayThread, caplog: pytest.LogCaptureFixture) -> None:
    """aioftp asks for each listed entry's stat; the answers come from the listing's own page."""
    s3_gateway.add_user("alice")
    seed(300, "users/alice/many/file-")
    client = ftp_login(s3_gateway.host, s3_gateway.port, "alice")
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        caplog.clear()
        assert len(client.list("many")) == 300
        assert len(client.mlsd("many")) == 300
        requests = [record.getMessage() for record in caplog.records if record.name == "werkzeug"]
    client.quit()
    heads = [r for r in requests if re.search(r"HEAD /\S*/many/file-", r)]
    listings = [r for r in requests if "list-type=2" in r and "delimiter=/" in r]
    assert any("HEAD /" in r for r in requests), "the log shows HEAD requests (the check above can see them)"
    assert heads == []
    assert len(listings) == 2  # one page of 300 entries for LIST, one for MLSD


def test_rename_above_the_copy_limit_copies_in_parts(
    s3_gateway: GatewayThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CopyObject stops at 5 GiB; above, the copy goes through UploadPartCopy (limit lowered to test it)."""
    import pathio_backends.s3.copy

    monkeypatch.setattr(pathio_backends.s3.copy, "MAX_PART", 6 * MiB)
    s3_gateway.add_user("alice")
    data = random_bytes(11 * MiB, seed=11)
    client = ftp_login(s3_gateway.host, s3_gateway.port, "alice")
    client.stor("big.bin", data)
    client.rename("big.bin", "moved.bin")
    assert client.retr("moved.bin") == data
    assert client.list() == {"moved.bin": ("file", 11 * MiB)}
    # MFMT rewrites the metadata the same way: a multipart copy of the object onto itself.
    assert client.ftp.sendcmd("MFMT 20200102030405 moved.bin").startswith("213")
    assert client.ftp.sendcmd("MDTM moved.bin") == "213 20200102030405"
    assert client.retr("moved.bin") == data
    assert client.ftp.sendcmd("HASH moved.bin").split()[3] == sha256(data)
    assert s3_gateway.files.pending_uploads("alice") == []
    client.quit()


@given(
    blocks=st.lists(st.binary(max_size=40), max_size=6),
    operations=st.lists(
        st.tuples(
            st.sampled_from(["read", "seek"]), st.integers(min_value=-5, max_value=300), st.sampled_from([0, 1, 2])
        ),
        max_size=12,
    ),
)
def test_blocks_io_reads_like_bytes_io(blocks: list[bytes], operations: list[tuple[str, int, int]]) -> None:
    """A part body made of blocks must read and seek exactly like the joined bytes (botocore seeks to retry)."""
    from pathio_backends.s3.upload import BlocksIO

    ours, reference = BlocksIO(list(blocks)), io.BytesIO(b"".join(blocks))
    assert len(ours) == len(reference.getvalue())
    for operation, number, whence in operations:
        if operation == "read":
            size = number if number >= 0 else -1
            assert ours.read(size) == reference.read(size)
        else:
            target = max(0, reference.seek(0, whence) + number)
            reference.seek(min(target, len(reference.getvalue())))
            assert ours.seek(number, whence) == reference.tell()
        assert ours.tell() == reference.tell()


def test_failed_complete_is_an_error_reply_not_226(s3_gateway: GatewayThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 refusing CompleteMultipartUpload (injected: moto never does) must not be reported as a success."""
    from pathio_backends.s3.client import S3Context

    real_call = S3Context.call

    async def failing_complete(self: S3Context, operation: str, **kwargs: object) -> dict[str, object]:
        if operation == "complete_multipart_upload":
            raise OSError(errno.EIO, "S3 InternalError", kwargs.get("Key"))
        return await real_call(self, operation, **kwargs)

    monkeypatch.setattr(S3Context, "call", failing_complete)
    s3_gateway.add_user("alice")
    s3_gateway.files.put("alice", "doc.bin", OLD)
    client = ftp_login(s3_gateway.host, s3_gateway.port, "alice")
    assert_refused("451", lambda: client.stor("doc.bin", random_bytes(12 * MiB)))
    assert client.retr("doc.bin") == OLD
    s3_gateway.wait_for_no_pending_uploads("alice")
    client.quit()


def test_commands_ask_s3_once_about_their_path(s3_gateway: GatewayThread, caplog: pytest.LogCaptureFixture) -> None:
    """SIZE, MDTM, RETR, LIST, MLSD and MLST stat their path once (a HEAD and a one-key listing, sent
    together), instead of aioftp's exists + is_file + stat, each a request or two."""
    s3_gateway.add_user("alice")
    s3_gateway.files.put("alice", "dir/file.bin", b"12345")
    client = ftp_login(s3_gateway.host, s3_gateway.port, "alice")
    commands = {
        "SIZE": lambda: client.ftp.sendcmd("SIZE dir/file.bin"),
        "MDTM": lambda: client.ftp.sendcmd("MDTM dir/file.bin"),
        "MLST": lambda: client.ftp.sendcmd("MLST dir/file.bin"),
        "RETR": lambda: client.retr("dir/file.bin"),
        "LIST": lambda: client.list("dir"),
        "MLSD": lambda: client.mlsd("dir"),
    }
    for name, command in commands.items():
        with caplog.at_level(logging.INFO, logger="werkzeug"):
            caplog.clear()
            command()
            requests = [r.getMessage() for r in caplog.records if r.name == "werkzeug"]
        heads = [r for r in requests if re.search(r"HEAD /\S*/dir", r)]
        probes = [r for r in requests if "max-keys=1&" in r]
        assert len(heads) == 1, (name, requests)
        assert len(probes) == 1, (name, requests)
    assert_refused("550", lambda: client.ftp.sendcmd("SIZE dir"), lambda: client.ftp.sendcmd("SIZE missing"))
    client.quit()
