"""Clients that cannot run the whole session script (test_clients.py), each in what it does: lftp mirrors a
tree both ways, wget downloads and lists, BusyBox ftpput/ftpget and NcFTP move files. Local disk and S3."""

from __future__ import annotations

import filecmp
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import GatewayThread, MiB, random_bytes, require_binary, sha256

FILES = {"empty.bin": b"", "one-mib.bin": random_bytes(MiB, seed=5), "twenty-mib.bin": random_bytes(20 * MiB, seed=6)}


def run(*command: str, cwd: Path | None = None) -> str:
    result = subprocess.run(command, capture_output=True, timeout=180, check=False, cwd=cwd)
    assert result.returncode == 0, (
        f"{command[0]} failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
    )
    return result.stdout.decode(errors="replace")


def same_tree(left: Path, right: Path) -> bool:
    comparison = filecmp.dircmp(left, right)
    if comparison.left_only or comparison.right_only or comparison.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(left, right, comparison.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(left / d, right / d) for d in comparison.common_dirs)


@pytest.mark.matrix(client="lftp mirror (200 files)")
def test_lftp_mirror_both_ways(backend_gateway: GatewayThread, tmp_path: Path) -> None:
    lftp = require_binary("lftp")
    backend_gateway.add_user("alice")
    tree = tmp_path / "tree"
    for index in range(200):
        path = tree / f"level{index % 4}" / f"sub {index % 7}" / f"file-{index:03d}{'-ü' if index % 5 == 0 else ''}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(random_bytes(index * 397, seed=index))
        os.utime(path, (1_600_000_000 + index * 3600, 1_600_000_000 + index * 3600))
    (tree / "empty dir").mkdir()
    back = tmp_path / "back"
    script = (
        "set ftp:ssl-allow no; set net:max-retries 1; set cmd:fail-exit yes; "
        f"open -u alice,secret -p {backend_gateway.port} 127.0.0.1; "
        f'mirror -R "{tree}" remote; mirror remote "{back}"'
    )
    run(lftp, "-c", script)
    assert same_tree(tree, back)
    # lftp sets each uploaded file's time with MFMT and the downloaded copy's from MLSD: both ways hold.
    for path in tree.rglob("*.dat"):
        assert int((back / path.relative_to(tree)).stat().st_mtime) == int(path.stat().st_mtime), path
    stored = backend_gateway.files.files("alice")
    assert len(stored) == 200


@pytest.mark.matrix(client="wget")
def test_wget_downloads_and_lists(backend_gateway: GatewayThread, tmp_path: Path) -> None:
    wget = require_binary("wget")
    backend_gateway.add_user("alice")
    for name, data in FILES.items():
        backend_gateway.files.put("alice", f"pub/{name}", data)
    base = f"ftp://127.0.0.1:{backend_gateway.port}/pub/"
    credentials = ["--ftp-user=alice", "--ftp-password=secret", "--tries=1", "--timeout=30"]
    for name, data in FILES.items():
        run(wget, "-q", *credentials, "-O", str(tmp_path / name), base + name)
        assert sha256((tmp_path / name).read_bytes()) == sha256(data)
    # The listing wget keeps of a directory (.listing) names every file.
    run(wget, "-q", *credentials, "--no-remove-listing", "-O", "/dev/null", base, cwd=tmp_path)
    listing = (tmp_path / ".listing").read_text()
    assert all(name in listing for name in FILES)
    run(wget, "-q", "-r", "-nH", *credentials, "-P", str(tmp_path / "mirror"), base)
    for name, data in FILES.items():
        assert sha256((tmp_path / "mirror" / "pub" / name).read_bytes()) == sha256(data)


@pytest.mark.matrix(client="busybox ftpput/ftpget")
def test_busybox_ftpput_ftpget(backend_gateway: GatewayThread, tmp_path: Path) -> None:
    busybox = require_binary("busybox")
    backend_gateway.add_user("alice")
    connection = ["-u", "alice", "-p", "secret", "-P", str(backend_gateway.port), "127.0.0.1"]
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
        run(busybox, "ftpput", *connection, name, str(tmp_path / name))
        run(busybox, "ftpget", *connection, str(tmp_path / f"back-{name}"), name)
        assert sha256((tmp_path / f"back-{name}").read_bytes()) == sha256(data)
    assert {n: sha256(d) for n, d in backend_gateway.files.files("alice").items()} == {
        n: sha256(d) for n, d in FILES.items()
    }


