"""FTPS (RFC 4217): explicit (AUTH TLS) and implicit, with curl, lftp and ftplib, on both backends; what
``tls.required`` refuses; data connections that must resume the control connection's TLS session; a certificate
reloaded (SIGHUP) while a session is open."""

from __future__ import annotations

import asyncio
import ftplib
import io
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.config import DatabaseSettings
from gateway.users.db import create_engine, ensure_schema
from gateway.users.passwords import Passwords
from gateway.users.store import UserStore
from tests.balancer import free_port_on
from tests.helpers import (
    GatewayThread,
    free_passive_range,
    gateway_settings,
    missing,
    random_bytes,
    require_binary,
    running,
    sha256,
    stop_server,
    wait_until,
)

REDIS_URL = os.environ.get("FTP_GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

try:
    import trustme
except ImportError:  # pragma: no cover - the test extra has it
    trustme = None


class Certificates:
    """A throwaway CA and a server certificate for 127.0.0.1, as PEM files under ``directory``."""

    def __init__(self, directory: Path) -> None:
        if trustme is None:
            missing("trustme (pip install 'ftp-gateway[test]')")
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert_file = directory / "chain.pem"
        self.key_file = directory / "key.pem"
        self.issue()

    def issue(self) -> bytes:
        """A new certificate (and key) in place of the files' current one; returns it (DER)."""
        cert = self.ca.issue_cert("127.0.0.1", "127.0.0.11", "localhost")
        self.cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(self.key_file))
        self.key_file.chmod(0o600)  # as a key should be (a readable one gets a warning line from the CLI)
        return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())

    def settings(self, **options: Any) -> dict[str, Any]:
        return {"cert_file": str(self.cert_file), "key_file": str(self.key_file), **options}

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


class ResumingFTP(ftplib.FTP_TLS):
    """ftplib's FTPS client, with data connections that resume the control connection's TLS session (as curl's,
    lftp's and FileZilla's do; ftplib's own do not)."""

    def ntransfercmd(self, cmd: str, rest: int | str | None = None) -> tuple[socket.socket, int | None]:
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:  # type: ignore[attr-defined]
            assert isinstance(self.sock, ssl.SSLSocket)
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size


def login(
    port: int, certs: Certificates, cls: type[ftplib.FTP_TLS] = ResumingFTP, context: ssl.SSLContext | None = None
) -> ftplib.FTP_TLS:
    """A session on ``port`` logged in as alice over TLS, with PROT P."""
    ftp = cls(context=context or certs.client_context())
    ftp.connect("127.0.0.1", port, timeout=10)
    ftp.auth()
    ftp.login("alice", "secret")
    ftp.prot_p()
    return ftp


def upload_and_download(ftp: ftplib.FTP, name: str, data: bytes) -> bytes:
    ftp.storbinary(f"STOR {name}", io.BytesIO(data))
    received = io.BytesIO()
    ftp.retrbinary(f"RETR {name}", received.write)
    return received.getvalue()


def peer_certificate(ftp: ftplib.FTP) -> bytes:
    assert isinstance(ftp.sock, ssl.SSLSocket)
    der = ftp.sock.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory, certs: Certificates) -> Iterator[GatewayThread]:
    """Explicit and implicit FTPS on local disk, TLS optional, session reuse required (the default)."""
    tmp = tmp_path_factory.mktemp("tls")
    with running(gateway_settings(tmp, tls=certs.settings(implicit_listen="127.0.0.1:0"))) as gw:
        gw.add_user("alice")
        yield gw


# -- clients ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_ftplib_prot_p_upload_and_download(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, certs: Certificates
) -> None:
    endpoint = request.getfixturevalue("s3_endpoint") if backend == "s3" else None
    with running(gateway_settings(tmp_path, s3_endpoint=endpoint, tls=certs.settings())) as gw:
        gw.add_user("alice")
        data = random_bytes(1_500_000, seed=4217)
        ftp = login(gw.port, certs)
        assert sha256(upload_and_download(ftp, "big.bin", data)) == sha256(data)
        assert ftp.nlst() == ["big.bin"]
        ftp.set_pasv(False)  # active mode: the gateway connects, and is still the TLS server
        assert sha256(upload_and_download(ftp, "active.bin", data[:100_000])) == sha256(data[:100_000])
        ftp.quit()
        stored = gw.files.files("alice")
        assert sha256(stored["big.bin"]) == sha256(data)
        assert stored["active.bin"] == data[:100_000]


