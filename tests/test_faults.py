"""Faults that lose nothing (issue 13 item 5): S3 killed, slow, resetting or answering 503/500 for a while, and the
user database's connections killed during logins and transfers. Every session gets a reply (451, 426, 421 or
530, never a silent close), an upload cut short leaves no object and no pending multipart upload, and the same
gateway serves again as soon as the dependency is back, without a restart.

The faults injected are counted and printed at the end of the run (``faults injected`` in the summary)."""

from __future__ import annotations

import asyncio
import ftplib
import io
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

from pathio_backends.s3.client import AbortJanitor, outcome_of
from pathio_backends.s3.errors import translate
from tests.clients import FtplibClient, ftp_login
from tests.fault_tools import MotoProcess, S3FaultProxy
from tests.helpers import (
    S3_BUCKET,
    GatewayThread,
    MiB,
    create_test_bucket,
    gateway_settings,
    moto_client,
    random_bytes,
    reset_moto,
    running,
    sha256,
    wait_until,
)

# Replies a transfer or command cut short by a fault may get: storage unavailable or timed out (451), the data
# connection closed (426), the session ended with a reason (421).
FAULT_REPLIES = ("451", "426", "421")
PREFIX = "users/alice/"


def pending(s3: Any) -> list[str]:
    """Multipart uploads under alice's prefix, asked straight from S3 (not through the proxy)."""
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=PREFIX).get("Uploads", [])]


def objects(s3: Any) -> dict[str, int]:
    listed = s3.list_objects_v2(Bucket=S3_BUCKET, Prefix=PREFIX).get("Contents", [])
    return {item["Key"].removeprefix(PREFIX): item["Size"] for item in listed}


def outcome(action: Callable[[], object]) -> str:
    """The reply that ended ``action`` (an ftplib call): its success reply, the error reply, or ``"silent: ..."``
    when the server closed the connection without one."""
    try:
        result = action()
    except ftplib.Error as exc:
        return str(exc)
    except (EOFError, ConnectionError) as exc:
        return f"silent: {exc!r}"
    return str(result)


def store(client: FtplibClient, name: str, data: bytes, when: int = 0, fault: Callable[[], None] | None = None) -> str:
    """STOR ``data``; ``fault()`` runs once ``when`` bytes have been sent. The reply that ended it: a data
    connection that breaks under the client (the server gave up) is followed by the server's reply."""
    ftp = client.ftp
    sent = 0

    def progress(block: bytes) -> None:
        nonlocal sent
        sent += len(block)
        if fault is not None and sent >= when > sent - len(block):
            fault()

    try:
        return ftp.storbinary(f"STOR {name}", io.BytesIO(data), 256 * 1024, progress)
    except ftplib.Error as exc:
        return str(exc)
    except (EOFError, ConnectionError) as exc:
        return f"silent: {exc!r}"
    except OSError:
        return outcome(ftp.getresp)


def retrieve(client: FtplibClient, name: str) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    reply = outcome(lambda: client.ftp.retrbinary(f"RETR {name}", buffer.write))
    return reply, buffer.getvalue()


def assert_fault_reply(reply: str, what: str) -> None:
    assert reply[:3] in FAULT_REPLIES, f"{what}: {reply}"


def assert_serves(gateway: GatewayThread, s3: Any, name: str, data: bytes) -> None:
    """A new session uploads and downloads ``data`` (what was stored checked in S3 itself)."""
    client = ftp_login(gateway.host, gateway.port, "alice")
    client.stor(name, data)
    assert sha256(client.retr(name)) == sha256(data)
    client.quit()
    assert objects(s3)[name] == len(data)


