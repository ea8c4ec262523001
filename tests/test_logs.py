"""Logs and the audit log: JSON lines that parse one by one, the session on each, one audit event per operation
with the right bytes and results, and no password anywhere."""

from __future__ import annotations

import ftplib
import io
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog
from gateway.log import FORMAT, JsonFormatter, LogContext, SessionFilter, log_context
from tests.helpers import free_passive_range, random_bytes

KEYS = {"time", "level", "logger", "message", "session", "client_ip", "user"}


def gateway() -> str:
    return str(Path(sys.executable).with_name("ftp-gateway"))


def start(tmp_path: Path, *options: str, level: str = "info") -> tuple[subprocess.Popen[str], int, str]:
    env = {**os.environ, "FTP_GATEWAY_LIMITS__FAILED_LOGIN_DELAY": "0", "FTP_GATEWAY_LOG__LEVEL": level}
    env.pop("FTP_GATEWAY_CONFIG", None)
    low, high = free_passive_range(10)
    process = subprocess.Popen(
        [gateway(), "serve", "--workers", "1", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--database", f"sqlite:///{tmp_path / 'users.db'}", "--passive-ports", f"{low}-{high}",
         "--storage", f"file://{tmp_path}/data/{{username}}", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("listening on ftp://127.0.0.1:"), line
    admin = process.stdout.readline()
    assert admin.startswith("admin on http://"), admin
    return process, int(line.rsplit(":", 1)[1]), admin.split()[-1]


def stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    process.terminate()
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    assert process.returncode == 0, err
    return out, err


def add_user(tmp_path: Path, name: str, password: str) -> None:
    subprocess.run(
        [gateway(), "user", "add", name, "--password-stdin", "--database", f"sqlite:///{tmp_path / 'users.db'}"],
        input=password + "\n", text=True, check=True, capture_output=True,
    )  # fmt: skip


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def process_title(pid: int) -> str:
    """What ``ps`` shows of a process: its command line (where a process title would be written) and its name."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return cmdline + " " + Path(f"/proc/{pid}/comm").read_text()


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line is one JSON object (a traceback would be lines of its own)."""
    return [json.loads(line) for line in text.splitlines()]


def test_json_logs_and_audit_events_never_hold_a_password(tmp_path: Path) -> None:
    password, wrong = "pw-" + secrets.token_hex(8), "bad-" + secrets.token_hex(8)
    add_user(tmp_path, "carol", password)
    audit = tmp_path / "audit.jsonl"
    audit.write_text('{"event": "from before"}\n')  # appended to, not replaced
    process, port, admin = start(tmp_path, "--log-format", "json", "--audit-log", str(audit), level="debug")
    data = random_bytes(300_000, seed=5)
    try:
        with ftplib.FTP() as ftp:
            ftp.connect("127.0.0.1", port, timeout=30)
            with pytest.raises(ftplib.error_perm, match="530"):
                ftp.login("carol", wrong)
            ftp.login("carol", password)
            ftp.mkd("dir")
            ftp.storbinary("STOR dir/a.bin", io.BytesIO(data))
            got = io.BytesIO()
            ftp.retrbinary("RETR dir/a.bin", got.write)
            assert got.getvalue() == data
            ftp.rename("dir/a.bin", "dir/b.bin")
            with pytest.raises(ftplib.error_perm, match="550"):
                ftp.delete("dir/missing.bin")
            with pytest.raises(ftplib.error_perm, match="550"):
                ftp.retrbinary("RETR dir/missing.bin", io.BytesIO().write)
            ftp.delete("dir/b.bin")
            ftp.rmd("dir")
            ftp.quit()
        # Nor do the metrics, nor the command lines and titles of the server's processes (and its workers, if any).
        with urllib.request.urlopen(f"{admin}/metrics", timeout=10) as response:  # noqa: S310 - http on loopback
            metrics = response.read().decode()
        assert re.search(r"ftp_gateway_logins_total{[^}]*result=\"failure\"[^}]*} 1.0", metrics), metrics
        titles = [process_title(pid) for pid in [process.pid, *children(process.pid)]]
        assert titles and all("serve" in title for title in titles)
    finally:
        out, err = stop(process)

    for text in (out, err, audit.read_text(), metrics, *titles):
        assert password not in text and wrong not in text
    logs = json_lines(err)
    assert logs and all(KEYS <= line.keys() for line in logs)
    # The command lines were logged, PASS as ***, with the session's user.
    passes = [line for line in logs if line["message"].startswith("PASS")]
    assert [line["message"] for line in passes] == ["PASS ***", "PASS ***"]
    assert {line["user"] for line in passes} == {"carol"}
    logged_in = [line for line in logs if line["message"] == "logged in"]
    assert len(logged_in) == 1
    session = logged_in[0]["session"]
    assert logged_in[0]["client_ip"] == "127.0.0.1" and logged_in[0]["user"] == "carol"
    assert logged_in[0]["time"].endswith("Z")

    first, *events = json_lines(audit.read_text())
    assert first == {"event": "from before"}
    assert {e["session"] for e in events} == {session}
    assert {e["client_ip"] for e in events} == {"127.0.0.1"}
    assert {e["user"] for e in events} == {"carol"}
    shown = [
        {k: v for k, v in e.items() if k not in ("time", "session", "client_ip", "user", "duration")} for e in events
    ]
    assert shown == [
        {"event": "login", "result": "failed", "code": "530"},
        {"event": "login", "result": "ok"},
        {"event": "mkdir", "path": "/dir", "result": "ok"},
        {"event": "upload", "path": "/dir/a.bin", "bytes": len(data), "result": "ok"},
        {"event": "download", "path": "/dir/a.bin", "bytes": len(data), "result": "ok"},
        {"event": "rename", "from": "/dir/a.bin", "to": "/dir/b.bin", "result": "ok"},
        {"event": "delete", "path": "/dir/missing.bin", "result": "failed", "code": "550"},
        {"event": "download", "path": "/dir/missing.bin", "bytes": 0, "result": "failed", "code": "550"},
        {"event": "delete", "path": "/dir/b.bin", "result": "ok"},
        {"event": "rmdir", "path": "/dir", "result": "ok"},
    ]
    transfers = [e for e in events if e["event"] in ("upload", "download") and e["result"] == "ok"]
    assert all(e["duration"] > 0 for e in transfers)


def test_audit_on_stdout_comes_after_the_start_lines(tmp_path: Path) -> None:
    add_user(tmp_path, "dave", "pw")
    process, port, _ = start(tmp_path, "--log-format", "text")
    try:
        with ftplib.FTP() as ftp:
            ftp.connect("127.0.0.1", port, timeout=30)
            ftp.login("dave", "pw")
            ftp.quit()
    finally:
        out, err = stop(process)
    [event] = json_lines(out)
    assert event["event"] == "login" and event["user"] == "dave" and event["result"] == "ok"
    # The text format: "[host:port user]" on the lines of a session.
    assert any("[127.0.0.1:" in line and " dave] logged in" in line for line in err.splitlines()), err


def test_json_formatter_keeps_a_traceback_on_its_line() -> None:
    record_text = io.StringIO()
    handler = logging.StreamHandler(record_text)
    handler.addFilter(SessionFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.Logger("test")
    logger.addHandler(handler)
    token = log_context.set(LogContext("abcd1234", "192.0.2.7", 2121, "erin"))
    try:
        try:
            raise ValueError("line one\nline two")
        except ValueError:
            logger.exception("it failed")
    finally:
        log_context.reset(token)
    [line] = json_lines(record_text.getvalue())
    assert line["message"] == "it failed" and line["level"] == "ERROR"
    assert (line["session"], line["client_ip"], line["user"]) == ("abcd1234", "192.0.2.7", "erin")
    assert line["exception"].startswith("Traceback") and "line two" in line["exception"]


def test_text_format_without_a_session() -> None:
    record_text = io.StringIO()
    handler = logging.StreamHandler(record_text)
    handler.addFilter(SessionFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.Logger("test")
    logger.addHandler(handler)
    logger.warning("hello %s", "there")
    assert record_text.getvalue().rstrip().endswith("WARNING test [-] hello there")


def test_audit_log_off_and_file(tmp_path: Path) -> None:
    with AuditLog("off") as off:
        off.event("login", user="x", result="ok")
    target = tmp_path / "audit.jsonl"
    with AuditLog(str(target)) as audit:
        for index in range(1000):
            audit.event("upload", path=f"/f{index}", bytes=index, result="ok")
    events = json_lines(target.read_text())
    assert [e["bytes"] for e in events] == list(range(1000))
    assert {e["session"] for e in events} == {"-"}


def test_audit_log_on_a_stdout_nobody_reads_does_not_hold_the_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full pipe blocks the writer thread, never the caller, and the exit gives up on it."""
    import gateway.audit

    read_end, write_end = os.pipe()

    class Pipe(io.StringIO):
        def fileno(self) -> int:
            return write_end

    monkeypatch.setattr(sys, "stdout", Pipe())
    monkeypatch.setattr(gateway.audit, "EXIT_WAIT", 0.2)
    audit = AuditLog("stdout")
    try:
        with audit:
            for index in range(2000):  # ~250 KB: well past a pipe's 64 KiB
                audit.event("upload", path=f"/{'x' * 100}/{index}", bytes=index, result="ok")
        assert audit.stuck is not None  # it gave up on the blocked writer
        assert os.read(read_end, 65536).startswith(b'{"time": ')
    finally:
        os.close(read_end)  # the blocked write fails now (EPIPE) and the writer ends
        if audit.stuck is not None:
            audit.stuck.join(10)
            assert not audit.stuck.is_alive()
        os.close(write_end)
