"""Real FTP clients behind one small interface, so one scenario drives each of them the same way.

Listings come back as ``{name: (type, size)}``; ``type`` is ``"file"`` or ``"dir"``.
"""

from __future__ import annotations

import asyncio
import ftplib
import io
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import quote, unquote

import aioftp
import pytest

from tests.helpers import require_binary

Listing = dict[str, tuple[str, int]]


class FtpClient(Protocol):
    name: str

    def login(self, user: str, password: str) -> None: ...
    def mkd(self, path: str) -> None: ...
    def cwd(self, path: str) -> None: ...
    def pwd(self) -> str: ...
    def stor(self, name: str, data: bytes) -> None: ...
    def retr(self, name: str) -> bytes: ...
    def list(self, path: str = "") -> Listing: ...
    def mlsd(self, path: str = "") -> Listing: ...
    def rename(self, source: str, destination: str) -> None: ...
    def dele(self, name: str) -> None: ...
    def rmd(self, path: str) -> None: ...
    def quit(self) -> None: ...


def parse_list_line(line: str) -> tuple[str, tuple[str, int]]:
    """One ``ls -l`` line: mode, links, owner, group, size, 3 date words, name (which may hold spaces)."""
    parts = line.split(None, 8)
    kind = "dir" if parts[0].startswith("d") else "file"
    return parts[8], (kind, int(parts[4]) if kind == "file" else 0)


def parse_list(lines: list[str]) -> Listing:
    return dict(parse_list_line(line) for line in lines if line.strip() and not line.startswith("total"))


def mlsd_entry(facts: dict[str, str]) -> tuple[str, int]:
    kind = facts["type"].lower()
    return kind, int(facts["size"]) if kind == "file" else 0


def parse_mlsd(lines: list[str]) -> Listing:
    listing = {}
    for line in lines:
        if not line.strip():
            continue
        facts_text, _, name = line.partition(" ")
        facts = dict(fact.split("=", 1) for fact in facts_text.rstrip(";").split(";"))
        listing[name] = mlsd_entry({k.lower(): v for k, v in facts.items()})
    return listing


class FtplibClient:
    name = "ftplib"

    def __init__(self, host: str, port: int, *, passive: bool = True) -> None:
        self.host, self.port, self.passive = host, port, passive
        self.ftp = ftplib.FTP(timeout=30, encoding="utf-8")

    def login(self, user: str, password: str) -> None:
        self.ftp.connect(self.host, self.port)
        try:
            self.ftp.login(user, password)
        except BaseException:
            self.ftp.close()
            raise
        self.ftp.set_pasv(self.passive)

    def mkd(self, path: str) -> None:
        self.ftp.mkd(path)

    def cwd(self, path: str) -> None:
        self.ftp.cwd(path)

    def pwd(self) -> str:
        return self.ftp.pwd()

    def stor(self, name: str, data: bytes) -> None:
        self.ftp.storbinary(f"STOR {name}", io.BytesIO(data))

    def retr(self, name: str) -> bytes:
        buffer = io.BytesIO()
        self.ftp.retrbinary(f"RETR {name}", buffer.write)
        return buffer.getvalue()

    def list(self, path: str = "") -> Listing:
        lines: list[str] = []
        self.ftp.retrlines(f"LIST {path}".rstrip(), lines.append)
        return parse_list(lines)

    def mlsd(self, path: str = "") -> Listing:
        return {name: mlsd_entry(facts) for name, facts in self.ftp.mlsd(path, facts=["type", "size"])}

    def rename(self, source: str, destination: str) -> None:
        self.ftp.rename(source, destination)

    def dele(self, name: str) -> None:
        self.ftp.delete(name)

    def rmd(self, path: str) -> None:
        self.ftp.rmd(path)

    def quit(self) -> None:
        self.ftp.quit()


