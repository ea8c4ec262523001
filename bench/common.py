"""What the benchmark scripts share: loopback ports, curl's own timers, /proc memory figures."""

from __future__ import annotations

import socket
import subprocess
import time
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
