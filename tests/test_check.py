"""``ftp-gateway check`` and the storage warnings of ``user add``/``user set``: operator mistakes reported where they
are made, one line each, never a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.helpers import S3_BUCKET, S3_CREDENTIALS, scratch_postgres
from tests.test_cli import run


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTP_GATEWAY_CONFIG", raising=False)


def use_s3(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    monkeypatch.setenv("FTP_GATEWAY_S3__ENDPOINT_URL", endpoint)
    monkeypatch.setenv("FTP_GATEWAY_S3__ACCESS_KEY_ID", S3_CREDENTIALS["access_key_id"])
    monkeypatch.setenv("FTP_GATEWAY_S3__SECRET_ACCESS_KEY", S3_CREDENTIALS["secret_access_key"])
    monkeypatch.setenv("FTP_GATEWAY_S3__REGION", S3_CREDENTIALS["region"])
    monkeypatch.setenv("FTP_GATEWAY_S3__MAX_ATTEMPTS", "1")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def add_user(capsys: pytest.CaptureFixture[str], db: str, name: str, *options: str) -> tuple[int, str, str]:
    return run(capsys, "user", "add", name, "--password-stdin", "--database", db, *options, stdin="pw\n")


def lines(out: str) -> list[str]:
    return out.strip().splitlines()


def assert_clean(*outputs: str) -> None:
    for output in outputs:
        assert "Traceback" not in output, output


def test_healthy_sqlite_and_local_disk(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'users.db'}"
    assert add_user(capsys, db, "alice", "--storage", f"file://{tmp_path / 'own' / 'alice'}")[0] == 0
    assert add_user(capsys, db, "bob")[0] == 0
    code, out, err = run(capsys, "check", "--database", db, "--storage", f"file://{tmp_path}/data/{{username}}")
    assert code == 0, out + err
    assert_clean(out, err)
    config, database, default, alice = lines(out)
    assert config.startswith("ok   config")
    assert database.startswith(f"ok   database  {db}: reachable")
    assert "users: 2, own storages: 1" in database
    assert default.startswith(f"ok   storage   file://{tmp_path}/data/{{username}} (default)")
    assert alice == f"ok   storage   file://{tmp_path / 'own' / 'alice'} (user alice): " + (
        "does not exist yet: created at the first login"
    )
    assert not (tmp_path / "own").exists()  # the check makes nothing


def test_healthy_postgres_and_s3(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, s3_endpoint: str
) -> None:
    use_s3(monkeypatch, s3_endpoint)
    with scratch_postgres() as url:
        plain = url.replace("postgresql+asyncpg://", "postgresql://")
        assert run(capsys, "db", "upgrade", "--database", plain)[0] == 0
        assert add_user(capsys, plain, "acme", "--storage", f"s3://{S3_BUCKET}/acme")[0:3:2] == (0, "")
        code, out, err = run(capsys, "check", "--database", plain, "--storage", f"s3://{S3_BUCKET}/users/{{username}}")
    assert code == 0, out + err
    assert_clean(out, err)
    _, database, default, acme = lines(out)
    assert database.startswith("ok   database  postgresql://postgres@127.0.0.1") and "(current)" in database
    assert default == (
        f"ok   storage   s3://{S3_BUCKET}/users/{{username}} (default): s3://{S3_BUCKET}/users/: reachable, writable"
    )
    assert acme == f"ok   storage   s3://{S3_BUCKET}/acme (user acme): reachable, writable"


def test_unreachable_database_fails_in_one_line_without_its_password(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTP_GATEWAY_DATABASE__TIMEOUT", "5")
    url = f"postgresql://postgres:hunter2@127.0.0.1:{closed_port()}/none"
    code, out, err = run(capsys, "check", "--database", url, "--storage", f"file://{tmp_path}/{{username}}")
    assert code == 1
    assert_clean(out, err)
    assert "hunter2" not in out + err
    failed = [line for line in lines(out) if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL database  postgresql://postgres:***@127.0.0.1:")
    assert lines(out)[-1].startswith("ok   storage")  # the rest is still checked


def test_postgres_schema_behind_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with scratch_postgres() as url:
        code, out, err = run(capsys, "check", "--database", url, "--storage", f"file://{tmp_path}/{{username}}")
    assert code == 1
    assert_clean(out, err)
    assert "FAIL database" in out and "run 'ftp-gateway db upgrade'" in out


def test_missing_bucket_and_stopped_s3_fail_naming_the_storage(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_endpoint: str
) -> None:
    use_s3(monkeypatch, s3_endpoint)
    db = f"sqlite:///{tmp_path / 'users.db'}"
    code, _, err = add_user(capsys, db, "carol", "--storage", "s3://missing-bucket/carol")
    assert code == 0
    code, out, err = run(capsys, "check", "--database", db, "--storage", f"s3://{S3_BUCKET}/{{username}}")
    assert code == 1
    assert_clean(out, err)
    (failed,) = [line for line in lines(out) if line.startswith("FAIL")]
    assert failed.startswith("FAIL storage   s3://missing-bucket/carol (user carol): S3 HeadBucket: ")

    monkeypatch.setenv("FTP_GATEWAY_S3__ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    code, out, err = run(capsys, "check", "--database", db, "--storage", f"s3://{S3_BUCKET}/{{username}}")
    assert code == 1
    assert_clean(out, err)
    failed_lines = [line for line in lines(out) if line.startswith("FAIL")]
    assert len(failed_lines) == 2
    assert failed_lines[0].startswith(f"FAIL storage   s3://{S3_BUCKET}/{{username}} (default): ")
    assert all("unreachable" in line for line in failed_lines), failed_lines


def test_user_add_and_set_warn_about_an_unusable_s3_storage(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_endpoint: str
) -> None:
    use_s3(monkeypatch, s3_endpoint)
    db = f"sqlite:///{tmp_path / 'users.db'}"
    code, out, err = add_user(capsys, db, "dave", "--storage", "s3://missing-bucket/dave")
    assert code == 0 and out == "user dave added\n"
    assert len(lines(err)) == 1 and err.startswith(
        "ftp-gateway: warning: storage s3://missing-bucket/dave is not usable from here: S3 HeadBucket:"
    ), err
    code, out, err = run(capsys, "user", "set", "dave", "--storage", f"s3://{S3_BUCKET}/dave", "--database", db)
    assert code == 0 and err == ""
    code, out, err = run(capsys, "user", "set", "dave", "--storage", "s3://other-missing/dave", "--database", db)
    assert code == 0 and len(lines(err)) == 1 and "other-missing" in err
    assert_clean(out, err)


def test_user_add_warns_about_a_local_directory_that_cannot_be_made(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'users.db'}"
    (tmp_path / "a-file").write_bytes(b"")
    code, out, err = add_user(capsys, db, "erin", "--storage", f"file://{tmp_path / 'a-file' / 'erin'}")
    assert code == 0 and out == "user erin added\n"
    assert lines(err) == [
        f"ftp-gateway: warning: storage file://{tmp_path / 'a-file' / 'erin'} is not usable from here: "
        f"{tmp_path / 'a-file' / 'erin'} cannot be created: {tmp_path / 'a-file'} is not a directory"
    ]
    code, out, err = add_user(capsys, db, "fay", "--storage", f"file://{tmp_path / 'not-yet' / 'fay'}")
    assert code == 0 and err == ""


def test_sqlite_not_created_yet_is_fine(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'later' / 'users.db'}"
    code, out, err = run(capsys, "check", "--database", db, "--storage", f"file://{tmp_path}/{{username}}")
    assert code == 0, out + err
    assert "does not exist yet: serve creates it" in out
    assert not (tmp_path / "later").exists()