def ftp_login(host: str, port: int, name: str, password: str = "secret", *, passive: bool = True) -> FtplibClient:
    client = FtplibClient(host, port, passive=passive)
    client.login(name, password)
    return client


def assert_refused(code: str, *attempts: Callable[[], object]) -> None:
    """Each attempt fails with an FTP error reply ``code``."""
    for attempt in attempts:
        with pytest.raises(ftplib.Error) as excinfo:
            attempt()
        assert str(excinfo.value)[:3] == code, excinfo.value


class AioftpClient:
    """aioftp's own client, kept connected across calls on a private event loop."""

    name = "aioftp"

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.runner = asyncio.Runner()
        self.client = aioftp.Client(socket_timeout=30, path_timeout=30, encoding="utf-8")

    def _run(self, coro: object) -> object:
        return self.runner.run(coro)  # type: ignore[arg-type]

    def login(self, user: str, password: str) -> None:
        async def login() -> None:
            await self.client.connect(self.host, self.port)
            await self.client.login(user, password)

        self._run(login())

    def mkd(self, path: str) -> None:
        self._run(self.client.make_directory(path, parents=False))

    def cwd(self, path: str) -> None:
        self._run(self.client.change_directory(path))

    def pwd(self) -> str:
        return str(self._run(self.client.get_current_directory()))

    def stor(self, name: str, data: bytes) -> None:
        async def stor() -> None:
            async with self.client.upload_stream(name) as stream:
                for start in range(0, len(data), 256 * 1024):
                    await stream.write(data[start : start + 256 * 1024])

        self._run(stor())

    def retr(self, name: str) -> bytes:
        async def retr() -> bytes:
            chunks = []
            async with self.client.download_stream(name) as stream:
                async for block in stream.iter_by_block():
                    chunks.append(block)
            return b"".join(chunks)

        return self._run(retr())  # type: ignore[return-value]

    def _list(self, path: str, command: str) -> Listing:
        async def listing() -> Listing:
            entries = await self.client.list(path or ".", raw_command=command)
            result = {}
            for entry_path, info in entries:
                kind = str(info["type"])
                result[PurePosixPath(entry_path).name] = (kind, int(info["size"]) if kind == "file" else 0)
            return result

        return self._run(listing())  # type: ignore[return-value]

    def list(self, path: str = "") -> Listing:
        return self._list(path, "LIST")

    def mlsd(self, path: str = "") -> Listing:
        return self._list(path, "MLSD")

    def rename(self, source: str, destination: str) -> None:
        self._run(self.client.rename(source, destination))

    def dele(self, name: str) -> None:
        self._run(self.client.remove_file(name))

    def rmd(self, path: str) -> None:
        self._run(self.client.remove_directory(path))

    def quit(self) -> None:
        try:
            self._run(self.client.quit())
        finally:
            self.runner.close()


class CurlError(AssertionError):
    pass


