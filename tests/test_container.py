"""The container image, without a container engine: the Dockerfile's own install steps run into a fresh venv
and its ENTRYPOINT + CMD start from there, then a user logs in and moves a file.

Every absolute path of the image (/src, /opt/venv, /etc/ftp-gateway/config.toml, the WORKDIR /data) is
mapped under one temporary directory, as if it were the image's root. What the test changes beyond that,
and why: it runs under this machine's Python, not the image's python:3.12-slim; it keeps pip's cache (the
builder's PIP_NO_CACHE_DIR=1 would download every dependency again); it skips the builder's apt-get (the
compiler is only for platforms without wheels) and the final stage's useradd/chown (they need root); and it
moves the listen addresses to 127.0.0.1 with a free port and a free passive range through FTP_GATEWAY_*
variables, which override the image's config file exactly as a `docker run -e` would.
"""

from __future__ import annotations

import ftplib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import free_passive_range, random_bytes, sha256, wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        (args,) = self.all(keyword)
        return args


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile, each with its instructions (keyword, arguments): continuation lines joined,
    comments and parser directives dropped. Enough for this project's Dockerfile, not a general parser."""
    stages: list[Stage] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        keyword, _, args = (logical + line).partition(" ")
        logical = ""
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            stages.append(Stage(base.strip(), name.strip() or None))
        else:
            stages[-1].instructions.append((keyword, args))
    return stages


def env_pairs(args: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(args))


class ImageRoot:
    """The image's file system, mapped under a directory: ``/opt/venv`` is ``root/opt/venv``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, image_path: str) -> Path:
        assert image_path.startswith("/"), image_path
        return self.root / image_path.lstrip("/")

    def value(self, text: str) -> str:
        """An ENV value: absolute paths in a ``:``-list mapped, ``$PATH`` taken from this process."""
        parts = []
        for part in text.split(":"):
            if part == "$PATH":
                parts.append(os.environ["PATH"])
            elif part.startswith("/"):
                parts.append(str(self.path(part)))
            else:
                parts.append(part)
        return ":".join(parts)

    def copy(self, args: str) -> None:
        """A COPY from the build context (the repository) into the image."""
        *sources, dest = args.split()
        for source in sources:
            origin = ROOT / source
            target = self.path(dest) / Path(source).name if dest.endswith("/") else self.path(dest)
            target.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, target)


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_final_image_is_slim_non_root_and_runs_serve(stages: list[Stage]) -> None:
    builder, final = stages[0], stages[-1]
    assert len(stages) == 2 and builder.name == "builder"
    assert builder.base == final.base and final.base.startswith("python:3.1") and final.base.endswith("-slim")
    # No compiler in the image: nothing is installed by apt-get there, and only the venv comes from the builder.
    assert not any("apt-get" in run for run in final.all("RUN"))
    assert [args for args in final.all("COPY") if args.startswith("--from")] == ["--from=builder /opt/venv /opt/venv"]
    user = final.one("USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) >= 10000, user
    assert json.loads(final.one("ENTRYPOINT")) == ["ftp-gateway"]
    assert json.loads(final.one("CMD")) == ["serve"]
    # The image's config file exists (so FTP_GATEWAY_CONFIG never names a missing file) and its ports are exposed.
    config_copy = [args.split() for args in final.all("COPY") if args.startswith("docker/config.toml")]
    assert config_copy == [["docker/config.toml", env_pairs(final.one("ENV"))["FTP_GATEWAY_CONFIG"]]]
    config = tomllib.loads((ROOT / "docker" / "config.toml").read_text())
    exposed = final.one("EXPOSE").split()
    assert config["listen"].rpartition(":")[2] in exposed
    assert config["admin"]["listen"].rpartition(":")[2] in exposed
    assert f"{config['passive']['port_min']}-{config['passive']['port_max']}" in exposed


def test_dockerignore_lets_every_copied_path_in(stages: list[Stage]) -> None:
    """.dockerignore excludes everything, then lets the sources back in: a COPY of a path it misses fails the
    build (no container engine runs here to notice)."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in lines
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        source.split("/")[0]
        for stage in stages
        for args in stage.all("COPY")
        if not args.startswith("--from")
        for source in args.split()[:-1]
    }
    assert copied and copied <= allowed, copied - allowed


