"""``serve --workers N``: processes sharing the control port, each with its slice of the passive range."""

from __future__ import annotations

import ftplib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_passive_range, random_bytes, stop_server, wait_until

WORKERS = 2


def gateway() -> str:
    return str(Path(sys.executable).with_name("ftp-gateway"))


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, tuple[int, int]]]:
    env = {**os.environ, "FTP_GATEWAY_LIMITS__FAILED_LOGIN_DELAY": "0"}
    env.pop("FTP_GATEWAY_CONFIG", None)
    database = f"sqlite:///{tmp_path / 'users.db'}"
    subprocess.run(
        [gateway(), "user", "add", "carol", "--password-stdin", "--database", database],
        input="pw\n", text=True, check=True, env=env, capture_output=True,
    )  # fmt: skip
    low, high = free_passive_range(10)
    process = subprocess.Popen(
        [gateway(), "serve", "--workers", str(WORKERS), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--database", database, "--passive-ports", f"{low}-{high}", "--storage", f"file://{tmp_path}/data/{{username}}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    line = process.stdout.readline()
    assert line.startswith("listening on ftp://127.0.0.1:"), line + process.stderr.read()
    yield process, int(line.rsplit(":", 1)[1]), (low, high)
    stop_server(process)
    process.stdout.close()
    process.stderr.close()


def test_workers_share_the_port_and_the_files(
    workers: tuple[subprocess.Popen[str], int, tuple[int, int]], tmp_path: Path
) -> None:
    """Sessions land on both workers (their passive ports come from both slices of the range); a file stored
    through one is read back through whichever worker the next session lands on; SIGTERM stops them all."""
    process, port, (low, high) = workers
    assert len(children_of(process.pid)) == WORKERS
    passive_ports = set()
    stored: dict[str, bytes] = {}
    for index in range(24):
        with ftplib.FTP() as ftp:
            ftp.connect("127.0.0.1", port, timeout=10)
            ftp.login("carol", "pw")
            ftp.voidcmd("TYPE I")
            passive_ports.add(ftp.makepasv()[1])
            ftp.voidcmd("ABOR")  # the next transfer opens its own passive port
            name, data = f"f{index}.bin", random_bytes(10_000 + index, seed=index)
            ftp.storbinary(f"STOR {name}", io.BytesIO(data))
            stored[name] = data
            previous = f"f{index - 1}.bin" if index else name
            received = io.BytesIO()
            ftp.retrbinary(f"RETR {previous}", received.write)
            assert received.getvalue() == stored[previous]
            ftp.quit()
    middle = low + (high - low + 1) // 2
    assert all(low <= p <= high for p in passive_ports)
    assert any(p < middle for p in passive_ports) and any(p >= middle for p in passive_ports), passive_ports
    files = {path.name: path.read_bytes() for path in (tmp_path / "data" / "carol").iterdir()}
    assert files == stored
    pids = children_of(process.pid)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10, what="the workers to end")
    assert process.stderr is not None
    assert "Traceback" not in process.stderr.read()


def test_a_dead_worker_stops_the_others_with_exit_1(
    workers: tuple[subprocess.Popen[str], int, tuple[int, int]],
) -> None:
    """A worker that dies on its own takes the others down, so that the service manager restarts all."""
    process, _, _ = workers
    first, *others = children_of(process.pid)
    os.kill(first, signal.SIGKILL)
    assert process.wait(timeout=20) == 1
    wait_until(lambda: not any(alive(pid) for pid in others), timeout=10, what="the other workers to end")
    assert process.stderr is not None
    assert "stopping the others" in process.stderr.read()


def test_more_workers_than_passive_ports_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [gateway(), "serve", "--workers", "4", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--passive-ports", "41000-41002", "--database", f"sqlite:///{tmp_path / 'users.db'}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ftp-gateway: error: the passive range 41000-41002 has 3 ports, fewer than the 4 workers: give each "
        "worker at least one"
    ]
