"""Read-only users, per-path permissions, and no way out of the user's root."""

from __future__ import annotations

import ftplib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients import FtplibClient, assert_refused, ftp_login
from tests.helpers import GatewayThread


def login(gateway: GatewayThread, name: str) -> FtplibClient:
    return ftp_login(gateway.host, gateway.port, name)


def reply_code(excinfo: pytest.ExceptionInfo[ftplib.Error]) -> str:
    return str(excinfo.value)[:3]


@pytest.fixture
def reader(backend_gateway: GatewayThread) -> Iterator[FtplibClient]:
    backend_gateway.add_user("reader", read_only=True)
    backend_gateway.files.put("reader", "docs/report.txt", b"quarterly numbers\n")
    client = login(backend_gateway, "reader")
    yield client
    client.quit()


def test_read_only_user_reads_but_changes_nothing(reader: FtplibClient, backend_gateway: GatewayThread) -> None:
    assert reader.retr("docs/report.txt") == b"quarterly numbers\n"
    assert reader.list("docs") == {"report.txt": ("file", 18)}
    assert_refused(
        "550",
        lambda: reader.stor("docs/new.txt", b"x"),
        lambda: reader.stor("docs/report.txt", b"overwrite"),
        lambda: reader.dele("docs/report.txt"),
        lambda: reader.mkd("newdir"),
        lambda: reader.rmd("docs"),
        lambda: reader.rename("docs/report.txt", "docs/moved.txt"),
        lambda: reader.ftp.sendcmd("APPE docs/report.txt"),
    )
    assert backend_gateway.files.files("reader") == {"docs/report.txt": b"quarterly numbers\n"}


def test_rnto_into_read_only_path_is_refused(backend_gateway: GatewayThread) -> None:
    gateway = backend_gateway
    gateway.add_user("mixed", read_only=True, permissions={"/incoming": (True, True)})
    gateway.files.makedirs("mixed", "incoming")
    client = login(gateway, "mixed")
    client.stor("incoming/scan.pdf", b"%PDF")
    assert client.ftp.sendcmd("RNFR incoming/scan.pdf").startswith("350")
    with pytest.raises(ftplib.error_perm) as excinfo:
        client.ftp.sendcmd("RNTO /scan.pdf")
    assert reply_code(excinfo) == "550"
    with pytest.raises(ftplib.error_perm) as excinfo:
        client.stor("outside.pdf", b"%PDF")
    assert reply_code(excinfo) == "550"
    client.rename("incoming/scan.pdf", "incoming/renamed.pdf")
    assert client.list("incoming") == {"renamed.pdf": ("file", 4)}
    client.quit()


@pytest.fixture
def planted(local_gateway: GatewayThread, tmp_path: Path) -> Iterator[tuple[FtplibClient, Path]]:
    """A user whose root holds symlinks out of it (as a careless admin or another local user might plant)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"not for ftp users")
    local_gateway.add_user("mallory")
    root = local_gateway.root_of("mallory")
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "inner.txt").write_bytes(b"inside")
    os.symlink(outside, root / "escape")
    os.symlink(outside / "secret.txt", root / "secret-link")
    os.symlink("/", root / "slash")
    os.symlink(root / "sub", root / "inner-link")
    client = login(local_gateway, "mallory")
    yield client, outside
    client.quit()


def test_dot_dot_and_absolute_paths_stay_in_root(
    planted: tuple[FtplibClient, Path], local_gateway: GatewayThread
) -> None:
    client, _ = planted
    client.cwd("../../..")
    assert client.pwd() == "/"
    root_listing = client.list("../../../..")
    assert set(root_listing) == {"sub", "inner-link"}
    for path in ("../../../../etc/passwd", "/etc/passwd", "sub/../../etc/passwd", "/../etc/hostname"):
        with pytest.raises(ftplib.error_perm) as excinfo:
            client.retr(path)
        assert reply_code(excinfo) == "550", path
    with pytest.raises(ftplib.error_perm):
        client.ftp.sendcmd("SIZE /etc/passwd")
    # Writing "above" the root lands inside it.
    client.stor("../../escaped.txt", b"x")
    assert (local_gateway.root_of("mallory") / "escaped.txt").read_bytes() == b"x"


def test_symlinks_out_of_root_lead_nowhere(planted: tuple[FtplibClient, Path], local_gateway: GatewayThread) -> None:
    client, outside = planted
    assert set(client.list()) == {"sub", "inner-link"}
    assert set(client.mlsd()) == {"sub", "inner-link"}
    assert_refused(
        "550",
        lambda: client.retr("escape/secret.txt"),
        lambda: client.retr("secret-link"),
        lambda: client.retr("slash/etc/passwd"),
        lambda: client.cwd("escape"),
        lambda: client.cwd("slash"),
        lambda: client.list("escape"),
        lambda: client.stor("escape/planted.txt", b"x"),
        lambda: client.stor("secret-link", b"overwrite"),
        lambda: client.mkd("escape/newdir"),
        lambda: client.dele("secret-link"),
        lambda: client.dele("escape/secret.txt"),
        lambda: client.rename("escape/secret.txt", "stolen.txt"),
        lambda: client.ftp.sendcmd("SIZE secret-link"),
    )
    # Moving a file of the root into the escaping directory is refused too.
    client.stor("mine.txt", b"mine")
    assert client.ftp.sendcmd("RNFR mine.txt").startswith("350")
    with pytest.raises(ftplib.error_perm) as excinfo:
        client.ftp.sendcmd("RNTO escape/mine.txt")
    assert reply_code(excinfo) == "550"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (outside / "secret.txt").read_bytes() == b"not for ftp users"
    # A symlink that stays inside the root works like the directory it points to.
    assert client.retr("inner-link/inner.txt") == b"inside"


def test_root_itself_cannot_be_removed_or_renamed(backend_gateway: GatewayThread) -> None:
    gateway = backend_gateway
    gateway.add_user("bob")
    client = login(gateway, "bob")
    for command in ("RMD /", "RMD ..", "DELE /"):
        with pytest.raises(ftplib.error_perm) as excinfo:
            client.ftp.sendcmd(command)
        assert reply_code(excinfo) == "550", command
    client.ftp.sendcmd("RNFR /")
    with pytest.raises(ftplib.error_perm) as excinfo:
        client.ftp.sendcmd("RNTO /elsewhere")
    assert reply_code(excinfo) == "550"
    client.ftp.storbinary("STOR kept.txt", io.BytesIO(b"ok"))
    assert client.list() == {"kept.txt": ("file", 2)}
    client.quit()