@pytest.fixture(scope="module")
def image(stages: list[Stage], tmp_path_factory: pytest.TempPathFactory) -> ImageRoot:
    """The builder's steps, then the final stage's files, under a temporary root."""
    builder, final = stages[0], stages[-1]
    build = ImageRoot(tmp_path_factory.mktemp("image"))
    for args in builder.all("COPY"):
        build.copy(args)
    env = {**os.environ, **{k: build.value(v) for k, v in env_pairs(" ".join(builder.all("ENV"))).items()}}
    env.pop("PIP_NO_CACHE_DIR")  # keep pip's cache: the test would download every dependency again
    env["PYTHON"] = sys.executable
    installs = [run for run in builder.all("RUN") if not run.startswith("apt-get")]
    assert len(installs) == 1, installs
    program, *arguments = shlex.split(installs[0])
    command = [shutil.which(program, path=str(build.path("/usr/local/bin"))), *map(build.value, arguments)]
    assert command[0] is not None, f"{program} is not copied into /usr/local/bin"
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for args in final.all("COPY"):
        if not args.startswith("--from"):
            build.copy(args)
    build.path(final.one("WORKDIR")).mkdir(parents=True, exist_ok=True)
    return build


@dataclass
class Container:
    command: list[str]
    env: dict[str, str]
    workdir: Path


@pytest.fixture
def container(stages: list[Stage], image: ImageRoot) -> Container:
    final = stages[-1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTP_GATEWAY_")}
    env.update({k: image.value(v) for k, v in env_pairs(" ".join(final.all("ENV"))).items()})
    low, high = free_passive_range()
    env.update(
        FTP_GATEWAY_LISTEN="127.0.0.1:0",
        FTP_GATEWAY_ADMIN__LISTEN="127.0.0.1:0",
        FTP_GATEWAY_PASSIVE__PORT_MIN=str(low),
        FTP_GATEWAY_PASSIVE__PORT_MAX=str(high),
        FTP_GATEWAY_LIMITS__FAILED_LOGIN_DELAY="0",
    )
    argv = json.loads(final.one("ENTRYPOINT")) + json.loads(final.one("CMD"))
    program = shutil.which(argv[0], path=env["PATH"])
    assert program is not None and program.startswith(str(image.root)), program
    return Container([program, *argv[1:]], env, image.path(final.one("WORKDIR")))


@pytest.fixture
def serving(container: Container, tmp_path: Path) -> Iterator[tuple[int, Container]]:
    subprocess.run(
        [container.command[0], "user", "add", "alice", "--password-stdin"],
        input="wonderland\n", text=True, check=True, capture_output=True, env=container.env, cwd=container.workdir,
    )  # fmt: skip
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            container.command, env=container.env, cwd=container.workdir, stdout=stdout, stderr=stderr
        )
    try:

        def listening() -> str | None:
            if process.poll() is not None:
                raise AssertionError(f"exited {process.returncode}: {err.read_text()[-3000:]}")
            return next((line for line in out.read_text().splitlines() if line.startswith("listening on ")), None)

        line = wait_until(listening, timeout=60, what="the 'listening on' line")
        yield int(line.rsplit(":", 1)[1]), container
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, err.read_text()[-3000:]
        assert "Traceback" not in err.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_entrypoint_serves_a_login_and_a_transfer(serving: tuple[int, Container]) -> None:
    port, container = serving
    data = random_bytes(3 * 1024 * 1024, seed=12)
    with ftplib.FTP() as ftp:
        ftp.connect("127.0.0.1", port, timeout=30)
        ftp.login("alice", "wonderland")
        ftp.storbinary("STOR report.bin", io.BytesIO(data))
        received = io.BytesIO()
        ftp.retrbinary("RETR report.bin", received.write)
        ftp.quit()
    assert sha256(received.getvalue()) == sha256(data)
    # The built-in relative defaults put users and files in the WORKDIR, the image's one writable directory.
    assert sha256((container.workdir / "ftp-data" / "alice" / "report.bin").read_bytes()) == sha256(data)
    assert (container.workdir / "ftp-gateway.db").is_file()
