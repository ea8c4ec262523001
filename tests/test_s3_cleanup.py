"""``ftp-gateway s3 cleanup`` against a real moto server, behind a proxy that sets each upload's Initiated.

moto 5.2 reports the same fixed Initiated (2010-11-10T20:48:33Z) for every multipart upload, so the proxy
rewrites ``<Initiated>`` in ListMultipartUploads answers to the times the test chose per key: without it every
upload would look 16 years old and the cut-off could not be told apart from "abort everything".
"""

from __future__ import annotations

import asyncio
import io
import itertools
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from gateway.cli import main
from gateway.s3_cleanup import cleanup
from pathio_backends.s3.settings import S3Settings
from pathio_backends.uri import S3Location
from tests.helpers import S3_BUCKET, S3_CREDENTIALS, moto_client

UPLOAD = re.compile(rb"<Upload>.*?</Upload>", re.DOTALL)
KEY = re.compile(rb"<Key>(.*?)</Key>")
INITIATED = re.compile(rb"<Initiated>.*?</Initiated>")
DROPPED_HEADERS = {"host", "content-length", "transfer-encoding", "content-encoding", "connection"}


class InitiatedProxy:
    """A thin HTTP proxy to moto in its own thread: ``initiated[key]`` becomes that upload's Initiated."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.initiated: dict[str, datetime] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED_HEADERS}
        async with (
            ClientSession(auto_decompress=False) as session,
            session.request(
                request.method, self.upstream + request.path_qs, headers=headers, data=await request.read()
            ) as upstream,
        ):
            body = await upstream.read()
            if request.method == "GET" and "uploads" in request.query:
                body = UPLOAD.sub(self._rewrite, body)
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in DROPPED_HEADERS}
            return web.Response(status=upstream.status, body=body, headers=out_headers)

    def _rewrite(self, match: re.Match[bytes]) -> bytes:
        block = match[0]
        key = KEY.search(block)
        when = self.initiated.get(key[1].decode()) if key else None
        if when is None:
            return block
        stamp = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z").encode()
        return INITIATED.sub(b"<Initiated>" + stamp + b"</Initiated>", block)

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return runner

    def __enter__(self) -> InitiatedProxy:
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[InitiatedProxy]:
    with InitiatedProxy(s3_endpoint) as running:
        yield running


@pytest.fixture
def moto(s3_endpoint: str) -> Any:
    client = moto_client(s3_endpoint)
    yield client
    client.close()


def config_for(tmp_path: Path, endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("FTP_GATEWAY_CONFIG", raising=False)
    path = tmp_path / "gateway.toml"
    s3 = "".join(f'{k} = "{v}"\n' for k, v in S3_CREDENTIALS.items())
    path.write_text(f'[s3]\nendpoint_url = "{endpoint}"\nmax_attempts = 1\n{s3}')
    path.chmod(0o600)  # it holds the S3 secret: readable by others, every command would warn about it first
    return str(path)


@pytest.fixture
def config(tmp_path: Path, proxy: InitiatedProxy, monkeypatch: pytest.MonkeyPatch) -> str:
    """A config file whose S3 is the proxy in front of the test's moto."""
    return config_for(tmp_path, proxy.url, monkeypatch)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def pending(moto: Any) -> set[str]:
    return {u["Key"] for u in moto.list_multipart_uploads(Bucket=S3_BUCKET).get("Uploads", [])}


@pytest.fixture
def uploads(moto: Any, proxy: InitiatedProxy) -> dict[str, str]:
    """Two old and one young upload under ``inbox/``, and an old one outside it: key -> upload id."""
    now = datetime.now(UTC)
    ages = {
        "inbox/a.bin": timedelta(days=2),
        "inbox/sub/b.bin": timedelta(days=2),
        "inbox/young.bin": timedelta(hours=1),
        "outside/old.bin": timedelta(days=2),
    }
    ids = {}
    for key, age in ages.items():
        ids[key] = moto.create_multipart_upload(Bucket=S3_BUCKET, Key=key)["UploadId"]
        moto.upload_part(Bucket=S3_BUCKET, Key=key, UploadId=ids[key], PartNumber=1, Body=b"part")
        proxy.initiated[key] = now - age
    return ids


