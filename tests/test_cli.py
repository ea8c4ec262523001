"""The ftp-gateway command: user management, configuration errors, and serve as a real process."""

from __future__ import annotations

import ftplib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main
from tests.helpers import scratch_postgres, stop_server


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'users.db'}"
    monkeypatch.delenv("FTP_GATEWAY_CONFIG", raising=False)
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse exits for --help, --version and usage errors
        code = int(exc.code or 0)
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_user_lifecycle(capsys: pytest.CaptureFixture[str], db: str) -> None:
    code, out, _ = run(
        capsys,
        "user", "add", "alice", "--password-stdin", "--database", db,
        "--home", "/inbox", "--max-sessions", "2", "--upload-limit", "10M", "--perm", "/archive=r",
        "--tls", "required", "--quota-bytes", "10G", "--quota-files", "100",
        stdin="first password\n",
    )  # fmt: skip
    assert code == 0 and "alice" in out
    code, out, err = run(capsys, "user", "add", "alice", "--password-stdin", "--database", db, stdin="x\n")
    assert_one_line_error(code, err, "already exists")

    code, out, _ = run(capsys, "user", "show", "alice", "--json", "--database", db)
    shown = json.loads(out)
    assert shown["home"] == "/inbox"
    assert shown["max_sessions"] == 2
    assert shown["upload_limit"] == 10 * 1024 * 1024
    assert shown["permissions"] == {"/": "rw", "/archive": "r"}
    assert (shown["tls"], shown["quota_bytes"], shown["quota_files"]) == ("required", 10 << 30, 100)
    assert (shown["used_bytes"], shown["used_files"]) == (0, 0)
    assert "password" not in out and "argon2" not in out
    code, out, _ = run(capsys, "user", "show", "alice", "--database", db)
    assert "tls:            required" in out
    assert "bytes used:     0 / 10.0G" in out and "files used:     0 / 100" in out

    run(capsys, "user", "add", "bob", "--password-stdin", "--read-only", "--database", db, stdin="pw\n")
    code, out, _ = run(capsys, "user", "list", "--json", "--database", db)
    assert [u["name"] for u in json.loads(out)] == ["alice", "bob"]
    assert json.loads(out)[1]["permissions"] == {"/": "r"}
    assert (json.loads(out)[1]["tls"], json.loads(out)[1]["quota_bytes"]) == (None, None)
    code, out, _ = run(capsys, "user", "list", "--database", db)
    assert out.splitlines()[0].split()[:2] == ["NAME", "ENABLED"]

    code, out, _ = run(
        capsys, "user", "set", "alice", "--max-sessions", "0", "--read-only", "--unset-perm", "/archive",
        "--storage", "file:///srv/ftp/alice", "--database", db,
    )  # fmt: skip
    assert code == 0
    shown = json.loads(run(capsys, "user", "show", "alice", "--json", "--database", db)[1])
    assert shown["max_sessions"] is None
    assert shown["permissions"] == {"/": "r"}
    assert shown["storage"] == "file:///srv/ftp/alice"
    assert shown["upload_limit"] == 10 * 1024 * 1024  # untouched
    assert (shown["tls"], shown["quota_bytes"], shown["quota_files"]) == ("required", 10 << 30, 100)  # untouched
    code, out, _ = run(
        capsys, "user", "set", "alice", "--tls", "default", "--quota-bytes", "0", "--quota-files", "0",
        "--database", db,
    )  # fmt: skip
    assert code == 0 and "tls:            (server default)" in out and "files used:     0 / unlimited" in out
    shown = json.loads(run(capsys, "user", "show", "alice", "--json", "--database", db)[1])
    assert (shown["tls"], shown["quota_bytes"], shown["quota_files"]) == (None, None, None)
    assert run(capsys, "user", "set", "alice", "--tls", "optional", "--quota-bytes", "512K", "--database", db)[0] == 0
    shown = json.loads(run(capsys, "user", "show", "alice", "--json", "--database", db)[1])
    assert (shown["tls"], shown["quota_bytes"]) == ("optional", 512 * 1024)

    assert run(capsys, "user", "disable", "alice", "--database", db)[0] == 0
    assert json.loads(run(capsys, "user", "show", "alice", "--json", "--database", db)[1])["enabled"] is False
    assert run(capsys, "user", "enable", "alice", "--database", db)[0] == 0
    assert run(capsys, "user", "passwd", "alice", "--password-stdin", "--database", db, stdin="second\n")[0] == 0

    assert run(capsys, "user", "delete", "alice", "--database", db)[0] == 0
    code, _, err = run(capsys, "user", "show", "alice", "--database", db)
    assert_one_line_error(code, err, "no user 'alice'")