class CurlClient:
    """curl, one process per operation as scripts use it; the working directory is kept here and turned into
    the URL path (curl then sends one CWD per path component)."""

    name = "curl"

    def __init__(self, host: str, port: int, *, active: bool = False) -> None:
        self.curl = require_binary("curl")
        self.base = f"ftp://{host}:{port}"
        self.active = active
        self.directory = PurePosixPath("/")
        self.credentials = ""

    def _url(self, path: str = "", directory: bool = False) -> str:
        full = self.directory / path if path else self.directory
        encoded = quote(str(full))
        return self.base + encoded + ("/" if directory and not encoded.endswith("/") else "")

    def _run(self, *args: str, stdin_file: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        command = [self.curl, "--silent", "--show-error", "--user", self.credentials, "--max-time", "60"]
        if self.active:
            command += ["--ftp-port", "-"]
        result = subprocess.run([*command, *args], capture_output=True, timeout=90, check=False)
        if result.returncode != 0:
            raise CurlError(f"curl {args} failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
        return result

    def _quote(self, *commands: str) -> None:
        args: list[str] = []
        for command in commands:
            args += ["--quote", command]
        self._run(*args, "--list-only", self.base + "/")

    def login(self, user: str, password: str) -> None:
        self.credentials = f"{user}:{password}"
        self._run("--list-only", self.base + "/")

    def _absolute(self, path: str) -> str:
        return str(self.directory / path)

    def mkd(self, path: str) -> None:
        self._quote(f"MKD {self._absolute(path)}")

    def cwd(self, path: str) -> None:
        target = PurePosixPath(self._absolute(path))
        parts = [p for p in target.parts[1:]]
        resolved = PurePosixPath("/")
        for part in parts:
            resolved = resolved.parent if part == ".." else resolved / part
        previous, self.directory = self.directory, resolved
        try:
            self._run("--list-only", self._url(directory=True))
        except CurlError:
            self.directory = previous
            raise

    def pwd(self) -> str:
        # "-" sends the command after the transfer, still in the URL's directory.
        result = self._run("--verbose", "--quote", "-PWD", "--list-only", self._url(directory=True))
        replies = re.findall(r'^< 257 "((?:[^"]|"")*)"', result.stderr.decode(), re.MULTILINE)
        return replies[-1].replace('""', '"')

    def stor(self, name: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile() as source:
            source.write(data)
            source.flush()
            self._run("--upload-file", source.name, self._url(name))

    def retr(self, name: str) -> bytes:
        return self._run(self._url(name)).stdout

    def list(self, path: str = "") -> Listing:
        output = self._run(self._url(path, directory=True)).stdout.decode()
        return parse_list(output.splitlines())

    def mlsd(self, path: str = "") -> Listing:
        output = self._run("--request", "MLSD", self._url(path, directory=True)).stdout.decode()
        return parse_mlsd(output.splitlines())

    def rename(self, source: str, destination: str) -> None:
        self._quote(f"RNFR {self._absolute(source)}", f"RNTO {self._absolute(destination)}")

    def dele(self, name: str) -> None:
        self._quote(f"DELE {self._absolute(name)}")

    def rmd(self, path: str) -> None:
        self._quote(f"RMD {self._absolute(path)}")

    def quit(self) -> None:
        pass


def lftp_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class LftpClient:
    """lftp, one process per operation (``lftp -c``); the working directory is kept here and cd'ed into."""

    name = "lftp"

    def __init__(self, host: str, port: int) -> None:
        self.lftp = require_binary("lftp")
        self.host, self.port = host, port
        self.directory = PurePosixPath("/")
        self.user = self.password = ""

    def run(self, *commands: str, directory: PurePosixPath | None = None) -> str:
        script = "; ".join(
            [
                "set ftp:ssl-allow no",
                "set net:max-retries 1",
                "set net:timeout 30",
                "set cmd:fail-exit yes",
                f"open -u {lftp_quote(self.user)},{lftp_quote(self.password)} -p {self.port} {self.host}",
                f"cd {lftp_quote(str(directory or self.directory))}",
                *commands,
            ]
        )
        result = subprocess.run([self.lftp, "-c", script], capture_output=True, timeout=120, check=False)
        if result.returncode != 0:
            raise AssertionError(f"lftp {commands} failed: {result.stderr.decode(errors='replace')}")
        return result.stdout.decode()

    def login(self, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.run("ls")

    def mkd(self, path: str) -> None:
        self.run(f"mkdir {lftp_quote(path)}")

    def cwd(self, path: str) -> None:
        target = PurePosixPath(os.path.normpath(self.directory / path))
        self.run("ls", directory=target)
        self.directory = target

    def pwd(self) -> str:
        # lftp prints its location as a URL (ftp://user@host:port/path, percent-encoded).
        url = self.run("pwd").strip()
        return unquote(url.split(f":{self.port}", 1)[1]) or "/"

    def stor(self, name: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile() as source:
            source.write(data)
            source.flush()
            self.run(f"put {source.name} -o {lftp_quote(name)}")

    def retr(self, name: str) -> bytes:
        with tempfile.TemporaryDirectory() as directory:
            target = Path(directory) / "out"
            self.run(f"get {lftp_quote(name)} -o {target}")
            return target.read_bytes()

    def list(self, path: str = "") -> Listing:
        return parse_list(self.run(f"ls {lftp_quote(path)}" if path else "ls").splitlines())

    mlsd = list  # lftp lists with LIST; its MLSD use is internal (mirror)

    def rename(self, source: str, destination: str) -> None:
        self.run(f"mv {lftp_quote(source)} {lftp_quote(destination)}")

    def dele(self, name: str) -> None:
        self.run(f"rm {lftp_quote(name)}")

    def rmd(self, path: str) -> None:
        self.run(f"rmdir {lftp_quote(path)}")

    def quit(self) -> None:
        pass


class RcloneClient:
    """rclone's FTP backend, one process per operation; rclone has no working directory, paths are joined here."""

    name = "rclone"

    def __init__(self, host: str, port: int) -> None:
        self.rclone = require_binary("rclone")
        self.host, self.port = host, port
        self.directory = PurePosixPath("/")
        self.config = tempfile.NamedTemporaryFile("w", suffix=".conf")  # noqa: SIM115 - closed in quit()

    def run(self, *args: str, stdin: bytes | None = None) -> bytes:
        result = subprocess.run(
            [self.rclone, "--config", self.config.name, "--retries", "1", "--low-level-retries", "1", *args],
            input=stdin,
            capture_output=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"rclone {args} failed: {result.stderr.decode(errors='replace')}")
        return result.stdout

    def remote(self, path: str = "") -> str:
        return "gw:" + str(self.directory / path if path else self.directory).lstrip("/")

    def login(self, user: str, password: str) -> None:
        obscured = subprocess.run(
            [self.rclone, "obscure", password], capture_output=True, check=True, text=True
        ).stdout.strip()
        self.config.write(
            f"[gw]\ntype = ftp\nhost = {self.host}\nport = {self.port}\nuser = {user}\npass = {obscured}\n"
        )
        self.config.flush()
        self.run("lsf", "gw:")

    def mkd(self, path: str) -> None:
        self.run("mkdir", self.remote(path))

    def cwd(self, path: str) -> None:
        target = PurePosixPath(os.path.normpath(self.directory / path))
        self.run("lsf", "gw:" + str(target).lstrip("/"))
        self.directory = target

    def pwd(self) -> str:
        return str(self.directory)

    def stor(self, name: str, data: bytes) -> None:
        self.run("rcat", self.remote(name), stdin=data)

    def retr(self, name: str) -> bytes:
        return self.run("cat", self.remote(name))

    def list(self, path: str = "") -> Listing:
        listing: Listing = {}
        for line in self.run("lsf", "--format", "ps", "--separator", "\t", self.remote(path)).decode().splitlines():
            name, size = line.rsplit("\t", 1)
            listing[name.rstrip("/")] = ("dir", 0) if name.endswith("/") else ("file", int(size))
        return listing

    mlsd = list  # rclone lists with MLSD when FEAT offers it

    def rename(self, source: str, destination: str) -> None:
        self.run("moveto", self.remote(source), self.remote(destination))

    def dele(self, name: str) -> None:
        self.run("deletefile", self.remote(name))

    def rmd(self, path: str) -> None:
        self.run("rmdir", self.remote(path))

    def quit(self) -> None:
        self.config.close()


CLIENTS: dict[str, Callable[[str, int], FtpClient]] = {
    "ftplib": FtplibClient,
    "ftplib-active": lambda host, port: FtplibClient(host, port, passive=False),
    "aioftp": AioftpClient,
    "curl": CurlClient,
    "curl-active": lambda host, port: CurlClient(host, port, active=True),
    "lftp": LftpClient,
    "rclone": RcloneClient,
}
