"""Several replicas sharing one passive range through Redis: three ``ftp-gateway serve`` processes on 127.0.0.11,
.12 and .13 behind a round-robin balancer on 127.0.0.1 (tests/balancer.py), files in one S3 (moto)."""

from __future__ import annotations

import contextlib
import ftplib
import io
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.balancer import balancing, free_port_on
from tests.helpers import (
    S3_BUCKET,
    S3_CREDENTIALS,
    free_passive_range,
    gateway_settings,
    missing,
    random_bytes,
    running,
    sha256,
    wait_until,
)

REDIS_URL = os.environ.get("FTP_GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REPLICAS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")


@pytest.fixture
def redis_url() -> str:
    """The test Redis; each test gets its own key prefix."""
    host, port = "127.0.0.1", 6379
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        missing(f"Redis on {host}:{port}")
    return REDIS_URL


def gateway_command() -> list[str]:
    local = Path(sys.executable).with_name("ftp-gateway")
    return [str(local)] if local.exists() else [sys.executable, "-m", "gateway"]


class Replica:
    def __init__(self, host: str, port: int, env: dict[str, str], log: Path) -> None:
        self.host = host
        self.log = log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            [*gateway_command(), "serve", "--listen", f"{host}:{port}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if not line.startswith("listening on"):
            self.stop()
            raise AssertionError(f"replica {host} did not start: {line!r}\n{log.read_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        self._log_file.close()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


@contextmanager
def replicas(
    tmp_path: Path,
    redis_url: str,
    passive: tuple[int, int],
    hosts: Sequence[str] = REPLICAS,
    s3: str | None = None,
    **extra: str,
) -> Iterator[tuple[int, list[Replica]]]:
    """``hosts`` as replicas of one cluster (one port, one passive range, users in one SQLite file)."""
    database = f"sqlite:///{tmp_path / 'users.db'}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("FTP_GATEWAY_")} | {
        "FTP_GATEWAY_DATABASE__URL": database,
        "FTP_GATEWAY_PASSIVE__PORT_MIN": str(passive[0]),
        "FTP_GATEWAY_PASSIVE__PORT_MAX": str(passive[1]),
        "FTP_GATEWAY_PASSIVE__MASQUERADE_ADDRESS": "127.0.0.1",
        "FTP_GATEWAY_PROXY_PROTOCOL__TRUSTED": '["127.0.0.1/32"]',
        "FTP_GATEWAY_CLUSTER__REDIS_URL": redis_url,
        "FTP_GATEWAY_CLUSTER__KEY_PREFIX": f"test-{uuid.uuid4().hex}",
        "FTP_GATEWAY_ADMIN__LISTEN": "off",
        # Audit events would go to the stdout pipe, which is not read after the first line.
        "FTP_GATEWAY_LOG__AUDIT": "off",
        "FTP_GATEWAY_LIMITS__FAILED_LOGIN_DELAY": "0",
        "FTP_GATEWAY_TIMEOUTS__DATA_CONNECTION": "10",
        "FTP_GATEWAY_LOG__LEVEL": "info",
    }
    if s3 is not None:
        env |= {
            "FTP_GATEWAY_STORAGE__DEFAULT_URI": f"s3://{S3_BUCKET}/users/{{username}}",
            "FTP_GATEWAY_S3__ENDPOINT_URL": s3,
            "FTP_GATEWAY_S3__ACCESS_KEY_ID": S3_CREDENTIALS["access_key_id"],
            "FTP_GATEWAY_S3__SECRET_ACCESS_KEY": S3_CREDENTIALS["secret_access_key"],
            "FTP_GATEWAY_S3__REGION": S3_CREDENTIALS["region"],
        }
    else:
        env["FTP_GATEWAY_STORAGE__DEFAULT_URI"] = f"file://{tmp_path / 'data'}/{{username}}"
    env |= {f"FTP_GATEWAY_{key.upper()}": value for key, value in extra.items()}
    subprocess.run(
        [*gateway_command(), "user", "add", "alice", "--password-stdin"],
        input=b"secret\n",
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    port = free_port_on(["127.0.0.1", *hosts])
    started: list[Replica] = []
    try:
        for index, host in enumerate(hosts):
            started.append(Replica(host, port, env, tmp_path / f"replica-{index}.log"))
        yield port, started
    finally:
        codes = [replica.stop() for replica in started]
        assert codes == [0] * len(started), codes


def session(port: int, client_ip: str, transfers: int, seed: int) -> list[tuple[str, str]]:
    """Log in through the balancer from ``client_ip``, upload and download ``transfers`` files each; returns
    (sha256 sent, sha256 read back) pairs."""
    results = []
    with ftplib.FTP(timeout=30, source_address=(client_ip, 0)) as ftp:
        ftp.connect("127.0.0.1", port)
        ftp.login("alice", "secret")
        for number in range(transfers):
            data = random_bytes(20_000 + (seed * 7919 + number * 104729) % 300_000, seed=seed * 100 + number)
            name = f"s{seed}-{number}.bin"
            ftp.storbinary(f"STOR {name}", io.BytesIO(data), blocksize=65536)
            back = io.BytesIO()
            ftp.retrbinary(f"RETR {name}", back.write)
            results.append((sha256(data), sha256(back.getvalue())))
    return results


def test_three_replicas_one_passive_range(tmp_path: Path, redis_url: str, s3_endpoint: str) -> None:
    low, high = free_passive_range(30)
    with replicas(tmp_path, redis_url, (low, high), s3=s3_endpoint) as (port, started):
        with balancing("127.0.0.1", port, range(low, high + 1), REPLICAS) as balancer:
            with ThreadPoolExecutor(8) as pool:
                sessions = [pool.submit(session, port, f"127.0.1.{n + 1}", 3, n) for n in range(100)]
                failed = [(n, future.exception()) for n, future in enumerate(sessions) if future.exception()]
                if failed:
                    problems = [
                        line
                        for replica in started
                        for line in replica.log.read_text().splitlines()
                        if "WARNING" in line or "ERROR" in line
                    ]
                    raise AssertionError(
                        f"{len(failed)} sessions failed, first {failed[:3]}; replicas: {problems[:20]}"
                    )
                results = [pair for future in sessions for pair in future.result()]
            assert len(results) == 300
            assert all(sent == back for sent, back in results)
            elsewhere, total = balancer.landed_elsewhere()
        assert total == 600
        # Round robin over three replicas: about two data connections in three land away from their session.
        assert elsewhere > total / 2, (elsewhere, total)
        logs = "".join(replica.log.read_text() for replica in started)
        assert "Traceback" not in logs


def test_redis_down_serves_what_lands_on_its_own_replica(tmp_path: Path) -> None:
    closed = free_port_on(["127.0.0.1"])  # nothing listens there
    low, high = free_passive_range(10)
    hosts = REPLICAS[:2]
    no_redis = f"redis://127.0.0.1:{closed}/0"
    # No balancer here: the client talks to the replicas themselves.
    extra = {"proxy_protocol__trusted": "[]", "timeouts__data_connection": "2"}
    with replicas(tmp_path, no_redis, (low, high), hosts, **extra) as (port, started):
        for attempt in range(2):
            # Straight to the first replica, data connection included: it works.
            with ftplib.FTP(timeout=30) as ftp:
                ftp.connect(hosts[0], port)
                ftp.login("alice", "secret")
                ftp.storbinary(f"STOR own{attempt}.bin", io.BytesIO(b"x" * 100_000))
                assert ftp.size(f"own{attempt}.bin") == 100_000
                # A data connection that lands on the other replica finds no registry: closed, logged.
                ftp.sendcmd("TYPE I")
                reply = ftp.sendcmd("EPSV")
                data_port = int(reply.split("|")[3])
                landed = socket.create_connection((hosts[1], data_port), timeout=10)
                ftp.putcmd("RETR own0.bin")
                assert landed.recv(1) == b""  # the other replica closed it
                landed.close()
                with pytest.raises(ftplib.error_temp, match="425"):
                    ftp.getresp()  # the gateway's 150, then 425 when the own connection never comes
                    ftp.getresp()
        for replica in started:
            assert replica.process.poll() is None
        first, second = (replica.log.read_text() for replica in started)
        assert first.count("cluster registry unreachable") == 1
        assert "the registry is unreachable" in second


def test_a_relayed_data_connection_is_counted_and_its_port_given_back(tmp_path: Path, redis_url: str) -> None:
    """Two replicas in this process: the session on the first, its data connections made to the second."""
    import redis

    low, high = free_passive_range(5)
    prefix = f"test-{uuid.uuid4().hex}"
    common = {"passive": {"port_min": low, "port_max": high}, "cluster": {"redis_url": redis_url, "key_prefix": prefix}}
    first = gateway_settings(tmp_path, listen="127.0.0.11:0", **common)
    second = gateway_settings(tmp_path, listen="127.0.0.12:0", **common)
    data = random_bytes(3_000_000, seed=5)
    with running(first) as owner, running(second) as other:
        owner.add_user("alice")
        with ftplib.FTP(timeout=30) as ftp:
            ftp.connect("127.0.0.11", owner.port)
            ftp.login("alice", "secret")
            for command in ("STOR x.bin", "RETR x.bin"):
                port = int(ftp.sendcmd("EPSV").split("|")[3])
                with socket.create_connection(("127.0.0.12", port), timeout=30) as conn:
                    ftp.sendcmd("TYPE I")
                    if command.startswith("STOR"):
                        ftp.putcmd(command)
                        assert ftp.getresp().startswith("150")
                        conn.sendall(data)
                        conn.shutdown(socket.SHUT_WR)
                        assert conn.recv(1) == b""
                    else:
                        ftp.putcmd(command)
                        assert ftp.getresp().startswith("150")
                        back = b"".join(iter(lambda: conn.recv(1 << 16), b""))
                        assert sha256(back) == sha256(data)
                assert ftp.getresp().startswith("226")
        assert sha256((owner.root_of("alice") / "x.bin").read_bytes()) == sha256(data)

        def value(gw: Any, name: str, **labels: str) -> float:
            assert gw.server is not None
            return float(gw.server.metrics.registry.get_sample_value(name, labels) or 0)

        assert value(other, "ftp_gateway_relayed_data_connections_total", role="sent") == 2
        assert value(owner, "ftp_gateway_relayed_data_connections_total", role="received") == 2
        assert value(other, "ftp_gateway_relayed_bytes_total", role="sent") >= 2 * len(data)
        client = redis.Redis.from_url(redis_url)
        wait_until(
            lambda: value(owner, "ftp_gateway_passive_ports_in_use") == 0 and not client.keys(f"{prefix}:port:*"),
            timeout=10,
            what="the port given back, in the replica and in Redis",
        )
        client.close()


def relayed_upload(owner_port: int, relay_host: str, name: str, data: bytes) -> str:
    """Log in on 127.0.0.11, upload through a data connection made to ``relay_host``; the final reply."""
    with ftplib.FTP(timeout=30) as ftp:
        ftp.connect("127.0.0.11", owner_port)
        ftp.login("alice", "secret")
        ftp.sendcmd("TYPE I")
        port = int(ftp.sendcmd("EPSV").split("|")[3])
        with socket.create_connection((relay_host, port), timeout=30) as conn:
            ftp.putcmd(f"STOR {name}")
            reply = ftp.getresp()
            if reply.startswith("150"):
                with contextlib.suppress(OSError):
                    conn.sendall(data)
                    conn.shutdown(socket.SHUT_WR)
        try:
            return ftp.getresp() if reply.startswith("150") else reply
        except ftplib.Error as exc:
            return str(exc)


def test_redis_outage_and_recovery_without_restart(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis reached through a forwarder on 127.0.0.2 that the test stops and starts again."""
    if not redis_url.startswith("redis://127.0.0.1:6379"):
        pytest.skip("the forwarder expects the test Redis on 127.0.0.1:6379")
    low, high = free_passive_range(5)
    cluster = {"redis_url": "redis://127.0.0.2:6379/0", "key_prefix": f"test-{uuid.uuid4().hex}", "claim_ttl": 3}
    common = {"passive": {"port_min": low, "port_max": high}, "cluster": cluster, "timeouts": {"data_connection": 2}}
    data = random_bytes(500_000, seed=9)
    forwarder = balancing("127.0.0.2", 6379, range(0), ["127.0.0.1"], headers=False)
    forwarder.__enter__()
    try:
        with (
            running(gateway_settings(tmp_path, listen="127.0.0.11:0", **common)) as owner,
            running(gateway_settings(tmp_path, listen="127.0.0.12:0", **common)),
        ):
            owner.add_user("alice")
            assert relayed_upload(owner.port, "127.0.0.12", "before.bin", data).startswith("226")
            forwarder.__exit__(None, None, None)
            # Redis gone: the session's own replica still serves it; a relayed connection fails, logged.
            assert relayed_upload(owner.port, "127.0.0.11", "own.bin", data).startswith("226")
            assert relayed_upload(owner.port, "127.0.0.12", "lost.bin", data).startswith("425")
            assert "cluster registry unreachable" in caplog.text
            forwarder = balancing("127.0.0.2", 6379, range(0), ["127.0.0.1"], headers=False)
            forwarder.__enter__()
            wait_until(
                lambda: caplog.text.count("cluster registry reachable again") >= 2,
                timeout=15,
                what="both replicas to find Redis again",
            )
            assert relayed_upload(owner.port, "127.0.0.12", "after.bin", data).startswith("226")
        files = {path.name: path.read_bytes() for path in (tmp_path / "data" / "alice").iterdir()}
        assert set(files) == {"before.bin", "own.bin", "after.bin"}
        assert all(sha256(content) == sha256(data) for content in files.values())
    finally:
        forwarder.__exit__(None, None, None)


def test_serve_refuses_several_workers_in_cluster_mode(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FTP_GATEWAY_")} | {
        "FTP_GATEWAY_CLUSTER__REDIS_URL": "redis://127.0.0.1:6379/0",
        "FTP_GATEWAY_DATABASE__URL": f"sqlite:///{tmp_path / 'users.db'}",
    }
    result = subprocess.run(
        [*gateway_command(), "serve", "--listen", "127.0.0.1:0", "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--workers 2 does not go with cluster.redis_url" in result.stderr
