"""Both backends keep aioftp's path-io contract: used as aioftp's own ``PathIO`` is used (called directly, and as the
``path_io_factory`` of a plain ``aioftp.Server`` with users rooted at absolute paths), they answer as it does. The
deliberate deviations (``pathio_backends/base.py``'s docstring) are checked as such."""

from __future__ import annotations

import asyncio
import ftplib
import io
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aioftp
import pytest

from pathio_backends import BackendResources, path_io_factory
from pathio_backends.base import TransactionalPathIO
from pathio_backends.s3.settings import S3Settings
from tests.helpers import S3_BUCKET, S3_CREDENTIALS, MiB, random_bytes, sha256

Observation = tuple[str, Any]


def s3_resources(endpoint: str) -> BackendResources:
    return BackendResources(s3=S3Settings(endpoint_url=endpoint, addressing_style="path", **S3_CREDENTIALS))


@pytest.fixture(params=["local", "s3"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Any, Path]]:
    """A storage factory of the backend and a directory inside it (what a user's ``base_path`` would be)."""
    if request.param == "local":
        (tmp_path / "root").mkdir()
        resources = BackendResources()
        storage = path_io_factory(f"file://{tmp_path / 'root'}", resources)
    else:
        resources = s3_resources(request.getfixturevalue("s3_endpoint"))
        storage = path_io_factory(f"s3://{S3_BUCKET}/contract", resources)
    await storage.prepare(create=False)
    try:
        yield storage, storage.base_path / "alice"
    finally:
        await resources.aclose()


async def observe(pio: aioftp.AbstractPathIO[Path], base: Path) -> dict[str, Observation]:
    """What a caller of aioftp's path-io sees, step by step: results, or the exception inside ``PathIOError``."""
    seen: dict[str, Observation] = {}

    async def note(name: str, action: Callable[[], Awaitable[Any]]) -> None:
        try:
            seen[name] = ("ok", await action())
        except aioftp.PathIOError as exc:
            assert exc.reason is not None
            seen[name] = ("error", type(exc.reason[1]).__name__)

    async def opens(path: Path, mode: str) -> str:
        file = await pio.open(path, mode=mode)  # type: ignore[arg-type]
        await file.close()
        return "opened"

    async def names(path: Path) -> list[str]:
        return sorted(p.name for p in await pio.list(path))  # type: ignore[attr-defined]

    async def kind(path: Path) -> tuple[bool, bool, bool]:
        return await pio.exists(path), await pio.is_dir(path), await pio.is_file(path)

    await pio.mkdir(base, parents=True, exist_ok=True)
    await pio.mkdir(base / "d")
    file = base / "d" / "f.txt"
    async with pio.open(file, mode="wb") as out:
        await out.write(b"hello")

    await note("open a missing file", lambda: opens(base / "missing", "rb"))
    await note("open a directory", lambda: opens(base / "d", "rb"))
    await note("open in a missing directory", lambda: opens(base / "nope" / "x", "wb"))
    await note("open a directory to write", lambda: opens(base / "d", "wb"))
    await note("open a missing file r+b", lambda: opens(base / "missing", "r+b"))
    await note("list", lambda: names(base))
    await note("list a missing path", lambda: names(base / "missing"))
    await note("list a file", lambda: names(file))
    await note("kinds", lambda: asyncio.gather(kind(base / "d"), kind(file), kind(base / "missing")))
    await note("size", lambda: pio.stat(file))
    seen["size"] = (seen["size"][0], seen["size"][1].st_size)
    await note("stat a missing path", lambda: pio.stat(base / "missing"))

    reader = await pio.open(file, mode="rb")
    await note("seek with the context instead of its file", lambda: pio.seek(reader, 2))  # type: ignore[arg-type]
    await note("seek", lambda: pio.seek(reader.file, 2))
    await note("read after seek", lambda: reader.read(10))
    await note("seek back", lambda: reader.seek(1))
    await note("read again", lambda: reader.read(10))
    await reader.close()

    async with pio.open(file, mode="ab") as out:
        await out.write(b" world")
    async with pio.open(file, mode="rb") as source:
        seen["appended"] = ("ok", await source.read())

    await note("mkdir an existing directory", lambda: pio.mkdir(base / "d"))
    await note("mkdir, exist_ok", lambda: pio.mkdir(base / "d", exist_ok=True))
    await note("mkdir in a missing directory", lambda: pio.mkdir(base / "x" / "y"))
    await note("mkdir with parents", lambda: pio.mkdir(base / "x" / "y", parents=True))
    await note("rmdir a directory not empty", lambda: pio.rmdir(base / "d"))
    await note("rmdir a file", lambda: pio.rmdir(file))
    await note("unlink a directory", lambda: pio.unlink(base / "d"))
    await note("unlink a missing file", lambda: pio.unlink(base / "missing"))
    await note("rename a missing path", lambda: pio.rename(base / "missing", base / "other"))
    await note("rename", lambda: pio.rename(file, base / "g.txt"))
    seen["rename"] = (seen["rename"][0], seen["rename"][1].relative_to(base))
    await note("after the rename", lambda: asyncio.gather(names(base), names(base / "d")))
    await note("unlink", lambda: pio.unlink(base / "g.txt"))
    await note("rmdir", lambda: pio.rmdir(base / "d"))
    await note("at the end", lambda: names(base))
    return seen


