"""S3 downloads read ahead in ranges (``pathio_backends/s3/download.py``): exact bytes at every boundary, REST,
ABOR and S3 failures in the middle, and what a small object costs. Ranges of 64 KiB (the smallest allowed),
four in flight, so that a few MiB cross many boundaries."""

from __future__ import annotations

import asyncio
import errno
import ftplib
import io
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.clients import FtplibClient, assert_refused, ftp_login
from tests.helpers import GatewayThread, MiB, gateway_settings, random_bytes, running, sha256, wait_until

RANGE = 64 * 1024
WINDOW = 4
SPAN = RANGE * WINDOW  # what is in flight at once

CONFIGS = {
    # The default path for S3: blocks gathered on the event loop, sent from a pump thread.
    "ranged-pump": {"s3": {"download_range_size": RANGE, "download_ranges_in_flight": WINDOW}},
    # The event-loop path (speed limits, ASCII), with blocks much smaller than what aiohttp hands over.
    "ranged-small-blocks": {
        "s3": {"download_range_size": RANGE, "download_ranges_in_flight": WINDOW},
        "transfer": {"pump_threads": 0, "block_size": 4096},
    },
    # One range in flight: one GetObject streamed, as before read-ahead.
    "single-stream": {"s3": {"download_range_size": RANGE, "download_ranges_in_flight": 1}},
}


@contextmanager
def s3_download_gateway(tmp_path: Path, endpoint: str, config: str, **s3: Any) -> Iterator[GatewayThread]:
    """A gateway of one of the :data:`CONFIGS` (``s3`` settings added) with the user alice."""
    overrides = {key: dict(value) for key, value in CONFIGS[config].items()}
    overrides["s3"].update(s3)
    with running(gateway_settings(tmp_path, s3_endpoint=endpoint, **overrides)) as gw:
        gw.add_user("alice")
        yield gw


@pytest.fixture(params=list(CONFIGS))
def any_gateway(request: pytest.FixtureRequest, tmp_path: Path, s3_endpoint: str) -> Iterator[GatewayThread]:
    with s3_download_gateway(tmp_path, s3_endpoint, request.param) as gw:
        yield gw


@pytest.fixture
def gateway(tmp_path: Path, s3_endpoint: str) -> Iterator[GatewayThread]:
    with s3_download_gateway(tmp_path, s3_endpoint, "ranged-pump") as gw:
        yield gw


@pytest.fixture
def alice(any_gateway: GatewayThread) -> Iterator[FtplibClient]:
    client = ftp_login(any_gateway.host, any_gateway.port, "alice")
    yield client
    client.quit()


def retr(client: FtplibClient, name: str, rest: int | None = None) -> bytes:
    buffer = io.BytesIO()
    client.ftp.retrbinary(f"RETR {name}", buffer.write, rest=rest)
    return buffer.getvalue()


SIZES = [
    0, 1, RANGE - 1, RANGE, RANGE + 1, 2 * RANGE + 5,
    SPAN - 1, SPAN, SPAN + 1, SPAN + RANGE, 2 * SPAN + 1, 3 * MiB + 123,
]  # fmt: skip


def test_retr_is_byte_exact_around_range_and_window_boundaries(any_gateway: GatewayThread, alice: FtplibClient) -> None:
    for index, size in enumerate(SIZES):
        data = random_bytes(size, seed=index)
        any_gateway.files.put("alice", f"f{size}.bin", data)
        received = retr(alice, f"f{size}.bin")
        assert (len(received), sha256(received)) == (size, sha256(data)), size


def test_rest_at_odd_offsets_and_on_boundaries(any_gateway: GatewayThread, alice: FtplibClient) -> None:
    size = 2 * SPAN + RANGE // 3
    data = random_bytes(size, seed=5)
    any_gateway.files.put("alice", "doc.bin", data)
    offsets = [
        1, 4095, RANGE - 1, RANGE, RANGE + 1, RANGE + 12345, 2 * RANGE,
        SPAN - 1, SPAN, SPAN + 7, size - RANGE, size - 1, size,
    ]  # fmt: skip
    for offset in offsets:
        received = retr(alice, "doc.bin", rest=offset)
        assert (len(received), sha256(received)) == (size - offset, sha256(data[offset:])), offset
    assert_refused("554", lambda: retr(alice, "doc.bin", rest=size + 1))
    assert alice.ftp.sendcmd("NOOP").startswith("200")