@pytest.mark.parametrize(
    ("argv", "stdin", "fragment"),
    [
        (["user", "add", "bad name"], "pw\n", "invalid user name"),
        (["user", "add", "alice"], "\n", "empty password"),
        (["user", "add", "alice"], None, "--password-stdin"),
        (["user", "add", "alice", "--storage", "ftp://elsewhere/x"], "pw\n", "unknown scheme"),
        (["user", "add", "alice", "--home", "relative"], "pw\n", "absolute path"),
        (["user", "add", "alice", "--perm", "/x=rwx"], "pw\n", "invalid permission"),
        (["user", "add", "alice", "--upload-limit", "fast"], "pw\n", "invalid rate"),
        (["user", "add", "alice", "--quota-bytes", "10G/s"], "pw\n", "invalid size"),
        (["user", "add", "alice", "--quota-files", "-1"], "pw\n", "--quota-files"),
        (["user", "add", "alice", "--tls", "always"], "pw\n", "invalid choice"),
        (["user", "set", "nobody", "--read-only"], None, "no user 'nobody'"),
        (["user", "set", "nobody"], None, "nothing to change"),
        (["user", "frobnicate"], None, "invalid choice"),
    ],
)
def test_bad_user_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], db: str, argv: list[str], stdin: str | None, fragment: str
) -> None:
    extra = ["--password-stdin"] if stdin is not None else []
    if argv[1] not in ("add",) or stdin is None:
        extra = []
    code, _, err = run(capsys, *argv, *extra, "--database", db, stdin=stdin if stdin is not None else "")
    assert_one_line_error(code, err, fragment)


def test_password_is_never_an_argument(capsys: pytest.CaptureFixture[str], db: str) -> None:
    code, _, err = run(capsys, "user", "add", "alice", "--password", "x", "--database", db)
    assert_one_line_error(code, err, "unrecognized arguments")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "not found"),
        ("listen = ", "not valid TOML"),
        ('listen = "127.0.0.1:2121"\nbogus = 1\n', "unknown setting 'bogus'"),
        ("[passive]\nport_min = 40000\nport_max = 30000\n", "port_min (40000) is above port_max"),
        ('[passive]\nport_max = "many"\n', "passive.port_max"),
        ('[database]\nurl = "mysql://x/y"\n', "not supported"),
        ('[storage]\ndefault_uri = "gopher://x"\n', "unknown scheme"),
        ('[storage]\ndefault_uri = "s3://no_such bucket/{username}"\n', "not a valid bucket name"),
        ('[s3]\nkms_key_id = "k"\n', "kms_key_id needs"),
        ('[s3]\naccess_key_id = "AKIA"\n', "give both access_key_id and secret_access_key"),
        ("[s3]\npart_size = 1024\n", "s3.part_size"),
    ],
)
def test_bad_config_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, db: str, content: str | None, fragment: str
) -> None:
    config = tmp_path / "ftp-gateway.toml"
    if content is not None:
        config.write_text(content)
    code, _, err = run(capsys, "user", "list", "--config", str(config))
    assert_one_line_error(code, err, fragment)


def test_bad_environment_value_names_the_variable(
    capsys: pytest.CaptureFixture[str], db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTP_GATEWAY_PASSIVE__PORT_MAX", "lots")
    code, _, err = run(capsys, "user", "list", "--database", db)
    assert_one_line_error(code, err, "passive.port_max", "FTP_GATEWAY_PASSIVE__PORT_MAX")


def test_flags_override_environment_override_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.cli import build_parser, settings_from

    config = tmp_path / "c.toml"
    config.write_text('listen = "127.0.0.1:2100"\n[passive]\nport_min = 31000\nport_max = 31010\n')
    monkeypatch.setenv("FTP_GATEWAY_PASSIVE__PORT_MAX", "31020")
    monkeypatch.setenv("FTP_GATEWAY_LISTEN", "127.0.0.1:2200")
    settings = settings_from(build_parser().parse_args(["serve", "--config", str(config), "--listen", "0.0.0.0:2300"]))
    assert settings.listen == "0.0.0.0:2300"
    assert (settings.passive.port_min, settings.passive.port_max) == (31000, 31020)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["serve", "--listen", "nonsense"], "expected HOST:PORT"),
        (["serve", "--passive-ports", "9-x"], "expected LOW-HIGH"),
        (["serve", "--passive-ports", "30000-30010", "--listen", "127.0.0.1:30005"], "inside the passive range"),
        (["serve", "--masquerade-address", "not-an-ip"], "passive.masquerade_address"),
        (["serve", "--bogus"], "unrecognized arguments"),
        (["--database"], "required: COMMAND"),
    ],
)
def test_bad_flags(capsys: pytest.CaptureFixture[str], db: str, argv: list[str], fragment: str) -> None:
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("ftp-gateway ")


