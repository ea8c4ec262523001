"""The admin endpoint: /healthz, /readyz (database, default storage, draining) and /metrics, in-process and from
``serve --workers``; the CLI's one-line errors for its address."""

from __future__ import annotations

import asyncio
import ftplib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import DatabaseSettings
from gateway.users.db import create_engine, upgrade
from tests.helpers import (
    GatewayThread,
    MiB,
    create_test_bucket,
    free_passive_range,
    gateway_settings,
    random_bytes,
    reset_moto,
    running,
    scratch_postgres,
    sha256,
    wait_until,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - http on loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(url: str) -> Samples:
    """Every sample of /metrics, parsed by prometheus-client's own parser, keyed by name and labels."""
    status, text = get(url + "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels`` (e.g. over workers)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def scrape_until(url: str, condition: Callable[[Samples], bool], what: str) -> Samples:
    def scraped() -> Samples | None:
        samples = scrape(url)
        return samples if condition(samples) else None

    return wait_until(scraped, timeout=10, what=what)


def ready_until(url: str, status: int, what: str) -> str:
    """/readyz's text once it answers ``status``."""

    def answered() -> str | None:
        code, text = get(url + "/readyz")
        return text if code == status else None

    return wait_until(answered, timeout=15, what=what)


def admin_url(gw: GatewayThread) -> str:
    assert gw.server is not None and gw.server.admin_url is not None
    return gw.server.admin_url


def test_metrics_move_after_logins_and_transfers(backend_gateway: GatewayThread) -> None:
    gw = backend_gateway
    url = admin_url(gw)
    assert get(url + "/healthz") == (200, "ok\n")
    assert get(url + "/readyz") == (200, "ready\n")
    gw.add_user("alice", "right")
    data = random_bytes(9 * MiB + 123, seed=3)  # two parts of the default 8 MiB: a multipart upload on S3
    before = scrape(url)
    with ftplib.FTP() as ftp:
        ftp.connect(gw.host, gw.port, timeout=30)
        with pytest.raises(ftplib.error_perm, match="530"):
            ftp.login("alice", "wrong")
        ftp.login("alice", "right")
        during = scrape(url)
        ftp.storbinary("STOR big.bin", io.BytesIO(data))
        got = io.BytesIO()
        ftp.retrbinary("RETR big.bin", got.write)
        assert sha256(got.getvalue()) == sha256(data)
        with pytest.raises(ftplib.error_perm, match="550"):
            ftp.retrbinary("RETR missing.bin", io.BytesIO().write)
        with pytest.raises(ftplib.error_perm, match="502"):
            ftp.sendcmd("FROB x")
        ftp.quit()
    backend = "s3" if gw.backend == "s3" else "file"
    assert value(before, "ftp_gateway_sessions_open") == 0
    assert value(during, "ftp_gateway_sessions_open") == 1
    after = scrape_until(url, lambda s: value(s, "ftp_gateway_sessions_open") == 0, "the session's end")
    assert value(after, "ftp_gateway_logins_total", result="success") == 1
    assert value(after, "ftp_gateway_logins_total", result="failure") == 1
    for direction in ("upload", "download"):
        labels = {"direction": direction, "backend": backend}
        assert value(after, "ftp_gateway_transfers_total", **labels, result="ok") == 1
        assert value(after, "ftp_gateway_transfer_bytes_total", **labels, result="ok") == len(data)
        assert value(after, "ftp_gateway_transfer_duration_seconds_count", **labels) == 1
        assert value(after, "ftp_gateway_transfer_duration_seconds_bucket", **labels, le="+Inf") == 1
        assert value(after, "ftp_gateway_transfer_duration_seconds_sum", **labels) > 0
    assert value(after, "ftp_gateway_commands_total", verb="STOR", reply_class="2xx") == 1
    assert value(after, "ftp_gateway_commands_total", verb="RETR", reply_class="2xx") == 1
    assert value(after, "ftp_gateway_commands_total", verb="RETR", reply_class="5xx") == 1
    assert value(after, "ftp_gateway_commands_total", verb="PASS", reply_class="5xx") == 1
    assert value(after, "ftp_gateway_commands_total", verb="other", reply_class="5xx") == 1
    assert value(after, "ftp_gateway_passive_ports_in_use") == 0
    assert value(after, "process_resident_memory_bytes") > 0
    if gw.backend == "s3":
        assert value(after, "ftp_gateway_s3_requests_total", operation="CreateMultipartUpload", outcome="ok") == 1
        assert value(after, "ftp_gateway_s3_requests_total", operation="CompleteMultipartUpload", outcome="ok") == 1
        assert value(after, "ftp_gateway_s3_requests_total", operation="UploadPart", outcome="ok") == 2
        assert value(after, "ftp_gateway_s3_requests_total", operation="HeadObject", outcome="4xx") >= 1
        assert value(after, "ftp_gateway_s3_request_duration_seconds_count", operation="UploadPart") == 2
        assert value(after, "ftp_gateway_s3_multipart_uploads_in_flight") == 0
    # No label carries a user name, a path or an address.
    labels = {v for (_, ls) in after for _, v in ls}
    assert not labels & {"alice", "big.bin", "/big.bin", "127.0.0.1"}


def test_an_aborted_multipart_upload_leaves_the_gauge_at_zero(tmp_path: Path, s3_endpoint: str) -> None:
    settings = gateway_settings(tmp_path, s3_endpoint=s3_endpoint, s3={"part_size": 5 * MiB})
    with running(settings) as gw:
        gw.add_user("alice", "pw")
        with ftplib.FTP() as ftp:
            ftp.connect(gw.host, gw.port, timeout=30)
            ftp.login("alice", "pw")
            with ftp.transfercmd("STOR big.bin") as data:
                data.sendall(random_bytes(6 * MiB))
                samples = scrape_until(
                    admin_url(gw),
                    lambda s: value(s, "ftp_gateway_s3_multipart_uploads_in_flight") == 1,
                    "the multipart upload to be counted",
                )
                assert value(samples, "ftp_gateway_passive_ports_in_use") == 1
                ftp.abort()  # with the data connection still open: nothing is committed
            ftp.close()
        gw.wait_for_no_pending_uploads("alice")
        after = scrape_until(
            admin_url(gw),
            lambda s: (
                total(s, "ftp_gateway_transfers_total", direction="upload", result="aborted")
                + total(s, "ftp_gateway_transfers_total", direction="upload", result="failed")
                == 1
            ),
            "the aborted upload to be counted",
        )
        assert value(after, "ftp_gateway_s3_multipart_uploads_in_flight") == 0
        assert value(after, "ftp_gateway_s3_requests_total", operation="AbortMultipartUpload", outcome="ok") == 1


def test_readyz_turns_503_at_once_while_draining(local_gateway: GatewayThread) -> None:
    url = admin_url(local_gateway)
    assert get(url + "/readyz") == (200, "ready\n")
    server = local_gateway.server
    assert server is not None

    async def drain(flag: bool) -> None:
        server.draining = flag

    local_gateway.call(lambda: drain(True))
    status, text = get(url + "/readyz")
    assert status == 503 and text.startswith("draining")
    assert get(url + "/healthz")[0] == 200
    local_gateway.call(lambda: drain(False))
    assert get(url + "/readyz") == (200, "ready\n")


def test_readyz_names_an_unusable_local_storage(tmp_path: Path) -> None:
    settings = gateway_settings(tmp_path)
    with running(settings) as gw:
        url = admin_url(gw)
        assert get(url + "/readyz")[0] == 200
        shutil.rmtree(tmp_path / "data", ignore_errors=True)
        (tmp_path / "data").write_text("a file where the users' directories go")
        text = ready_until(url, 503, "readyz to fail")
        assert text.startswith("storage: file://") and "data exists and is not a directory" in text, text
        (tmp_path / "data").unlink()
        ready_until(url, 200, "readyz to recover")


# -- a dependency that goes away and comes back --------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:port to ``target`` until :meth:`stop`, which also cuts every connection it carries;
    :meth:`start` again listens on the same port (the database or S3 "comes back")."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept, self._listener)
        return self

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(10)
        self._threads.clear()
        if listener is not None:
            listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def postgres_behind_proxy() -> Iterator[tuple[str, TcpProxy]]:
    with scratch_postgres() as url:
        engine = create_engine(DatabaseSettings(url=url))

        async def migrate() -> None:
            try:
                await upgrade(engine)
            finally:
                await engine.dispose()

        asyncio.run(migrate())
        head, _, rest = url.partition("@")
        host_port, _, database = rest.partition("/")
        host, _, port = host_port.rpartition(":")
        proxy = TcpProxy((host, int(port or 5432))).start()
        try:
            yield f"{head}@127.0.0.1:{proxy.port}/{database}", proxy
        finally:
            proxy.stop()


def test_readyz_fails_while_the_database_is_down_and_recovers(
    tmp_path: Path, postgres_behind_proxy: tuple[str, TcpProxy]
) -> None:
    url, proxy = postgres_behind_proxy
    with running(gateway_settings(tmp_path, url, database={"timeout": 2})) as gw:
        admin = admin_url(gw)
        assert get(admin + "/readyz") == (200, "ready\n")
        proxy.stop()
        text = ready_until(admin, 503, "readyz to fail")
        assert text.startswith("database: ") and len(text.splitlines()) == 1, text
        proxy.start()
        ready_until(admin, 200, "readyz to recover")
        gw.add_user("alice", "pw")
        with ftplib.FTP() as ftp:
            ftp.connect(gw.host, gw.port, timeout=30)
            ftp.login("alice", "pw")
            ftp.quit()


def test_readyz_fails_while_s3_is_down_and_recovers(tmp_path: Path, moto_server: str) -> None:
    reset_moto(moto_server)
    create_test_bucket(moto_server)
    host, _, port = moto_server.removeprefix("http://").rpartition(":")
    proxy = TcpProxy((host, int(port))).start()
    try:
        settings = gateway_settings(
            tmp_path, s3_endpoint=f"http://127.0.0.1:{proxy.port}", s3={"max_attempts": 1, "connect_timeout": 2}
        )
        with running(settings) as gw:
            admin = admin_url(gw)
            assert get(admin + "/readyz") == (200, "ready\n")
            proxy.stop()
            text = ready_until(admin, 503, "readyz to fail")
            assert text.startswith("storage: s3://") and len(text.splitlines()) == 1, text
            samples = scrape(admin)
            assert total(samples, "ftp_gateway_s3_requests_total", operation="HeadBucket", outcome="error") >= 1
            proxy.start()
            ready_until(admin, 200, "readyz to recover")
    finally:
        proxy.stop()


# -- serve --workers and the CLI ------------------------------------------------------------------------------


def gateway() -> str:
    return str(Path(sys.executable).with_name("ftp-gateway"))


def serve(tmp_path: Path, *options: str) -> subprocess.Popen[str]:
    env = {**os.environ, "FTP_GATEWAY_LIMITS__FAILED_LOGIN_DELAY": "0"}
    env.pop("FTP_GATEWAY_CONFIG", None)
    low, high = free_passive_range(10)
    return subprocess.Popen(
        [gateway(), "serve", "--listen", "127.0.0.1:0", "--database", f"sqlite:///{tmp_path / 'users.db'}",
         "--passive-ports", f"{low}-{high}", "--storage", f"file://{tmp_path}/data/{{username}}", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM, wait, and what the process printed after that on stdout and stderr."""
    process.terminate()
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


def test_workers_parent_serves_the_merged_admin_endpoint(tmp_path: Path) -> None:
    subprocess.run(
        [gateway(), "user", "add", "carol", "--password-stdin", "--database", f"sqlite:///{tmp_path / 'users.db'}"],
        input="pw\n", text=True, check=True, capture_output=True,
    )  # fmt: skip
    audit = tmp_path / "audit.jsonl"
    process = serve(tmp_path, "--workers", "2", "--admin-listen", "127.0.0.1:0", "--audit-log", str(audit))
    try:
        assert process.stdout is not None
        listening = process.stdout.readline()
        assert listening.startswith("listening on ftp://127.0.0.1:"), listening
        admin = process.stdout.readline()
        assert admin.startswith("admin on http://127.0.0.1:"), admin
        url = admin.removeprefix("admin on ").strip()
        assert get(url + "/healthz") == (200, "ok\n")
        assert get(url + "/readyz") == (200, "ready\n")
        samples = scrape(url)
        workers = {dict(ls).get("worker") for (n, ls) in samples if n == "ftp_gateway_sessions_open"}
        assert workers == {"0", "1"}
        for index in range(4):  # the kernel spreads the sessions over the workers
            with ftplib.FTP() as ftp:
                ftp.connect("127.0.0.1", int(listening.rsplit(":", 1)[1]), timeout=30)
                ftp.login("carol", "pw")
                ftp.storbinary(f"STOR {index}.txt", io.BytesIO(b"12345"))
                ftp.quit()
        samples = scrape(url)
        assert total(samples, "ftp_gateway_logins_total", result="success") == 4
        assert total(samples, "ftp_gateway_transfer_bytes_total", direction="upload", result="ok") == 20

        # Both workers append to one audit file, whole lines each.
        def all_written() -> list[str] | None:
            lines = audit.read_text().splitlines()
            return lines if len(lines) == 8 else None

        events = wait_until(all_written, timeout=10, what="8 audit events")
        assert sorted(json.loads(line)["event"] for line in events) == ["login"] * 4 + ["upload"] * 4
        # The storage becomes unusable: the parent is not ready, and says which workers and why.
        shutil.rmtree(tmp_path / "data")
        (tmp_path / "data").write_text("not a directory")
        text = ready_until(url, 503, "readyz to fail")
        assert sorted(line.split(":")[0] for line in text.splitlines()) == ["worker 0", "worker 1"], text
    finally:
        _, err = stop(process)
    assert process.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_admin_port_in_use_is_one_line(tmp_path: Path, workers: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        process = serve(tmp_path, "--workers", workers, "--admin-listen", f"127.0.0.1:{port}")
        _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"ftp-gateway: error: admin endpoint cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err


@pytest.mark.parametrize("value", ["nonsense", "127.0.0.1:99999", "unix:"])
def test_bad_admin_listen_is_one_line_exit_2(tmp_path: Path, value: str) -> None:
    result = subprocess.run(
        [gateway(), "serve", "--admin-listen", value, "--database", f"sqlite:///{tmp_path / 'users.db'}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--admin-listen" in result.stderr and value in result.stderr


def test_admin_off(tmp_path: Path) -> None:
    process = serve(tmp_path, "--workers", "1", "--admin-listen", "off", "--audit-log", "off")
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("listening on ftp://")
    finally:
        rest, err = stop(process)
    assert process.returncode == 0, err
    assert rest == ""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_readyz_is_503_while_serve_drains(tmp_path: Path, workers: str) -> None:
    """SIGTERM with an upload running: /readyz turns 503 while the upload still runs (the admin endpoint stays up
    while the transfer may finish), and the process exits 0 once it has."""
    subprocess.run(
        [gateway(), "user", "add", "carol", "--password-stdin", "--database", f"sqlite:///{tmp_path / 'users.db'}"],
        input="pw\n", text=True, check=True, capture_output=True,
    )  # fmt: skip
    process = serve(tmp_path, "--workers", workers, "--admin-listen", "127.0.0.1:0", "--audit-log", "off")
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline().rsplit(":", 1)[1])
        url = process.stdout.readline().removeprefix("admin on ").strip()
        assert get(url + "/readyz") == (200, "ready\n")
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", port, timeout=30)
        ftp.login("carol", "pw")
        data = ftp.transfercmd("STOR a.bin")
        data.sendall(b"x" * 1000)
        process.send_signal(signal.SIGTERM)
        # As soon as the signal is handled, while the upload still runs.
        assert "draining" in ready_until(url, 503, "readyz to turn 503")
        assert get(url + "/healthz")[0] == 200
        if workers == "1":
            assert value(scrape(url), "ftp_gateway_draining") == 1
        data.sendall(b"y" * 1000)
        data.close()
        assert ftp.getresp().startswith("226")
        with pytest.raises(ftplib.error_temp, match="^421"):
            ftp.getresp()
        ftp.close()
        assert process.wait(timeout=60) == 0
        assert (tmp_path / "data" / "carol" / "a.bin").read_bytes() == b"x" * 1000 + b"y" * 1000
    finally:
        stop(process)
