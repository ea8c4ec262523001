"""SIGTERM drains ``ftp-gateway serve``: new connections are refused, idle sessions get 421, a running upload may
finish within ``timeouts.drain`` and is otherwise aborted with nothing partial left; the process exits 0."""

from __future__ import annotations

import ftplib
import hashlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pathio_backends.base import RESERVED_PREFIX
from tests.helpers import (
    S3_BUCKET,
    S3_CREDENTIALS,
    MiB,
    free_passive_range,
    moto_client,
    random_bytes,
    stop_server,
    wait_until,
)

SIZE = 50 * MiB
CHUNK = 256 * 1024


def gateway() -> str:
    return str(Path(sys.executable).with_name("ftp-gateway"))


@dataclass
class Served:
    process: subprocess.Popen[str]
    port: int
    log: Path
    backend: str
    data: Path
    s3: object | None = None

    def stored(self, name: str) -> bytes | None:
        if self.backend == "local":
            path = self.data / "carol" / name
            return path.read_bytes() if path.exists() else None
        try:
            body = self.s3.get_object(Bucket=S3_BUCKET, Key=f"users/carol/{name}")["Body"]  # type: ignore[attr-defined]
        except self.s3.exceptions.NoSuchKey:  # type: ignore[attr-defined]
            return None
        with body:
            return bytes(body.read())

    def pending_uploads(self) -> list[str]:
        """Temporary upload files (local disk) or multipart uploads (S3) not yet completed or aborted."""
        if self.backend == "local":
            root = self.data / "carol"
            return [p.name for p in root.rglob("*") if p.name.startswith(RESERVED_PREFIX)] if root.exists() else []
        response = self.s3.list_multipart_uploads(Bucket=S3_BUCKET, Prefix="users/carol/")  # type: ignore[attr-defined]
        return [upload["Key"] for upload in response.get("Uploads", [])]

    def stderr(self) -> str:
        return self.log.read_text()


@contextmanager
def serve(tmp_path: Path, backend: str, endpoint: str | None, *extra: str) -> Iterator[Served]:
    env = {**os.environ, "FTP_GATEWAY_LIMITS__FAILED_LOGIN_DELAY": "0", "FTP_GATEWAY_ADMIN__LISTEN": "off"}
    env.pop("FTP_GATEWAY_CONFIG", None)
    s3 = None
    if backend == "s3":
        assert endpoint is not None
        storage = f"s3://{S3_BUCKET}/users/{{username}}"
        env |= {
            "FTP_GATEWAY_S3__ENDPOINT_URL": endpoint,
            "FTP_GATEWAY_S3__ACCESS_KEY_ID": S3_CREDENTIALS["access_key_id"],
            "FTP_GATEWAY_S3__SECRET_ACCESS_KEY": S3_CREDENTIALS["secret_access_key"],
            "FTP_GATEWAY_S3__REGION": S3_CREDENTIALS["region"],
        }
        s3 = moto_client(endpoint)
    else:
        storage = f"file://{tmp_path}/data/{{username}}"
    database = f"sqlite:///{tmp_path / 'users.db'}"
    subprocess.run(
        [gateway(), "user", "add", "carol", "--password-stdin", "--database", database],
        input="pw\n", text=True, check=True, env=env, capture_output=True,
    )  # fmt: skip
    low, high = free_passive_range(10)
    if "--workers" not in extra:
        extra = ("--workers", "1", *extra)
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [gateway(), "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--database", database,
             "--passive-ports", f"{low}-{high}", "--storage", storage, *extra],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("listening on ftp://127.0.0.1:"), line + log.read_text()
    try:
        yield Served(process, int(line.rsplit(":", 1)[1]), log, backend, tmp_path / "data", s3)
    finally:
        stop_server(process)
        process.stdout.close()
        if s3 is not None:
            s3.close()


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    endpoint = request.getfixturevalue("s3_endpoint") if request.param == "s3" else None
    return request.param, endpoint


def login(port: int) -> ftplib.FTP:
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", port, timeout=30)
    ftp.login("carol", "pw")
    ftp.voidcmd("TYPE I")
    return ftp


class SlowUpload:
    """STOR of :data:`SIZE` bytes sent by hand, so the test decides when the rest of the data goes."""

    def __init__(self, ftp: ftplib.FTP, name: str) -> None:
        self.ftp = ftp
        self.data = random_bytes(SIZE, seed=7)
        self.sent = 0
        self.conn = ftp.transfercmd(f"STOR {name}")  # the 150 is read here

    def send(self, count: int) -> None:
        end = min(SIZE, self.sent + count)
        while self.sent < end:
            piece = self.data[self.sent : min(end, self.sent + CHUNK)]
            self.conn.sendall(piece)
            self.sent += len(piece)

    def finish(self) -> None:
        self.send(SIZE)
        self.conn.close()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def reply(ftp: ftplib.FTP) -> str:
    """The next reply, whatever its code (ftplib raises for 4xx and 5xx)."""
    try:
        return ftp.getresp()
    except ftplib.Error as exc:
        return str(exc)