@pytest.mark.matrix(client="ncftpput/ncftpget")
def test_ncftp_put_get_and_list(backend_gateway: GatewayThread, tmp_path: Path) -> None:
    ncftpput, ncftpget, ncftpls = (require_binary(tool) for tool in ("ncftpput", "ncftpget", "ncftpls"))
    backend_gateway.add_user("alice")
    connection = ["-u", "alice", "-p", "secret", "-P", str(backend_gateway.port)]
    for index, (name, data) in enumerate(FILES.items()):
        (tmp_path / name).write_bytes(data)
        os.utime(tmp_path / name, (1_600_000_000 + index * 60, 1_600_000_000 + index * 60))
    # -m makes the remote directory.
    run(ncftpput, "-m", *connection, "127.0.0.1", "/incoming", *(str(tmp_path / name) for name in FILES))
    listing = run(ncftpls, *connection, "-l", f"ftp://127.0.0.1:{backend_gateway.port}/incoming/")
    assert all(name in listing for name in FILES)
    (tmp_path / "back").mkdir()
    for name, data in FILES.items():
        run(ncftpget, *connection, "127.0.0.1", str(tmp_path / "back"), f"/incoming/{name}")
        assert sha256((tmp_path / "back" / name).read_bytes()) == sha256(data)
    # ncftpput sets each file's time with MFMT and ncftpget takes it over: the times survive both ways.
    for index, name in enumerate(FILES):
        assert (tmp_path / "back" / name).stat().st_mtime == 1_600_000_000 + index * 60


@pytest.mark.matrix(client="rclone copy/check")
def test_rclone_copy_check_and_modification_times(backend_gateway: GatewayThread, tmp_path: Path) -> None:
    """rclone copies a tree up, checks it and copies it back; times set with MFMT survive both ways."""
    rclone = require_binary("rclone")
    backend_gateway.add_user("alice")
    tree = tmp_path / "tree"
    for index, (name, data) in enumerate(FILES.items()):
        path = tree / f"dir {index}" / name
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        os.utime(path, (1_600_000_000 + index * 86_400, 1_600_000_000 + index * 86_400))
    config = tmp_path / "rclone.conf"
    obscured = run(rclone, "obscure", "secret").strip()
    config.write_text(
        f"[gw]\ntype = ftp\nhost = 127.0.0.1\nport = {backend_gateway.port}\nuser = alice\npass = {obscured}\n"
    )
    rc = (rclone, "--config", str(config), "--retries", "1", "--low-level-retries", "1")
    copy = subprocess.run([*rc, "copy", str(tree), "gw:up", "-v"], capture_output=True, timeout=180, check=False)
    assert copy.returncode == 0, copy.stderr.decode(errors="replace")
    assert b"not supported" not in copy.stderr  # SetModTime works (MFMT)
    run(*rc, "check", str(tree), "gw:up")
    listed = sorted(run(*rc, "lsf", "-R", "--files-only", "--format", "pst", "--separator", "|", "gw:up").splitlines())
    shown = [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_600_000_000 + index * 86_400)) for index in range(3)]
    assert listed == [
        f"dir {index}/{name}|{len(data)}|{shown[index]}" for index, (name, data) in enumerate(FILES.items())
    ]
    back = tmp_path / "back"
    run(*rc, "copy", "gw:up", str(back))
    assert same_tree(tree, back)
    for index, name in enumerate(FILES):
        assert (back / f"dir {index}" / name).stat().st_mtime == 1_600_000_000 + index * 86_400
    stored = backend_gateway.files.files("alice")
    assert {key: sha256(value) for key, value in stored.items()} == {
        f"up/dir {index}/{name}": sha256(data) for index, (name, data) in enumerate(FILES.items())
    }
