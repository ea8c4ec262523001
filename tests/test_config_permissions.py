"""A config file holding a secret that others can read: a warning at start, an error with --strict-permissions."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli import assert_one_line_error, db, run

__all__ = ["db"]  # the fixture, shared with test_cli

S3_SECRET = '[s3]\naccess_key_id = "AKIDEXAMPLE"\nsecret_access_key = "wJalrXUtnFEMI/K7MDENG"\n'


def _config(tmp_path: Path, text: str, mode: int) -> str:
    config = tmp_path / "ftp-gateway.toml"
    config.write_text(text)
    config.chmod(mode)
    return str(config)


def test_a_readable_config_with_a_secret_warns_and_the_command_still_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, db: str
) -> None:
    config = _config(tmp_path, S3_SECRET, 0o644)
    code, _, err = run(capsys, "db", "upgrade", "--config", config, "--database", db)
    assert code == 0, err
    assert err.count("\n") == 1 and "warning" in err, err
    assert "s3.secret_access_key" in err and "0644" in err, err
    assert "wJalrXUtnFEMI" not in err  # the warning names the key, never the secret


def test_a_private_config_with_a_secret_does_not_warn(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, db: str
) -> None:
    config = _config(tmp_path, S3_SECRET, 0o600)
    code, _, err = run(capsys, "db", "upgrade", "--config", config, "--database", db)
    assert code == 0, err
    assert "warning" not in err, err


def test_strict_permissions_refuses_a_readable_config_with_a_secret(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, db: str
) -> None:
    config = _config(tmp_path, S3_SECRET, 0o644)
    code, _, err = run(capsys, "db", "upgrade", "--config", config, "--database", db, "--strict-permissions")
    assert_one_line_error(code, err, "s3.secret_access_key", "chmod 600")


@pytest.mark.parametrize(
    "text",
    [
        '[s3]\nregion = "eu-west-1"\n',
        '[database]\nurl = "postgresql://gateway@127.0.0.1/db"\n',  # a URL without a password is no secret
        '[cluster]\nredis_url = "redis://127.0.0.1:6379/3"\n',
    ],
)
def test_a_readable_config_without_secrets_does_not_warn(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, db: str, text: str
) -> None:
    config = _config(tmp_path, text, 0o644)
    code, _, err = run(capsys, "db", "upgrade", "--config", config, "--database", db, "--strict-permissions")
    assert code == 0, err
    assert "warning" not in err, err


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[database]\nurl = "postgresql://gateway:hunter2@127.0.0.1/db"\n', "database.url"),
        ('[cluster]\nredis_url = "redis://:hunter2@127.0.0.1:6379/3"\n', "cluster.redis_url"),
        ('[s3]\nsession_token = "FQoGZXIvYXdz"\n', "s3.session_token"),
    ],
)
def test_each_secret_key_counts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, db: str, text: str, key: str
) -> None:
    config = _config(tmp_path, text, 0o640)
    code, _, err = run(capsys, "db", "status", "--config", config, "--database", db, "--strict-permissions")
    assert_one_line_error(code, err, key, "group", "0640")
    assert "hunter2" not in err


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o640, False), (0o600, False)])
def test_a_tls_key_readable_by_others_warns(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, db: str, mode: int, warned: bool
) -> None:
    """The key file is checked as the config is: readable by others (or by a group not the gateway's own) warns,
    and --strict-permissions refuses it. Its own group may read it (a Kubernetes Secret mounted with fsGroup)."""
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(mode)
    text = f'[tls]\ncert_file = "{tmp_path / "chain.pem"}"\nkey_file = "{key}"\n'
    config = _config(tmp_path, text, 0o644)  # no secret in the file itself
    code, _, err = run(capsys, "db", "status", "--config", config, "--database", db)
    assert (f"TLS key file {str(key)!r} is readable by others" in err) is warned, err
    code, _, err = run(capsys, "db", "status", "--config", config, "--database", db, "--strict-permissions")
    if warned:
        assert_one_line_error(code, err, "TLS key file", "chmod 600")
    else:
        assert "warning" not in err, err