@pytest.mark.parametrize(
    "error",
    [
        ReadTimeoutError(endpoint_url="http://s3"),
        ConnectionClosedError(endpoint_url="http://s3"),
        EndpointConnectionError(endpoint_url="http://s3"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_s3_failures_without_an_answer_are_counted_and_translated(error: Exception) -> None:
    """botocore's timeouts and closed connections carry ``response = None``: the metrics label read it as a dict,
    and the AttributeError replaced the OSError (a 451 with a traceback; the abort janitor died of it)."""
    assert outcome_of(error) == "error"
    assert isinstance(translate(error, "UploadPart", "k"), OSError)


# -- S3 killed and started again ------------------------------------------------------------------------------


def test_s3_killed_during_an_upload_then_back(tmp_path: Path, fault_counts: Counter[str]) -> None:
    moto = MotoProcess().start()
    try:
        create_test_bucket(moto.endpoint)
        s3 = moto_client(moto.endpoint)
        settings = gateway_settings(
            tmp_path,
            s3_endpoint=moto.endpoint,
            s3={"part_size": 5 * MiB, "max_attempts": 2, "connect_timeout": 1, "read_timeout": 2},
        )
        with running(settings) as gateway:
            gateway.add_user("alice")
            client = ftp_login(gateway.host, gateway.port, "alice")
            client.stor("kept.bin", b"before the outage")

            def kill() -> None:
                wait_until(lambda: pending(s3), timeout=20, what="the multipart upload to begin")
                moto.kill()
                fault_counts["S3 process killed"] += 1

            reply = store(client, "big.bin", random_bytes(12 * MiB), when=10 * MiB, fault=kill)
            assert_fault_reply(reply, "STOR while S3 is down")
            assert_fault_reply(retrieve(client, "kept.bin")[0], "RETR while S3 is down")
            assert outcome(lambda: client.ftp.sendcmd("NOOP")).startswith("200")

            moto.start()
            create_test_bucket(moto.endpoint)  # moto forgot everything: the bucket comes back empty
            assert pending(s3) == [] and objects(s3) == {}
            assert outcome(lambda: client.ftp.sendcmd("NOOP")).startswith("200")
            data = random_bytes(6 * MiB, seed=1)
            assert store(client, "big.bin", data).startswith("226")
            assert sha256(retrieve(client, "big.bin")[1]) == sha256(data)
            client.quit()
            assert_serves(gateway, s3, "after.bin", b"S3 is back")
            assert pending(s3) == []
        s3.close()
    finally:
        moto.kill()


# -- S3 slow, resetting, answering 503 or 500 (a proxy in front of the run's moto) -------------------------------


@pytest.fixture
def proxy(s3_endpoint: str, fault_counts: Counter[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[S3FaultProxy]:
    # An abort S3 did not take is retried with backoff (0.5 s, doubling up to 30 s): up to 1 s here, so the
    # retry after the fault comes soon.
    monkeypatch.setattr(AbortJanitor, "MAX_DELAY", 1.0)
    proxy = S3FaultProxy(s3_endpoint).start()
    try:
        yield proxy
    finally:
        proxy.close()
        fault_counts.update(proxy.counts)


@pytest.fixture
def direct_s3(s3_endpoint: str) -> Iterator[Any]:
    s3 = moto_client(s3_endpoint)
    yield s3
    s3.close()


def proxied_gateway(tmp_path: Path, proxy: S3FaultProxy, max_attempts: int = 1) -> GatewayThread:
    settings = gateway_settings(
        tmp_path,
        s3_endpoint=proxy.endpoint,
        s3={"part_size": 5 * MiB, "connect_timeout": 0.3, "read_timeout": 0.3, "max_attempts": max_attempts},
    )
    gateway = GatewayThread(settings).start()
    gateway.add_user("alice")
    return gateway


def fault_during_upload(
    client: FtplibClient, s3: Any, proxy: S3FaultProxy, mode: Any, **options: Any
) -> tuple[str, str, str]:
    """A multipart upload that meets the fault once its first part went out; then, under the fault, a download of
    a small file and a listing. Their replies."""

    def fault() -> None:
        wait_until(lambda: pending(s3), timeout=20, what="the multipart upload to begin")
        proxy.set(mode, **options)

    upload = store(client, "big.bin", random_bytes(12 * MiB), when=10 * MiB, fault=fault)
    download, _ = retrieve(client, "small.bin")
    listing = outcome(lambda: client.ftp.retrlines("LIST", lambda line: None))
    return upload, download, listing


@pytest.mark.parametrize(("mode", "options"), [("reset", {}), ("delay", {"delay": 1.0})])
def test_s3_resetting_or_slow_ends_transfers_with_replies(
    tmp_path: Path, proxy: S3FaultProxy, direct_s3: Any, mode: str, options: dict[str, Any]
) -> None:
    gateway = proxied_gateway(tmp_path, proxy)
    try:
        direct_s3.put_object(Bucket=S3_BUCKET, Key=PREFIX + "small.bin", Body=b"small")
        client = ftp_login(gateway.host, gateway.port, "alice")
        upload, download, listing = fault_during_upload(client, direct_s3, proxy, mode, **options)
        assert_fault_reply(upload, f"STOR under {mode}")
        assert_fault_reply(download, f"RETR under {mode}")
        assert_fault_reply(listing, f"LIST under {mode}")
        assert outcome(lambda: client.ftp.sendcmd("NOOP")).startswith("200")
        proxy.set("pass")
        # The abort S3 did not take during the fault is retried until it does.
        wait_until(lambda: not pending(direct_s3), timeout=20, what="the interrupted upload to be aborted")
        assert objects(direct_s3) == {"small.bin": 5}
        assert retrieve(client, "small.bin") == ("226 Transfer complete.", b"small")
        client.quit()
        assert_serves(gateway, direct_s3, "big.bin", random_bytes(6 * MiB, seed=2))
        assert pending(direct_s3) == []
    finally:
        gateway.stop()


def test_s3_answering_503_is_retried_then_answered_451(tmp_path: Path, proxy: S3FaultProxy, direct_s3: Any) -> None:
    gateway = proxied_gateway(tmp_path, proxy, max_attempts=2)
    try:
        client = ftp_login(gateway.host, gateway.port, "alice")
        # s3.max_attempts = 2 is two attempts in all: one 503 (or 500) is absorbed by the retry, two in a row are not.
        proxy.set("503", count=1)
        assert store(client, "small.bin", b"small").startswith("226")
        assert proxy.answered("503") == 1
        proxy.set("503", count=2)
        assert store(client, "other.bin", b"other").startswith("451")
        assert proxy.answered("503") == 3
        proxy.set("500", count=1)
        assert retrieve(client, "small.bin") == ("226 Transfer complete.", b"small")
        # RETR asks about the path twice at once (HeadObject, ListObjectsV2): enough 500s for both to fail twice.
        proxy.set("500", count=4)
        assert retrieve(client, "small.bin")[0].startswith("451")
        assert proxy.answered("500") >= 3  # the first to fail twice ends the other's retry
        proxy.set("pass")
        # S3 busy for longer than the retries: replies, nothing partial.
        upload, download, listing = fault_during_upload(client, direct_s3, proxy, "503", count=10_000)
        for reply, what in ((upload, "STOR"), (download, "RETR"), (listing, "LIST")):
            assert reply.startswith("451"), f"{what} while S3 answers 503: {reply}"
        assert outcome(lambda: client.ftp.sendcmd("NOOP")).startswith("200")
        proxy.set("pass")
        wait_until(lambda: not pending(direct_s3), timeout=20, what="the interrupted upload to be aborted")
        assert objects(direct_s3) == {"small.bin": 5}
        client.quit()
        assert_serves(gateway, direct_s3, "big.bin", random_bytes(6 * MiB, seed=3))
    finally:
        gateway.stop()


# -- the user database's connections killed ---------------------------------------------------------------------


class BackendKiller:
    """Terminates every other connection to one PostgreSQL database, every ``interval`` seconds, from a thread of
    its own, until stopped; ``killed`` counts the connections it ended."""

    def __init__(self, url: str, interval: float) -> None:
        self.dsn = url.replace("postgresql+asyncpg://", "postgresql://")
        self.interval = interval
        self.killed = 0
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        import asyncpg

        connection = await asyncpg.connect(self.dsn, timeout=5)
        try:
            while True:
                self.killed += await connection.fetchval(
                    "SELECT count(*) FROM ("
                    " SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()) AS ended"
                )
                self.rounds += 1
                if self._stop.is_set():
                    break
                await asyncio.sleep(self.interval)
        finally:
            await connection.close()

    def once(self) -> int:
        """One round, from the caller's thread: the connections it ended."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._stop.set()  # one round, then stop
        self._thread.start()
        self._thread.join(10)
        return self.killed

    def __enter__(self) -> BackendKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def login_outcome(gateway: GatewayThread) -> str:
    client = FtplibClient(gateway.host, gateway.port)
    try:
        client.ftp.connect(gateway.host, gateway.port)
        reply = outcome(lambda: client.ftp.login("alice", "secret"))
        if reply.startswith("230"):
            client.ftp.quit()
        return reply
    finally:
        client.ftp.close()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_database_connections_killed_during_logins_and_a_transfer(
    tmp_path: Path, database_url: str, s3_endpoint: str, fault_counts: Counter[str]
) -> None:
    s3 = moto_client(s3_endpoint)
    settings = gateway_settings(tmp_path, database_url, s3_endpoint=s3_endpoint, database={"timeout": 2})
    with running(settings) as gateway:
        gateway.add_user("alice")
        assert login_outcome(gateway).startswith("230")  # the password cache now spares argon2id: logins are fast
        client = ftp_login(gateway.host, gateway.port, "alice")
        data = random_bytes(8 * MiB, seed=4)
        with BackendKiller(database_url, interval=0.02) as killer, ThreadPoolExecutor(8) as pool:
            # The upload's SHA-256 goes to the database as it completes; its listing reads the database too.
            upload = pool.submit(store, client, "during.bin", data)
            replies = list(pool.map(lambda _: login_outcome(gateway), range(60)))
            upload_reply = upload.result(60)
            listing = outcome(lambda: client.ftp.retrlines("LIST", lambda line: None))
        fault_counts["PostgreSQL connection killed"] += killer.killed
        print(f"database: {killer.killed} connections killed; logins: {Counter(replies)}; upload: {upload_reply}")
        assert killer.killed > 0
        silent = [reply for reply in replies if reply.startswith("silent")]
        assert not silent, silent
        assert all(reply[:3] in ("230", "421", "530") for reply in replies), Counter(replies)
        assert upload_reply.startswith("226") or upload_reply[:3] in FAULT_REPLIES, upload_reply
        assert listing.startswith("226") or listing[:3] in FAULT_REPLIES, listing
        # The pool recovers at once: every login after the kills succeeds, eight at a time too.
        assert [login_outcome(gateway)[:3] for _ in range(3)] == ["230"] * 3
        with ThreadPoolExecutor(8) as pool:
            assert [reply[:3] for reply in pool.map(lambda _: login_outcome(gateway), range(8))] == ["230"] * 8
            # As after a restart of PostgreSQL: every connection of the pool, idle now, is gone at once. The pool
            # finds them dead as it hands them out (pool_pre_ping) and connects anew: no login notices.
            idle_killed = BackendKiller(database_url, interval=0).once()
            assert idle_killed > 0
            assert [reply[:3] for reply in pool.map(lambda _: login_outcome(gateway), range(8))] == ["230"] * 8
        fault_counts["PostgreSQL connection killed"] += idle_killed
        if upload_reply.startswith("226"):
            assert sha256(client.retr("during.bin")) == sha256(data)
        client.quit()
        assert [u["Key"] for u in s3.list_multipart_uploads(Bucket=S3_BUCKET).get("Uploads", [])] == []
    s3.close()
    reset_moto(s3_endpoint)