# -- serve as a process -------------------------------------------------------------------------------------


def gateway_command() -> list[str]:
    return [str(Path(sys.executable).with_name("ftp-gateway"))]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    env = {**os.environ, "FTP_GATEWAY_LIMITS__FAILED_LOGIN_DELAY": "0"}
    env.pop("FTP_GATEWAY_CONFIG", None)
    database = f"sqlite:///{tmp_path / 'users.db'}"
    subprocess.run(
        [*gateway_command(), "user", "add", "carol", "--password-stdin", "--database", database],
        input="pw\n", text=True, check=True, env=env, capture_output=True,
    )  # fmt: skip
    process = subprocess.Popen(
        [*gateway_command(), "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--database", database, "--passive-ports", "31100-31199", "--storage", f"file://{tmp_path}/data/{{username}}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("listening on ftp://127.0.0.1:"), line + process.stderr.read()  # type: ignore[union-attr]
    port = int(line.rsplit(":", 1)[1])
    yield process, port
    stop_server(process)
    process.stdout.close()
    process.stderr.close()  # type: ignore[union-attr]


def test_serve_prints_its_port_serves_and_stops_on_sigterm(
    served: tuple[subprocess.Popen[str], int], tmp_path: Path
) -> None:
    process, port = served
    with ftplib.FTP() as ftp:
        ftp.connect("127.0.0.1", port, timeout=10)
        ftp.login("carol", "pw")
        ftp.storbinary("STOR hello.txt", io.BytesIO(b"hello"))
        ftp.quit()
    assert (tmp_path / "data" / "carol" / "hello.txt").read_bytes() == b"hello"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    assert process.stderr is not None
    assert "Traceback" not in process.stderr.read()


def test_serve_port_in_use_is_one_line(tmp_path: Path, served: tuple[subprocess.Popen[str], int]) -> None:
    _, port = served
    result = subprocess.run(
        [*gateway_command(), "serve", "--admin-listen", "127.0.0.1:0", "--listen", f"127.0.0.1:{port}",
         "--database", f"sqlite:///{tmp_path / 'x.db'}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"ftp-gateway: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_postgres_schema_is_checked_and_upgraded(tmp_path: Path) -> None:
    with scratch_postgres() as url:
        plain = url.replace("postgresql+asyncpg://", "postgresql://")
        command = [
            *gateway_command(),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--database",
            plain,
        ]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "has no ftp-gateway schema" in refused.stderr and "db upgrade" in refused.stderr
        upgraded = subprocess.run(
            [*gateway_command(), "db", "upgrade", "--database", plain], capture_output=True, text=True, timeout=30
        )
        assert upgraded.returncode == 0, upgraded.stderr
        status = subprocess.run(
            [*gateway_command(), "db", "status", "--database", plain], capture_output=True, text=True, timeout=30
        )
        assert status.returncode == 0 and "up to date" in status.stdout
        added = subprocess.run(
            [*gateway_command(), "user", "add", "dave", "--password-stdin", "--database", plain],
            input="pw\n", capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["user", "list"], "database unavailable"),
        (
            ["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            "cannot start",
        ),  # not "cannot listen": the address is fine
    ],
)
def test_unreachable_database_is_one_line_exit_1(argv: list[str], message: str) -> None:
    result = subprocess.run(
        [*gateway_command(), *argv, "--database", "postgresql://postgres@127.0.0.1:9/none"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ftp-gateway: error: {message}"), result.stderr
    assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1