def curl(certs: Certificates, *args: str) -> subprocess.CompletedProcess[bytes]:
    command = [require_binary("curl"), "-sS", "--cacert", str(certs.ca_file), *args]
    return subprocess.run(command, capture_output=True, timeout=30, check=False)


def test_curl_explicit_implicit_and_control_only(
    tls_gateway: GatewayThread, certs: Certificates, tmp_path: Path
) -> None:
    data = random_bytes(1_500_000, seed=1)
    source = tmp_path / "up.bin"
    source.write_bytes(data)
    explicit = f"ftp://alice:secret@127.0.0.1:{tls_gateway.port}"
    implicit = f"ftps://alice:secret@127.0.0.1:{tls_gateway.server.implicit_port}"  # type: ignore[union-attr]
    for name, flag, url in (
        ("reqd.bin", "--ssl-reqd", explicit),
        ("control.bin", "--ftp-ssl-control", explicit),  # TLS on the control connection only: data in clear
        ("implicit.bin", "--ssl-reqd", implicit),
    ):
        result = curl(certs, flag, "-T", str(source), f"{url}/{name}")
        assert result.returncode == 0, result.stderr
        result = curl(certs, flag, f"{url}/{name}", "-o", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        assert sha256((tmp_path / name).read_bytes()) == sha256(data)
        assert sha256(tls_gateway.files.files("alice")[name]) == sha256(data)
    listing = curl(certs, f"{implicit}/")
    assert listing.returncode == 0 and b"implicit.bin" in listing.stdout


def test_lftp_ssl_force(tls_gateway: GatewayThread, certs: Certificates, tmp_path: Path) -> None:
    lftp = require_binary("lftp")
    data = random_bytes(1_200_000, seed=2)
    (tmp_path / "up.bin").write_bytes(data)
    script = (
        f"set ftp:ssl-force true; set ftp:ssl-protect-data true; set ssl:ca-file {certs.ca_file}; "
        "set net:max-retries 1; set net:timeout 10; "
        f"open -u alice,secret -p {tls_gateway.port} 127.0.0.1; "
        f"put {tmp_path / 'up.bin'} -o lftp.bin; get lftp.bin -o {tmp_path / 'down.bin'}; cls -1"
    )
    result = subprocess.run([lftp, "-c", script], capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert b"lftp.bin" in result.stdout
    assert sha256((tmp_path / "down.bin").read_bytes()) == sha256(data)
    assert sha256(tls_gateway.files.files("alice")["lftp.bin"]) == sha256(data)


# -- the protocol ----------------------------------------------------------------------------------------------


def reply(ftp: ftplib.FTP, command: str) -> str:
    try:
        return ftp.sendcmd(command)
    except ftplib.Error as exc:
        return str(exc)


def test_security_commands(tls_gateway: GatewayThread, certs: Certificates) -> None:
    ftp = ResumingFTP(context=certs.client_context())
    ftp.connect("127.0.0.1", tls_gateway.port, timeout=10)
    features = ftp.sendcmd("FEAT")
    assert " AUTH TLS" in features and " PBSZ" in features and " PROT" in features
    assert reply(ftp, "PBSZ 0").startswith("503")  # before AUTH
    assert reply(ftp, "PROT P").startswith("503")
    assert reply(ftp, "CCC").startswith("533")
    assert reply(ftp, "AUTH KERBEROS_V4").startswith("504")
    ftp.auth()
    assert reply(ftp, "AUTH TLS").startswith("503")  # twice
    assert reply(ftp, "PROT P").startswith("503")  # before PBSZ
    assert reply(ftp, "PBSZ 0") == "200 PBSZ=0"
    assert reply(ftp, "PROT S").startswith("536")
    assert reply(ftp, "PROT X").startswith("504")
    assert reply(ftp, "CCC").startswith("534")
    assert reply(ftp, "PROT C").startswith("200")
    ftp.login("alice", "secret")  # not required here: PROT C transfers are allowed
    ftp.storbinary("STOR clear.txt", io.BytesIO(b"in clear"))
    assert reply(ftp, "PROT P").startswith("200")
    ftp._prot_p = True  # type: ignore[attr-defined]  # what prot_p() records, sent by hand above
    assert upload_and_download(ftp, "private.txt", b"private") == b"private"
    ftp.quit()


def test_no_tls_configured(local_gateway: GatewayThread) -> None:
    with ftplib.FTP() as ftp:
        ftp.connect("127.0.0.1", local_gateway.port, timeout=10)
        assert "AUTH" not in ftp.sendcmd("FEAT")
        assert reply(ftp, "AUTH TLS").startswith("502")
        assert reply(ftp, "PBSZ 0").startswith("503")


VERSIONS = [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2]


def client_context(certs: Certificates, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = certs.client_context()
    context.maximum_version = version
    return context


@pytest.mark.parametrize("version", VERSIONS, ids=["TLS1.3", "TLS1.2"])
def test_data_connection_must_resume_the_session(
    tls_gateway: GatewayThread, certs: Certificates, version: ssl.TLSVersion
) -> None:
    """ftplib's own FTP_TLS does not resume the session on its data connections: refused (522), and the session
    goes on; the same client with resumption is served."""
    plain_tls = login(tls_gateway.port, certs, ftplib.FTP_TLS, context=client_context(certs, version))
    with pytest.raises(ftplib.error_perm, match="^522 .*resume"):
        plain_tls.retrlines("LIST")
    with pytest.raises(ftplib.error_perm, match="^522 "):
        plain_tls.storbinary("STOR refused.bin", io.BytesIO(b"x" * 1000))
    assert "refused.bin" not in tls_gateway.files.files("alice")
    assert reply(plain_tls, "NOOP").startswith("200")
    plain_tls.quit()
    resuming = login(tls_gateway.port, certs, context=client_context(certs, version))
    assert isinstance(resuming.sock, ssl.SSLSocket) and resuming.sock.version() == version.name.replace("_", ".")
    assert upload_and_download(resuming, "resumed.bin", b"y" * 5000) == b"y" * 5000
    resuming.quit()


@pytest.mark.parametrize("version", VERSIONS, ids=["TLS1.3", "TLS1.2"])
def test_data_connection_resuming_another_sessions_tls_is_refused(
    tls_gateway: GatewayThread, certs: Certificates, version: ssl.TLSVersion
) -> None:
    """Someone with a session of their own (behind the same address: the passive port takes only the client's IP)
    resumes it on another session's data connection: refused, it is not that control connection's session."""
    context = client_context(certs, version)  # one client context: Python resumes a session only within its own
    owner = login(tls_gateway.port, certs, context=context)
    intruder = login(tls_gateway.port, certs, context=context)

    class Borrowing(ResumingFTP):
        def ntransfercmd(self, cmd: str, rest: int | str | None = None) -> tuple[socket.socket, int | None]:
            conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
            assert isinstance(intruder.sock, ssl.SSLSocket)
            return self.context.wrap_socket(conn, server_hostname=self.host, session=intruder.sock.session), size

    owner.__class__ = Borrowing
    with pytest.raises(ftplib.error_perm, match="^522 "):
        owner.retrlines("LIST")
    owner.__class__ = ResumingFTP
    assert owner.nlst() is not None  # its own session still works
    for ftp in (owner, intruder):
        ftp.quit()


@pytest.fixture(scope="module")
def required_gateway(tmp_path_factory: pytest.TempPathFactory, certs: Certificates) -> Iterator[GatewayThread]:
    """TLS required, session reuse off."""
    tmp = tmp_path_factory.mktemp("required")
    with running(gateway_settings(tmp, tls=certs.settings(required=True, session_reuse=False))) as gw:
        gw.add_user("alice")
        yield gw


def test_required_refuses_plain_logins_and_clear_transfers(
    required_gateway: GatewayThread, certs: Certificates
) -> None:
    with ftplib.FTP() as ftp:
        ftp.connect("127.0.0.1", required_gateway.port, timeout=10)
        assert reply(ftp, "USER alice").startswith("530")
        assert reply(ftp, "PASS secret").startswith("530")
    ftp_tls = ftplib.FTP_TLS(context=certs.client_context())  # no resumption: allowed, reuse is off here
    ftp_tls.connect("127.0.0.1", required_gateway.port, timeout=10)
    ftp_tls.login("alice", "secret")  # AUTH TLS first (ftplib does it in login)
    for command in ("STOR clear.bin", "RETR clear.bin", "LIST"):
        ftp_tls.sendcmd("PASV")
        assert reply(ftp_tls, command).startswith("521")
    ftp_tls.prot_p()
    assert upload_and_download(ftp_tls, "private.bin", b"z" * 70_000) == b"z" * 70_000
    ftp_tls.quit()


# -- certificate reload ----------------------------------------------------------------------------------------


def test_reload_new_sessions_get_the_new_certificate(tmp_path: Path) -> None:
    certs = Certificates(tmp_path / "certs")
    with running(gateway_settings(tmp_path, tls=certs.settings())) as gw:
        gw.add_user("alice")
        old = login(gw.port, certs)
        first = peer_certificate(old)
        second = certs.issue()
        assert second != first

        async def reload() -> None:
            assert gw.server is not None
            gw.server.reload_tls()

        gw.call(reload)
        new = login(gw.port, certs)
        assert peer_certificate(new) == second
        # The open session goes on, its data connections resuming its session in the old context.
        assert upload_and_download(old, "old.bin", b"o" * 50_000) == b"o" * 50_000
        assert upload_and_download(new, "new.bin", b"n" * 50_000) == b"n" * 50_000
        certs.key_file.write_text("not a key")
        gw.call(reload)  # fails, logged: the second certificate stays
        again = login(gw.port, certs)
        assert peer_certificate(again) == second
        for ftp in (old, new, again):
            ftp.quit()


def test_a_renewed_certificate_in_a_mounted_secret_is_picked_up(tmp_path: Path) -> None:
    """As Kubernetes updates a mounted Secret (cert-manager renewing it): the files are symlinks through ``..data``,
    which is swapped to a new directory at once. ``tls.reload_interval`` notices it without a signal."""
    certs = Certificates(tmp_path / "issued")
    mount = tmp_path / "mount"
    mount.mkdir()

    def publish(version: str) -> None:
        (mount / version).mkdir()
        (mount / version / "tls.crt").write_bytes(certs.cert_file.read_bytes())
        (mount / version / "tls.key").write_bytes(certs.key_file.read_bytes())
        (mount / "..data_tmp").symlink_to(version)
        os.replace(mount / "..data_tmp", mount / "..data")

    publish("..v1")
    for name in ("tls.crt", "tls.key"):
        (mount / name).symlink_to(f"..data/{name}")
    tls = {"cert_file": str(mount / "tls.crt"), "key_file": str(mount / "tls.key"), "reload_interval": 0.1}
    with running(gateway_settings(tmp_path, tls=tls)) as gw:
        gw.add_user("alice")
        first = certificate_of(gw.port, certs)
        open_session = login(gw.port, certs)
        second = certs.issue()
        assert second != first
        publish("..v2")
        wait_for_certificate(gw.port, certs, second)
        assert upload_and_download(open_session, "a.bin", b"a" * 10_000) == b"a" * 10_000
        open_session.quit()


def test_sighup_reloads_serve(tmp_path: Path) -> None:
    """``serve`` with two workers: its start-up lines name both listeners; SIGHUP, passed on to each worker,
    reloads the certificate for new sessions while an open one goes on."""
    certs = Certificates(tmp_path / "certs")
    env = {**os.environ, "FTP_GATEWAY_LIMITS__FAILED_LOGIN_DELAY": "0"}
    env.pop("FTP_GATEWAY_CONFIG", None)
    database = f"sqlite:///{tmp_path / 'users.db'}"
    asyncio.run(add_user(database, "alice", "secret"))  # in this process: a CLI run costs seconds here
    low, high = free_passive_range(10)
    implicit_port = free_port_on(["127.0.0.1"])
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("ftp-gateway")), "serve", "--listen", "127.0.0.1:0",
         "--admin-listen", "off", "--workers", "2", "--database", database, "--passive-ports", f"{low}-{high}",
         "--storage", f"file://{tmp_path}/data/{{username}}", "--tls-cert", str(certs.cert_file),
         "--tls-key", str(certs.key_file), "--tls-required", "--implicit-tls-listen", f"127.0.0.1:{implicit_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline(), process.stdout.readline()]
        assert lines[0].startswith("listening on ftp://127.0.0.1:"), "".join(lines) + process.stderr.read()  # type: ignore[union-attr]
        assert lines[1] == f"listening on ftps://127.0.0.1:{implicit_port}\n"
        port = int(lines[0].rsplit(":", 1)[1])
        old = login(port, certs)
        first = peer_certificate(old)
        second = certs.issue()
        process.send_signal(signal.SIGHUP)
        wait_for_certificate(port, certs, second)
        assert first != second
        for _ in range(6):  # new connections, spread over both workers by the kernel: each has reloaded
            assert certificate_of(port, certs) == second
        assert upload_and_download(old, "old.bin", b"o" * 10_000) == b"o" * 10_000
        # The implicit listener: TLS from the first byte, with the new certificate too.
        context = certs.client_context()
        with (
            socket.create_connection(("127.0.0.1", implicit_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.getpeercert(binary_form=True) == second
            assert tls.recv(100).startswith(b"220 ")
        old.quit()
    finally:
        stop_server(process)
        _, stderr = process.communicate()
    assert process.returncode == 0
    assert "Traceback" not in stderr
    assert stderr.count("TLS certificate reloaded") == 2


async def add_user(url: str, name: str, password: str) -> None:
    engine = create_engine(DatabaseSettings(url=url))
    try:
        await ensure_schema(engine)
        await UserStore(engine).add(name, Passwords().hash_now(password))
    finally:
        await engine.dispose()


def certificate_of(port: int, certs: Certificates) -> bytes:
    """The certificate a new session on ``port`` gets after AUTH TLS."""
    ftp = ftplib.FTP_TLS(context=certs.client_context())
    ftp.connect("127.0.0.1", port, timeout=10)
    try:
        ftp.auth()
        return peer_certificate(ftp)
    finally:
        ftp.close()


def wait_for_certificate(port: int, certs: Certificates, expected: bytes) -> None:
    """A new session gets ``expected`` (the signal is handled asynchronously)."""
    wait_until(lambda: certificate_of(port, certs) == expected, timeout=10, what="the reloaded certificate")


# -- configuration errors --------------------------------------------------------------------------------------


def serve_error(capsys: pytest.CaptureFixture[str], tmp_path: Path, *flags: str) -> str:
    code = cli.main(["serve", "--database", f"sqlite:///{tmp_path / 'u.db'}", "--admin-listen", "off", *flags])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_certificate_problems_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, certs: Certificates
) -> None:
    other = Certificates(tmp_path / "other")
    cert, key = str(certs.cert_file), str(certs.key_file)
    assert "not found" in serve_error(capsys, tmp_path, "--tls-cert", str(tmp_path / "none.pem"), "--tls-key", key)
    assert "is not the key of" in serve_error(capsys, tmp_path, "--tls-cert", cert, "--tls-key", str(other.key_file))
    assert "required = true needs a certificate" in serve_error(capsys, tmp_path, "--tls-required")
    assert "implicit_listen needs a certificate" in serve_error(
        capsys, tmp_path, "--implicit-tls-listen", "127.0.0.1:0"
    )
    assert "give both or neither" in serve_error(capsys, tmp_path, "--tls-cert", cert)


def test_check_loads_the_certificate(tmp_path: Path, certs: Certificates) -> None:
    from gateway.check import run_checks

    lines: list[str] = []
    good = gateway_settings(tmp_path, tls=certs.settings())
    assert asyncio.run(run_checks(good, None, lines.append))
    assert lines[1] == f"ok   tls       {certs.cert_file}: certificate and key {certs.key_file} load"
    other = Certificates(tmp_path / "other")
    bad = gateway_settings(tmp_path, tls={"cert_file": str(certs.cert_file), "key_file": str(other.key_file)})
    lines.clear()
    assert not asyncio.run(run_checks(bad, None, lines.append))
    assert lines[1].startswith("FAIL tls ") and "is not the key of" in lines[1]


# -- ftp-gateway dev --tls -------------------------------------------------------------------------------------


def test_dev_tls_prints_a_curl_line_that_works(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("ftp-gateway")), "dev", "--tls", "--listen", "127.0.0.1:0",
         "--admin-listen", "off", "--data-dir", str(tmp_path / "dev")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("listening on ftp://"):
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else ""
            lines.append(line.strip())
        try_line = next(line for line in lines if line.startswith("try: curl "))
        assert "--ssl-reqd -k" in try_line
        (tmp_path / "somefile").write_text("over TLS")
        result = subprocess.run(
            [require_binary("curl"), "-sS", *try_line.removeprefix("try: curl ").split()],
            cwd=tmp_path, capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        url = try_line.split()[-1]
        fetched = subprocess.run(
            [require_binary("curl"), "-sS", "--ssl-reqd", "-k", f"{url}somefile"],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        assert fetched.stdout == b"over TLS", fetched.stderr
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)


# -- several replicas --------------------------------------------------------------------------------------------


def test_relayed_data_connection_keeps_its_tls_end_to_end(tmp_path: Path, certs: Certificates) -> None:
    """The session on one replica, its data connections made to another, which splices them (TLS bytes as they
    are) to the owner: the TLS ends there and resumes the control connection's session."""
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    except OSError:
        missing("Redis on 127.0.0.1:6379")
    low, high = free_passive_range(5)
    common = {
        "passive": {"port_min": low, "port_max": high},
        "cluster": {"redis_url": REDIS_URL, "key_prefix": f"test-{uuid.uuid4().hex}"},
        "tls": certs.settings(),
    }
    data = random_bytes(1_000_000, seed=12)

    class Relayed(ResumingFTP):
        def makepasv(self) -> tuple[str, int]:
            _, port = super().makepasv()
            return "127.0.0.12", port

    with (
        running(gateway_settings(tmp_path, listen="127.0.0.11:0", **common)) as owner,
        running(gateway_settings(tmp_path, listen="127.0.0.12:0", **common)) as other,
    ):
        owner.add_user("alice")
        ftp = Relayed(context=certs.client_context())
        ftp.connect("127.0.0.11", owner.port, timeout=10)
        ftp.auth()
        ftp.login("alice", "secret")
        ftp.prot_p()
        assert sha256(upload_and_download(ftp, "relayed.bin", data)) == sha256(data)
        ftp.quit()
        assert sha256((owner.root_of("alice") / "relayed.bin").read_bytes()) == sha256(data)
        assert other.server is not None
        sent = other.server.metrics.registry.get_sample_value(
            "ftp_gateway_relayed_data_connections_total", {"role": "sent"}
        )
        assert sent == 2


def test_a_users_own_tls_setting(tmp_path: Path, certs: Certificates) -> None:
    """``required`` on a server where TLS is optional; ``optional`` on one where it is required."""
    with running(gateway_settings(tmp_path, tls=certs.settings(session_reuse=False))) as gw:
        gw.add_user("strict", tls="required")
        gw.add_user("relaxed")
        with ftplib.FTP() as ftp:
            ftp.connect("127.0.0.1", gw.port, timeout=10)
            assert reply(ftp, "USER strict").startswith("331")  # nothing told before the password
            assert reply(ftp, "PASS wrong").startswith("530")
            assert reply(ftp, "USER strict").startswith("331")
            assert reply(ftp, "PASS secret") == "530 TLS required: send AUTH TLS first."
            ftp.login("relaxed", "secret")
            ftp.storbinary("STOR plain.txt", io.BytesIO(b"plain"))
        ftp_tls = ftplib.FTP_TLS(context=certs.client_context())
        ftp_tls.connect("127.0.0.1", gw.port, timeout=10)
        ftp_tls.login("strict", "secret")
        ftp_tls.sendcmd("PASV")
        assert reply(ftp_tls, "STOR clear.bin").startswith("521")
        ftp_tls.quit()
    with running(gateway_settings(tmp_path / "2", tls=certs.settings(required=True))) as gw:
        gw.add_user("relaxed", tls="optional")
        ftp_tls = ftplib.FTP_TLS(context=certs.client_context())
        ftp_tls.connect("127.0.0.1", gw.port, timeout=10)
        ftp_tls.login("relaxed", "secret")  # over TLS: USER before AUTH gets 530 for every name
        ftp_tls.storbinary("STOR clear.txt", io.BytesIO(b"clear"))  # PROT C allowed for this user
        ftp_tls.quit()
        assert gw.files.files("relaxed")["clear.txt"] == b"clear"


def test_commands_sent_in_clear_after_auth_are_dropped(tls_gateway: GatewayThread, certs: Certificates) -> None:
    """A USER pipelined in clear behind AUTH TLS (what a man in the middle would add: CVE-2011-0411) is never run
    as if it came under TLS."""
    with socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=10) as raw:
        replies = raw.makefile("rb")
        assert replies.readline().startswith(b"220")
        raw.sendall(b"AUTH TLS\r\nUSER alice\r\n")
        assert replies.readline().startswith(b"234")
        with certs.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"PASS secret\r\n")
            assert tls.recv(200).startswith(b"503 ")  # no USER was taken: "Send USER first"


def test_a_client_gone_before_auths_reply_frees_its_session(tmp_path: Path, certs: Certificates) -> None:
    """AUTH TLS queued behind a slow command (a wrong password's delay) whose client resets the connection: the 234
    cannot be written, and the session must end rather than wait for it forever (it held its connection slot)."""
    settings = gateway_settings(tmp_path, tls=certs.settings(), limits={"failed_login_delay": 0.5})
    with running(settings) as gw:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
                assert sock.recv(1024).startswith(b"220")
                sock.sendall(b"USER alice\r\nPASS wrong\r\nAUTH TLS\r\n")
                time.sleep(0.2)  # read by the server (a reset would drop unread lines), AUTH waiting behind PASS
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST

        def open_sessions() -> int:
            assert gw.server is not None
            return len(gw.server.sessions)

        wait_until(lambda: open_sessions() == 0, timeout=5, what="the reset sessions to end")


def test_implicit_handshakes_count_against_max_connections(tmp_path: Path, certs: Certificates) -> None:
    """Connections to the implicit listener that never finish their TLS handshake hold no more than
    limits.max_connections: the next one is closed at once, without a handshake; once they go, clients are served."""
    settings = gateway_settings(
        tmp_path, tls=certs.settings(implicit_listen="127.0.0.1:0"), limits={"max_connections": 2}
    )
    with running(settings) as gw:
        assert gw.server is not None and gw.server.implicit_port
        port = gw.server.implicit_port
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        wait_until(lambda: gw.server is not None and gw.server.handshakes == 2, timeout=5, what="two handshakes")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as third:
            assert third.recv(100) == b""  # closed at once, not after the handshake's time
        for sock in stalled:
            sock.close()
        wait_until(lambda: gw.server is not None and gw.server.handshakes == 0, timeout=5, what="the handshakes to end")
        gw.add_user("alice")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with certs.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.recv(100).startswith(b"220")
