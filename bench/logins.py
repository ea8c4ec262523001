#!/usr/bin/env python3
"""Logins per second and the memory logins leave behind, against an ``ftp-gateway serve`` process.

    python bench/logins.py [--logins 500] [--users 50] [--storm 8] [--database URL] [--env KEY=VALUE ...]

1. memory: the gateway's RSS once it listens, then after --users clients (each a different user) log in at the
   same moment and quit; VmHWM is the peak. argon2id takes 19 MiB per verification.
2. sequential: --logins times USER/PASS/QUIT (ftplib, a new connection each) as one user, one after another.
3. storm: --storm clients at once, each doing --logins / --storm logins as the same user.
4. wrong: 20 wrong passwords (each pays argon2id; limits.failed_login_delay is 0 here).

--env passes settings to the gateway, e.g. ``--env FTP_GATEWAY_LOGIN__PASSWORD_CACHE=false``.
"""

from __future__ import annotations

import argparse
import asyncio
import ftplib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common import free_port, vm_kib
from common import start_gateway as common_start_gateway

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import DatabaseSettings  # noqa: E402
from gateway.users.db import create_engine, upgrade  # noqa: E402
from gateway.users.passwords import Passwords  # noqa: E402
from gateway.users.store import UserStore  # noqa: E402

PASSWORD = "bench-password"


async def add_users(url: str, names: list[str]) -> None:
    engine = create_engine(DatabaseSettings(url=url))
    try:
        await upgrade(engine)
        store = UserStore(engine)
        passwords = Passwords()
        for name in names:
            await store.add(name, passwords.hash_now(PASSWORD))
    finally:
        await engine.dispose()


def start_gateway(work: Path, url: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """``ftp-gateway serve`` (common.start_gateway) with failed logins answered at once; its log in ``work``."""
    env = {
        **os.environ,
        "FTP_GATEWAY_LOG__LEVEL": "error",
        "FTP_GATEWAY_LIMITS__FAILED_LOGIN_DELAY": "0",
        # One process: its CPU time and RSS are what /proc is read for (serve's default forks a worker per CPU).
        "FTP_GATEWAY_WORKERS": "1",
        **env,
    }
    low = free_port() % 10000 + 20000
    return common_start_gateway(
        url, env, work / "gateway.log", (low, low + 49), "--storage", f"file://{work / 'data'}/{{username}}"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def login_once(port: int, name: str, password: str = PASSWORD) -> None:
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", port, timeout=30)
    try:
        ftp.login(name, password)
        ftp.quit()
    finally:
        ftp.close()


def in_threads(count: int, work: Callable[[int], None]) -> float:
    """Run ``work(i)`` in ``count`` threads released at the same moment; the seconds until all are done."""
    start = threading.Barrier(count + 1)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        start.wait()
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{len(errors)} clients failed, first: {errors[0]!r}")
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logins", type=int, default=500)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--storm", type=int, default=8)
    parser.add_argument("--database", help="a PostgreSQL URL (default: SQLite in a temporary directory)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    names = [f"user{i:03d}" for i in range(args.users)]
    with tempfile.TemporaryDirectory(prefix="ftp-gateway-bench-") as directory:
        work = Path(directory)
        url = args.database or f"sqlite:///{work / 'users.db'}"
        asyncio.run(add_users(url, names))
        process, port = start_gateway(work, url, env)
        try:
            time.sleep(0.5)
            idle = vm_kib(process.pid, "VmRSS")
            in_threads(args.users, lambda i: login_once(port, names[i]))
            time.sleep(1)
            after, peak = vm_kib(process.pid, "VmRSS"), vm_kib(process.pid, "VmHWM")
            print(f"memory: RSS {idle / 1024:.1f} MiB idle, {after / 1024:.1f} MiB after {args.users} parallel logins")
            print(f"        (peak {peak / 1024:.1f} MiB, {(after - idle) / 1024:+.1f} MiB left behind)")

            login_once(port, names[0])  # warm: the user's directory exists, the connection pool is open
            began, cpu = time.perf_counter(), cpu_seconds(process.pid)
            for _ in range(args.logins):
                login_once(port, names[0])
            seconds, cpu = time.perf_counter() - began, cpu_seconds(process.pid) - cpu
            print(
                f"sequential: {args.logins} logins in {seconds:.2f} s = {args.logins / seconds:.0f} logins/s"
                f" (gateway CPU {cpu / args.logins * 1000:.1f} ms per login)"
            )

            each = args.logins // args.storm
            total, cpu = each * args.storm, cpu_seconds(process.pid)
            seconds = in_threads(args.storm, lambda i: [login_once(port, names[0]) for _ in range(each)] and None)
            cpu = cpu_seconds(process.pid) - cpu
            print(
                f"storm: {args.storm} clients x {each} logins in {seconds:.2f} s = {total / seconds:.0f} logins/s"
                f" (gateway CPU {cpu / total * 1000:.1f} ms per login)"
            )

            began, cpu = time.perf_counter(), cpu_seconds(process.pid)
            for _ in range(20):
                try:
                    login_once(port, names[0], "wrong")
                except ftplib.error_perm:
                    pass
            seconds, cpu = time.perf_counter() - began, cpu_seconds(process.pid) - cpu
            print(
                f"wrong: 20 wrong passwords in {seconds:.2f} s = {20 / seconds:.0f} /s"
                f" (gateway CPU {cpu / 20 * 1000:.1f} ms each)"
            )
            print(f"memory at the end: RSS {vm_kib(process.pid, 'VmRSS') / 1024:.1f} MiB")
        finally:
            process.terminate()
            process.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
