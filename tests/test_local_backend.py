"""The local-disk backend against aioftp's path-io contract, called directly as aioftp's handlers call it."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aioftp
import pytest

from pathio_backends import BackendResources, path_io_factory
from pathio_backends.base import RESERVED_PREFIX
from pathio_backends.local import LocalPathIO
from tests.clients import ftp_login
from tests.helpers import GatewayThread


@pytest.fixture
async def pio(tmp_path: Path) -> AsyncIterator[LocalPathIO]:
    root = tmp_path / "root"
    storage = path_io_factory(f"file://{root}", BackendResources())
    await storage.prepare(create=True)
    path_io = storage(timeout=2)
    assert isinstance(path_io, LocalPathIO)
    yield path_io


def reason(excinfo: pytest.ExceptionInfo[aioftp.PathIOError]) -> BaseException:
    assert excinfo.value.reason is not None
    inner = excinfo.value.reason[1]
    assert inner is not None
    return inner


async def test_error_contract_matches_aioftp_pathio(pio: LocalPathIO) -> None:
    base = pio._jail.base  # noqa: SLF001 - the root as aioftp sees it
    await pio.mkdir(base / "d")
    with pytest.raises(aioftp.PathIOError) as excinfo:
        await pio.mkdir(base / "d")
    assert isinstance(reason(excinfo), FileExistsError)
    with pytest.raises(aioftp.PathIOError) as excinfo:
        await pio.mkdir(base / "missing" / "d")
    assert isinstance(reason(excinfo), FileNotFoundError)
    await pio.mkdir(base / "a" / "b", parents=True)

    async with pio.open(base / "d" / "f.txt", mode="wb") as f:
        await f.write(b"abc")
    with pytest.raises(aioftp.PathIOError) as excinfo:
        await pio.rmdir(base / "d")
    assert isinstance(reason(excinfo), OSError) and reason(excinfo).errno == errno.ENOTEMPTY  # type: ignore[attr-defined]
    with pytest.raises(aioftp.PathIOError) as excinfo:
        await pio.rmdir(base / "d" / "f.txt")
    assert isinstance(reason(excinfo), NotADirectoryError)
    with pytest.raises(aioftp.PathIOError) as excinfo:
        await pio.unlink(base / "d")
    assert isinstance(reason(excinfo), IsADirectoryError)
    with pytest.raises(aioftp.PathIOError) as excinfo:
        await pio.unlink(base / "nothing")
    assert isinstance(reason(excinfo), FileNotFoundError)
    with pytest.raises(aioftp.PathIOError) as excinfo:
        await pio.stat(base / "nothing")
    assert isinstance(reason(excinfo), FileNotFoundError)
    with pytest.raises(aioftp.PathIOError) as excinfo:
        async with pio.open(base / "d", mode="rb") as f:
            await f.read(10)
    assert isinstance(reason(excinfo), IsADirectoryError)

    assert await pio.exists(base / "d") and await pio.is_dir(base / "d") and not await pio.is_file(base / "d")
    assert await pio.is_file(base / "d" / "f.txt")
    assert (await pio.stat(base / "d" / "f.txt")).st_size == 3
    assert await pio.rename(base / "d" / "f.txt", base / "g.txt") == base / "g.txt"
    assert sorted(p.name for p in await pio.list(base)) == ["a", "d", "g.txt"]  # type: ignore[attr-defined]
    await pio.unlink(base / "g.txt")
    await pio.rmdir(base / "d")


async def test_upload_is_invisible_until_committed_and_gone_when_not(pio: LocalPathIO) -> None:
    base = pio._jail.base  # noqa: SLF001
    real = Path(pio._jail.root)  # noqa: SLF001
    async with pio.open(base / "f.bin", mode="wb") as f:
        await f.write(b"old")
    with pytest.raises(RuntimeError):
        async with pio.open(base / "f.bin", mode="wb") as f:
            await f.write(b"new but interrupted")
            assert (real / "f.bin").read_bytes() == b"old"
            assert [p.name for p in real.iterdir() if p.name.startswith(RESERVED_PREFIX)] != []
            raise RuntimeError("the client went away")
    assert (real / "f.bin").read_bytes() == b"old"
    assert [p.name for p in real.iterdir()] == ["f.bin"]
    # aioftp's "boring" style without a context: close() without commit is an abort.
    file = await pio.open(base / "f.bin", mode="wb")
    await file.write(b"never committed")
    await file.close()
    assert (real / "f.bin").read_bytes() == b"old"
    async with pio.open(base / "f.bin", mode="ab") as f:
        await f.write(b"+more")
    async with pio.open(base / "f.bin", mode="r+b") as f:
        await f.seek(2)
        await f.write(b"D")
    assert (real / "f.bin").read_bytes() == b"olD"
    assert [p.name for p in real.iterdir()] == ["f.bin"]


async def test_listing_hides_upload_names_and_refuses_them(pio: LocalPathIO) -> None:
    base = pio._jail.base  # noqa: SLF001
    real = Path(pio._jail.root)  # noqa: SLF001
    (real / (RESERVED_PREFIX + "0123")).write_bytes(b"in progress")
    (real / ".hidden").write_bytes(b"dotfiles are listed")
    assert [p.name for p in await pio.list(base)] == [".hidden"]  # type: ignore[attr-defined]
    assert not await pio.exists(base / (RESERVED_PREFIX + "0123"))
    with pytest.raises(aioftp.PathIOError) as excinfo:
        async with pio.open(base / (RESERVED_PREFIX + "x"), mode="wb") as f:
            await f.write(b"x")
    assert reason(excinfo).errno == errno.EINVAL  # type: ignore[attr-defined]


def test_listing_removes_uploads_left_by_a_killed_gateway(local_gateway: GatewayThread) -> None:
    """A temporary upload file nobody has written to for an hour (a gateway killed with kill -9 mid-upload)
    goes when its directory is listed; one still being written stays."""
    local_gateway.add_user("alice")
    local_gateway.files.put("alice", "dir/kept.txt", b"kept")
    directory = local_gateway.root_of("alice") / "dir"
    stale, fresh = directory / (RESERVED_PREFIX + "stale"), directory / (RESERVED_PREFIX + "fresh")
    stale.write_bytes(b"half an upload")
    fresh.write_bytes(b"an upload in progress")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(stale, (two_hours_ago, two_hours_ago))
    client = ftp_login(local_gateway.host, local_gateway.port, "alice")
    assert client.list("dir") == {"kept.txt": ("file", 4)}
    client.quit()
    assert sorted(p.name for p in directory.iterdir()) == sorted([fresh.name, "kept.txt"])


async def test_path_timeout_bounds_a_stuck_operation(pio: LocalPathIO) -> None:
    base = pio._jail.base  # noqa: SLF001
    fifo = Path(pio._jail.root) / "fifo"  # noqa: SLF001
    os.mkfifo(fifo)
    pio.timeout = 0.3
    # Opening a FIFO for reading blocks until a writer comes: the call must give up, the loop stays free.
    with pytest.raises(aioftp.PathIOError) as excinfo:
        async with pio.open(base / "fifo", mode="rb") as f:
            await f.read(1)
    assert isinstance(reason(excinfo), TimeoutError)
    # Let the worker thread that still waits in open() go.
    writer = threading.Thread(target=lambda: os.close(os.open(fifo, os.O_WRONLY)))
    writer.start()
    await asyncio.to_thread(writer.join)