def connection_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_in_the_middle(served: Served, upload: SlowUpload) -> None:
    """Send a fifth of the file and wait until the server holds it as an upload in progress (a temporary file,
    or a multipart upload on S3 once a part has gone out)."""
    upload.send(SIZE // 5)
    wait_until(served.pending_uploads, timeout=30, what="the upload to be in progress on the server")


def test_sigterm_lets_a_running_upload_finish(tmp_path: Path, backend: tuple[str, str | None]) -> None:
    """The drain: idle sessions get 421, new connections are refused, a transfer command gets 421, and the
    upload that was running completes (byte for byte), gets its 226, then 421; the process exits 0."""
    with serve(tmp_path, *backend) as served:
        idle = login(served.port)
        uploading = login(served.port)
        upload = SlowUpload(uploading, "big.bin")
        wait_in_the_middle(served, upload)
        served.process.send_signal(signal.SIGTERM)
        assert reply(idle).startswith("421"), served.stderr()
        assert connection_refused(served.port)
        with pytest.raises(ftplib.error_temp, match="^421"):
            uploading.sendcmd("PASV")  # no new transfer, even on a session with one running
        upload.finish()
        assert reply(uploading).startswith("226")
        assert reply(uploading).startswith("421")
        assert served.process.wait(timeout=60) == 0
        stored = served.stored("big.bin")
        assert stored is not None and hashlib.sha256(stored).hexdigest() == upload.sha256
        assert served.pending_uploads() == []
        log = served.stderr()
        assert "draining: 2 sessions open, 1 transfers running" in log
        assert "drained: 1 transfers finished, 0 aborted" in log
        assert "Traceback" not in log
        idle.close()
        uploading.close()


def test_upload_still_running_after_the_drain_timeout_is_aborted(
    tmp_path: Path, backend: tuple[str, str | None]
) -> None:
    """With a drain timeout of 1 s, an upload that does not finish is aborted: the client gets 426 then 421, no
    file or object appears, no temporary file or multipart upload is left; the process exits 0."""
    with serve(tmp_path, *backend, "--drain-timeout", "1") as served:
        ftp = login(served.port)
        upload = SlowUpload(ftp, "big.bin")
        wait_in_the_middle(served, upload)
        served.process.send_signal(signal.SIGTERM)
        assert reply(ftp).startswith("426")
        assert reply(ftp).startswith("421")
        assert served.process.wait(timeout=60) == 0
        assert served.stored("big.bin") is None
        assert served.pending_uploads() == []
        log = served.stderr()
        assert "drained: 0 transfers finished, 1 aborted" in log
        assert "Traceback" not in log
        upload.conn.close()
        ftp.close()


def test_a_second_sigterm_aborts_at_once(tmp_path: Path, backend: tuple[str, str | None]) -> None:
    """A second SIGTERM during a long drain aborts the upload through the same clean path and exits 0."""
    with serve(tmp_path, *backend, "--drain-timeout", "3600") as served:
        idle = login(served.port)
        ftp = login(served.port)
        upload = SlowUpload(ftp, "big.bin")
        wait_in_the_middle(served, upload)
        served.process.send_signal(signal.SIGTERM)
        assert reply(idle).startswith("421")  # the drain has begun
        served.process.send_signal(signal.SIGTERM)
        assert reply(ftp).startswith("426")
        assert reply(ftp).startswith("421")
        assert served.process.wait(timeout=60) == 0
        assert served.stored("big.bin") is None
        assert served.pending_uploads() == []
        assert "second signal" in served.stderr()
        upload.conn.close()
        ftp.close()
        idle.close()


def test_workers_drain_and_the_parent_exits_0(tmp_path: Path) -> None:
    """``serve --workers 2``: the parent passes SIGTERM on; the upload on a worker completes; exit 0."""
    with serve(tmp_path, "local", None, "--workers", "2") as served:
        ftp = login(served.port)
        upload = SlowUpload(ftp, "big.bin")
        wait_in_the_middle(served, upload)
        served.process.send_signal(signal.SIGTERM)
        port = served.port
        wait_until(lambda: connection_refused(port), timeout=30, what="both workers to stop listening")
        upload.finish()
        assert reply(ftp).startswith("226")
        assert reply(ftp).startswith("421")
        assert served.process.wait(timeout=60) == 0
        stored = served.stored("big.bin")
        assert stored is not None and hashlib.sha256(stored).hexdigest() == upload.sha256
        assert "Traceback" not in served.stderr()
        ftp.close()
