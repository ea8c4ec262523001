"""What the benchmark scripts share: loopback ports, curl's own timers, /proc memory and CPU figures, the gateway
as a subprocess through its own CLI."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

MB = 1_000_000
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


def curl(*args: str) -> tuple[float, float]:
    """(time_pretransfer, time_total) of one curl run: its data phase is the difference."""
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--write-out", "%{time_pretransfer} %{time_total}", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"curl {args} failed: {result.stderr}")
    pre, total = result.stdout.split()
    return float(pre), float(total)


def vm_kib(pid: int, field: str) -> int:
    """A figure of /proc/PID/status in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {field} in /proc/{pid}/status")


# -- the gateway as a subprocess, through its own CLI (the venv's ftp-gateway next to this Python) -----------


def gateway_command() -> list[str]:
    local = Path(sys.executable).with_name("ftp-gateway")
    return [str(local)] if local.exists() else [sys.executable, "-m", "gateway"]


def add_gateway_user(database: str, name: str, password: str, env: dict[str, str], *options: str) -> None:
    """``ftp-gateway user add`` (argon2id hash, as an operator makes users)."""
    subprocess.run(
        [*gateway_command(), "user", "add", name, "--password-stdin", "--database", database, *options],
        input=f"{password}\n".encode(),
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def start_gateway(
    database: str, env: dict[str, str], log: Path, passive: tuple[int, int], *options: str
) -> tuple[subprocess.Popen[bytes], int]:
    """``ftp-gateway serve`` on a free loopback port, its log (stderr) into ``log``; (process, port)."""
    with log.open("ab") as stderr:
        process = subprocess.Popen(
            [
                *gateway_command(),
                "serve",
                "--admin-listen",
                "127.0.0.1:0",
                "--audit-log",
                "off",
                "--log-format",
                "text",
                "--listen",
                "127.0.0.1:0",
                "--database",
                database,
                "--passive-ports",
                f"{passive[0]}-{passive[1]}",
                *options,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    line = process.stdout.readline().decode() if process.stdout else ""
    if not line.startswith("listening on ftp://"):
        process.kill()
        raise SystemExit(f"gateway did not start: {line!r}; its log:\n{log.read_text(errors='replace')[-3000:]}")
    return process, int(line.strip().rsplit(":", 1)[1])


def passive_range(size: int, offset: int = 0) -> tuple[int, int]:
    """A passive port range below the kernel's ephemeral range (from 32768), away from other runs."""
    low = 20000 + (free_port() % 5) * 2000 + offset
    return low, low + size - 1


SESSION = re.compile(r"\[[^\]]*:\d+[^\]]*\]")  # the gateway's "[127.0.0.1:43234 user]": grouped as one message


def log_problems(log: Path, limit: int = 8) -> tuple[int, list[tuple[int, str]]]:
    """(number of WARNING/ERROR/CRITICAL records, the ``limit`` most frequent ones as (count, text) without their
    time stamps) of a server's log: the gateway's format, or pyftpdlib's ("[E date time] ..."). Read line by
    line: a server that logs in a loop can leave gigabytes."""
    total, messages = 0, Counter[str]()
    with log.open(errors="replace") as f:
        for line in f:
            if line.startswith(("[W ", "[E ", "[C ")):
                text = line.split("]", 1)[-1].strip()
            elif any(f" {level}" in line[:40] for level in ("WARNING", "ERROR", "CRITICAL")):
                text = line.split(" ", 2)[-1].strip()  # after the date and the time
            else:
                continue
            total += 1
            messages[SESSION.sub("[...]", text)[:300]] += 1
    return total, [(count, text) for text, count in messages.most_common(limit)]


def stop(process: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- CPU time from /proc ------------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 (state) is index 0


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a process, plus those of its children it has reaped."""
    fields = _stat_fields(pid)
    return sum(int(v) for v in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and all its live descendants, each with its reaped children.

    For servers that fork per session (vsftpd): a session that has ended was reaped by its parent, so its
    time is in the parent's cutime/cstime; one still running is read from its own /proc entry."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, ValueError):
                continue  # gone meanwhile
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
        except OSError:
            continue
        todo += children.get(current, [])
    return total


def children(pid: int) -> int:
    """How many child processes ``pid`` has (vsftpd: its live sessions)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(pid):
            try:
                parent = int(_stat_fields(int(entry.name))[1])
            except (OSError, ValueError):
                continue
            count += parent == pid
    return count


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy since boot (/proc/stat: all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU seconds of this process's waited-for children (the clients it ran: lftp, load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(max_seconds: float, busy_below: float = 0.25, window: float = 2.0) -> float:
    """Wait (up to ``max_seconds``) until the machine's CPUs were less than ``busy_below`` busy over ``window``
    seconds: another job on the machine (a test suite) would disturb the figures. Returns the busy fraction
    of the last window (1.0 = all CPUs busy), for the caller to report when it stayed high."""
    deadline = time.monotonic() + max_seconds
    cpus = os.cpu_count() or 1
    while True:
        before = machine_busy_seconds()
        time.sleep(window)
        busy = (machine_busy_seconds() - before) / window / cpus
        if busy < busy_below or time.monotonic() >= deadline:
            return busy


def quiet_machine(max_seconds: float) -> None:
    """:func:`wait_for_quiet`, saying so when the machine stayed busy (0: do not wait)."""
    if max_seconds <= 0:
        return
    busy = wait_for_quiet(max_seconds)
    if busy >= 0.25:
        print(f"note: other work kept the CPUs {busy:.0%} busy for {max_seconds:g} s; measuring anyway", flush=True)