async def test_backends_answer_as_aioftps_pathio(backend: tuple[Any, Path], tmp_path: Path) -> None:
    storage, base = backend
    expected = await observe(aioftp.PathIO(), tmp_path / "reference")
    seen = await observe(storage(timeout=10), base)
    assert seen == expected
    # The seen answers are the ones a reader of aioftp's docs expects, not some shared mistake.
    assert expected["open a missing file"] == ("error", "FileNotFoundError")
    assert expected["list a file"] == ("ok", [])
    assert expected["seek with the context instead of its file"] == ("error", "ValueError")
    assert expected["read again"] == ("ok", b"ello")
    assert expected["appended"] == ("ok", b"hello world")


async def test_deliberate_deviations(backend: tuple[Any, Path]) -> None:
    storage, base = backend
    pio: TransactionalPathIO = storage(timeout=10)
    await pio.mkdir(base, parents=True, exist_ok=True)
    file = base / "f.txt"
    async with pio.open(file, mode="wb") as out:
        await out.write(b"0123456789")

    # REST + STOR: the first bytes are kept, the old tail goes (aioftp's PathIO would give b"0123AB6789").
    async with pio.open(file, mode="r+b") as out:
        await out.seek(4)
        await out.write(b"AB")
    async with pio.open(file, mode="rb") as source:
        assert await source.read() == b"0123AB"

    # close() alone discards an upload (aioftp's __aexit__ calls close() whatever happened) ...
    boring = await pio.open(file, mode="wb")
    await boring.write(b"never published")
    await boring.close()
    # ... and a block that ends with an exception too.
    with pytest.raises(RuntimeError):
        async with pio.open(file, mode="wb") as out:
            await out.write(b"interrupted")
            raise RuntimeError("the client went away")
    async with pio.open(file, mode="rb") as source:
        assert await source.read() == b"0123AB"
    # commit() publishes in the "boring" style.
    boring = await pio.open(file, mode="wb")
    await boring.write(b"published")
    await pio.commit(boring.file)  # type: ignore[arg-type]
    await boring.close()
    async with pio.open(file, mode="rb") as source:
        assert await source.read() == b"published"

    # A file being written seeks only before its first write.
    writer = await pio.open(file, mode="wb")
    await writer.write(b"x")
    with pytest.raises(aioftp.PathIOError):
        await writer.seek(0)
    await writer.close()


# -- a plain aioftp.Server on the backends ---------------------------------------------------------------------


def ftp_session(port: int, data: bytes) -> dict[str, Any]:
    """The commands aioftp's own server implements, through ftplib; ABOR in the middle of a RETR."""
    seen: dict[str, Any] = {}
    with ftplib.FTP() as ftp:
        ftp.connect("127.0.0.1", port, timeout=20)
        ftp.login("alice", "pw")
        ftp.voidcmd("TYPE I")
        ftp.storbinary("STOR big.bin", io.BytesIO(data))
        ftp.mkd("sub")
        ftp.storbinary("STOR sub/small.txt", io.BytesIO(b"small"))
        received = io.BytesIO()
        ftp.retrbinary("RETR big.bin", received.write)
        seen["retr"] = sha256(received.getvalue())
        for command in ("LIST sub/small.txt", "MLSD sub/small.txt", "LIST missing"):
            lines: list[str] = []
            try:
                seen[command] = (ftp.retrlines(command, lines.append)[:3], lines)
            except ftplib.Error as exc:
                seen[command] = str(exc)[:3]
        lines = []
        ftp.retrlines("LIST sub", lines.append)
        seen["LIST sub"] = [line.split()[-1] for line in lines]
        connection = ftp.transfercmd("RETR big.bin")
        connection.recv(64 * 1024)
        ftp.putcmd("ABOR")
        seen["ABOR"] = [ftp.getline()[:3], ftp.getline()[:3]]
        connection.close()
        seen["after ABOR"] = ftp.sendcmd("PWD")[:3]
        ftp.delete("sub/small.txt")
        ftp.rmd("sub")
        lines = []
        ftp.retrlines("LIST", lines.append)
        seen["LIST at the end"] = sorted(line.split()[-1] for line in lines)
    return seen


async def serve_plain(factory: Any, base: Path, data: bytes) -> dict[str, Any]:
    server = aioftp.Server([aioftp.User("alice", "pw", base_path=base)], path_io_factory=factory)
    await server.start("127.0.0.1", 0)
    try:
        return await asyncio.to_thread(ftp_session, server.server_port, data)
    finally:
        await server.close()


async def test_a_plain_aioftp_server_on_the_backends(backend: tuple[Any, Path], tmp_path: Path) -> None:
    storage, base = backend
    await storage(timeout=10).mkdir(base, parents=True, exist_ok=True)
    (tmp_path / "reference").mkdir()
    data = random_bytes(16 * MiB, seed=8)
    expected = await serve_plain(aioftp.PathIO, tmp_path / "reference", data)
    seen = await serve_plain(storage, base, data)
    assert seen == expected
    assert expected["retr"] == sha256(data)
    assert expected["LIST sub/small.txt"][0] == "226"
    assert expected["ABOR"] == ["426", "226"]
    assert expected["LIST at the end"] == ["big.bin"]
    # Nothing partial was left by the aborted download, nor by the uploads.
    listed = await storage(timeout=10).list(base)
    assert [(path.name, stat.S_ISREG((await storage(timeout=10).stat(path)).st_mode)) for path in listed] == [
        ("big.bin", True)
    ]