def test_cleanup_aborts_only_old_uploads_under_the_prefix(
    capsys: pytest.CaptureFixture[str], config: str, moto: Any, uploads: dict[str, str]
) -> None:
    code, out, err = run(capsys, "s3", "cleanup", f"s3://{S3_BUCKET}/inbox", "--older-than", "24h", "--config", config)
    assert code == 0, err
    assert pending(moto) == {"inbox/young.bin", "outside/old.bin"}
    assert out.strip().splitlines()[-1] == ("multipart uploads: found 3, older than the cut-off 2, aborted 2, failed 0")
    assert "Traceback" not in err


def test_dry_run_lists_the_old_uploads_and_aborts_nothing(
    capsys: pytest.CaptureFixture[str], config: str, moto: Any, uploads: dict[str, str]
) -> None:
    before = pending(moto)
    code, out, err = run(capsys, "s3", "cleanup", f"s3://{S3_BUCKET}/inbox", "--dry-run", "--config", config)
    assert code == 0, err
    assert pending(moto) == before
    listed = {line.split()[2]: line.split()[3] for line in out.splitlines() if line.startswith("would abort ")}
    assert listed == {key: uploads[key] for key in ("inbox/a.bin", "inbox/sub/b.bin")}
    assert "would abort 2" in out.splitlines()[-1]


def test_zero_cutoff_takes_every_upload_under_the_prefix(
    capsys: pytest.CaptureFixture[str], config: str, moto: Any, uploads: dict[str, str]
) -> None:
    code, _, err = run(capsys, "s3", "cleanup", f"s3://{S3_BUCKET}/inbox/", "--older-than", "0", "--config", config)
    assert code == 0, err
    assert pending(moto) == {"outside/old.bin"}


def test_moto_reports_a_fixed_initiated(moto: Any) -> None:
    """What the README says of moto: without the proxy, every upload claims 2010-11-10T20:48:33Z."""
    moto.create_multipart_upload(Bucket=S3_BUCKET, Key="x")
    initiated = {u["Initiated"] for u in moto.list_multipart_uploads(Bucket=S3_BUCKET)["Uploads"]}
    assert initiated == {datetime(2010, 11, 10, 20, 48, 33, tzinfo=UTC)}


def test_missing_bucket_is_one_line_exit_1(capsys: pytest.CaptureFixture[str], config: str) -> None:
    code, out, err = run(capsys, "s3", "cleanup", "s3://no-such-bucket/x", "--config", config)
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "NoSuchBucket" in err


def test_unreachable_endpoint_is_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_for(tmp_path, "http://127.0.0.1:9", monkeypatch)
    code, _, err = run(capsys, "s3", "cleanup", f"s3://{S3_BUCKET}", "--config", config)
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "unreachable" in err


@pytest.mark.parametrize("argv", [["--older-than", "yesterday"], ["--older-than=-1h"]])
def test_bad_older_than_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, _, err = run(capsys, "s3", "cleanup", f"s3://{S3_BUCKET}", *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "not a duration" in err


def test_not_an_s3_uri_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "s3", "cleanup", "file:///tmp")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_progress_lines_go_to_stderr(s3_endpoint: str, moto: Any, uploads: dict[str, str]) -> None:
    """A clock that moves a second per reading: a progress line after each upload, none on stdout."""
    ticks = itertools.count()
    out, err = io.StringIO(), io.StringIO()
    settings = S3Settings(endpoint_url=s3_endpoint, **S3_CREDENTIALS)  # type: ignore[arg-type]
    location = S3Location(S3_BUCKET, "inbox/")
    tally = asyncio.run(cleanup(settings, location, timedelta(0), False, out, err, clock=lambda: float(next(ticks))))
    assert (tally.found, tally.aborted, tally.failed) == (3, 3, 0)
    assert err.getvalue().splitlines()[-1].startswith("... multipart uploads: found 3")
    assert out.getvalue().splitlines() == ["multipart uploads: found 3, older than the cut-off 3, aborted 3, failed 0"]