def object_requests(caplog: pytest.LogCaptureFixture, name: str) -> dict[str, int]:
    """The requests moto logged for the object ``name`` (its werkzeug access log), by method."""
    counts: dict[str, int] = {}
    for record in caplog.records:
        line = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # werkzeug colours the failed ones
        if record.name == "werkzeug" and (match := re.search(rf'"(\w+) /\S*/{re.escape(name)}[ ?]', line)):
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


@pytest.mark.parametrize(
    ("size", "gets"),
    [(0, 1), (1, 1), (RANGE - 1, 1), (RANGE, 1), (RANGE + 1, 2), (SPAN, WINDOW), (SPAN + 1, WINDOW + 1)],
)
def test_an_object_costs_one_get_object_per_range_and_no_extra_head(
    gateway: GatewayThread, caplog: pytest.LogCaptureFixture, size: int, gets: int
) -> None:
    data = random_bytes(size, seed=size)
    gateway.files.put("alice", "obj.bin", data)
    client = ftp_login(gateway.host, gateway.port, "alice")
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        caplog.clear()
        assert retr(client, "obj.bin") == data
        counts = object_requests(caplog, "obj.bin")
    client.quit()
    # The HEAD is RETR's stat of its path (asked once, with a one-key listing); the GETs are the download.
    assert counts == {"HEAD": 1, "GET": gets}


class SlowBody:
    """An HTTP body handed to the gateway that arrives slowly (small reads, a pause before each), and records
    whether it was closed."""

    def __init__(self, body: Any, bodies: list[SlowBody]) -> None:
        self.body = body
        self.closed = False
        bodies.append(self)

    async def read(self, amount: int | None = None) -> bytes:
        await asyncio.sleep(0.02)
        data: bytes = await self.body.read(min(amount or 16384, 16384))
        return data

    def close(self) -> None:
        self.closed = True
        self.body.close()


def slow_get_object(monkeypatch: pytest.MonkeyPatch) -> list[SlowBody]:
    """Every GetObject body of the gateway becomes a :class:`SlowBody`; returns the list they are recorded in."""
    from pathio_backends.s3.client import S3Context

    real_call = S3Context.call
    bodies: list[SlowBody] = []

    async def call(self: S3Context, operation: str, **kwargs: Any) -> dict[str, Any]:
        response = await real_call(self, operation, **kwargs)
        if operation == "get_object":
            response["Body"] = SlowBody(response["Body"], bodies)
        return response

    monkeypatch.setattr(S3Context, "call", call)
    return bodies


def range_tasks(gateway: GatewayThread) -> list[str]:
    async def names() -> list[str]:
        return [task.get_name() for task in asyncio.all_tasks() if task.get_name().startswith("S3 range")]

    return gateway.call(names)


def test_abor_mid_download_cancels_the_ranges_in_flight_and_closes_their_bodies(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool of four connections: a body left open by an ABOR would hold one, and the downloads after the
    aborted ones would wait for it."""
    bodies = slow_get_object(monkeypatch)
    with s3_download_gateway(tmp_path, s3_endpoint, "ranged-pump", max_pool_connections=WINDOW) as gateway:
        aborted_downloads(gateway, bodies, monkeypatch)


def aborted_downloads(gateway: GatewayThread, bodies: list[SlowBody], monkeypatch: pytest.MonkeyPatch) -> None:
    data = random_bytes(4 * MiB, seed=3)
    gateway.files.put("alice", "big.bin", data)
    client = ftp_login(gateway.host, gateway.port, "alice")
    for _ in range(3):
        connection = client.ftp.transfercmd("RETR big.bin")
        connection.recv(65536)
        assert range_tasks(gateway), "ranges are in flight when the client aborts"
        client.ftp.putcmd("ABOR")
        assert [client.ftp.getline()[:3], client.ftp.getline()[:3]] == ["426", "226"]
        connection.close()
        assert range_tasks(gateway) == []
        assert bodies and all(body.closed for body in bodies)
        assert client.ftp.sendcmd("NOOP").startswith("200")
    monkeypatch.undo()
    assert retr(client, "big.bin", rest=RANGE + 1) == data[RANGE + 1 :]
    client.quit()
    wait_until(lambda: range_tasks(gateway) == [], timeout=5, what="the range tasks to end")


def test_a_client_gone_mid_download_leaves_no_range_behind(
    gateway: GatewayThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    bodies = slow_get_object(monkeypatch)
    gateway.files.put("alice", "big.bin", random_bytes(4 * MiB, seed=4))
    client = ftp_login(gateway.host, gateway.port, "alice")
    connection = client.ftp.transfercmd("RETR big.bin")
    connection.recv(65536)
    assert range_tasks(gateway)
    client.ftp.close()  # the control connection goes; the data connection stays open, unread
    wait_until(lambda: range_tasks(gateway) == [], timeout=10, what="the range tasks to end")
    assert all(body.closed for body in bodies)
    gateway.wait_for_sessions("alice", 0)
    connection.close()


@pytest.mark.parametrize("change", ["replaced", "deleted", "broken body"])
def test_s3_failure_mid_download_is_451_and_the_session_goes_on(
    gateway: GatewayThread, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """The object changes (or a body breaks) at the request of a range 1.5 MiB in: the client receives a part
    of the bytes before it (what was sent by then: blocks of 1 MiB), then 451; never a byte of the new version."""
    from pathio_backends.s3.client import S3Context

    real_call = S3Context.call
    failing = 24 * RANGE
    failing_range = f"bytes={failing}-"
    new = b"the new version"

    class BrokenBody:
        def __init__(self, body: Any) -> None:
            self.body = body

        async def read(self, amount: int | None = None) -> bytes:
            from botocore.exceptions import ResponseStreamingError

            raise ResponseStreamingError(error=ConnectionResetError(errno.ECONNRESET, "reset"))

        def close(self) -> None:
            self.body.close()

    async def call(self: S3Context, operation: str, **kwargs: Any) -> dict[str, Any]:
        if operation == "get_object" and str(kwargs.get("Range", "")).startswith(failing_range):
            if change == "replaced":
                await real_call(self, "put_object", Key=kwargs["Key"], Body=new)
            elif change == "deleted":
                await real_call(self, "delete_object", Key=kwargs["Key"])
            else:
                response = await real_call(self, operation, **kwargs)
                response["Body"] = BrokenBody(response["Body"])
                return response
        return await real_call(self, operation, **kwargs)

    monkeypatch.setattr(S3Context, "call", call)
    data = random_bytes(32 * RANGE, seed=6)
    gateway.files.put("alice", "doc.bin", data)
    client = ftp_login(gateway.host, gateway.port, "alice")
    received = io.BytesIO()
    with pytest.raises(ftplib.error_temp) as excinfo:
        client.ftp.retrbinary("RETR doc.bin", received.write)
    assert str(excinfo.value).startswith("451"), excinfo.value
    sent = received.getvalue()
    assert MiB <= len(sent) <= failing and sent == data[: len(sent)], len(sent)
    assert client.ftp.sendcmd("NOOP").startswith("200")
    assert range_tasks(gateway) == []
    monkeypatch.undo()
    if change == "replaced":
        assert retr(client, "doc.bin") == new
    elif change == "broken body":
        assert retr(client, "doc.bin") == data
    client.quit()


def test_download_settings_are_bounded() -> None:
    from pydantic import ValidationError

    from pathio_backends.s3.settings import S3Settings

    assert (S3Settings().download_range_size, S3Settings().download_ranges_in_flight) == (8 * MiB, 4)
    for wrong in ({"download_range_size": RANGE - 1}, {"download_ranges_in_flight": 0}):
        with pytest.raises(ValidationError):
            S3Settings(**wrong)  # type: ignore[arg-type]


def test_a_store_that_ignores_ranges_gets_a_stream_or_an_error_never_other_bytes(
    gateway: GatewayThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP lets a server answer a range with the whole object (200): from 0 that is the file, streamed;
    from a REST offset it is not, and the transfer fails instead of sending the wrong bytes."""
    from pathio_backends.s3.client import S3Context

    real_call = S3Context.call

    async def call(self: S3Context, operation: str, **kwargs: Any) -> dict[str, Any]:
        if operation == "get_object":
            kwargs.pop("Range", None)
        return await real_call(self, operation, **kwargs)

    monkeypatch.setattr(S3Context, "call", call)
    data = random_bytes(3 * SPAN, seed=9)
    gateway.files.put("alice", "doc.bin", data)
    client = ftp_login(gateway.host, gateway.port, "alice")
    assert sha256(retr(client, "doc.bin")) == sha256(data)
    assert_refused("451", lambda: retr(client, "doc.bin", rest=RANGE + 1))
    assert client.ftp.sendcmd("NOOP").startswith("200")
    assert range_tasks(gateway) == []
    client.quit()
