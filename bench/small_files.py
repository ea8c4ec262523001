#!/usr/bin/env python3
"""Mirror a tree of small files up and back down with lftp through the gateway on local disk, the gateway on S3
(moto) and vsftpd on local disk, in the same run; print files/s each way, the servers' CPU time, the ratios
gateway/vsftpd, and on S3 the S3 requests per file by operation.

    python bench/small_files.py [--files 2500] [--seed 11] [--parallel 4] [--runs 1] [--quick]

The tree is generated from --seed like a source tree: nested directories, mostly files of a few KiB
(log-normal around 2.5 KiB), 1% empty, 1% between 256 KiB and 4 MiB (76 MB in 165 directories for the
default 2,500 files and seed).
Each phase is one lftp process: `mirror -R --parallel=N` (up) into a new directory, then `mirror --parallel=N`
(down) into an empty one; the sha256 of every file down must equal the one sent up. lftp's own defaults are
kept, so it also sets permissions (SITE CHMOD) and modification times (MFMT at the gateway, SITE UTIME at
vsftpd) of what it uploads, as it does for its users.

The gateway runs as `ftp-gateway serve` from this repository's venv (users made with `ftp-gateway user add`,
argon2id), one process per backend; moto runs in its own process behind a counter of S3 operations
(bench/counting_s3.py); vsftpd runs with an anonymous writable root, as in bench/local_disk.py.

CPU: the gateway and moto are one process each (all threads counted): utime+stime from /proc/PID/stat
before and after the phase. vsftpd forks a process per session (and the session forks again): its figure is
the listener's own time plus cutime/cstime, the time of the sessions it has reaped, read once all of the
phase's sessions have ended (plus any session process still alive, from its own /proc entry).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import counting_s3
from common import (
    MB,
    MiB,
    add_gateway_user,
    children,
    children_cpu_seconds,
    cpu_seconds,
    log_problems,
    machine_busy_seconds,
    passive_range,
    quiet_machine,
    start_gateway,
    stop,
    tree_cpu_seconds,
    wait_for_port,
)
from local_disk import start_vsftpd

BUCKET = "bench"
USER, PASSWORD = "bench", "bench-password"
WORDS = ["core", "util", "net", "io", "api", "model", "view", "test", "docs", "cmd", "internal", "pkg", "lib", "src"]
EXTENSIONS = ["py", "py", "py", "c", "h", "go", "rs", "js", "ts", "md", "txt", "json", "yaml", "toml", "html", "css"]


# -- the tree ---------------------------------------------------------------------------------------------


def file_size(rng: random.Random) -> int:
    draw = rng.random()
    if draw < 0.01:
        return 0
    if draw < 0.02:
        return rng.randint(256 * 1024, 4 * MiB)
    return min(int(rng.lognormvariate(math.log(2500), 1.2)), 256 * 1024)


def make_tree(root: Path, files: int, seed: int) -> int:
    """``files`` files under ``root`` in nested directories, deterministic from ``seed``; their total size."""
    rng = random.Random(seed)
    directories = [root]
    while len(directories) < max(4, files // 15):
        parent = rng.choice(directories)
        if len(parent.relative_to(root).parts) < 5:
            directories.append(parent / f"{rng.choice(WORDS)}{len(directories)}")
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
    total = 0
    for index in range(files):
        size = file_size(rng)
        name = f"{rng.choice(WORDS)}_{index}.{rng.choice(EXTENSIONS)}"
        (rng.choice(directories) / name).write_bytes(rng.randbytes(size))
        total += size
    return total


def digests(root: Path) -> dict[str, str]:
    result = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                result[str(path.relative_to(root))] = hashlib.file_digest(f, "sha256").hexdigest()
    return result


# -- the servers ------------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    user: str
    password: str
    cpu: Callable[[], float]
    settle: Callable[[], None] = lambda: None  # until the phase's sessions are over
    s3_endpoint: str | None = None
    moto_pid: int | None = None
    log: Path | None = None


@dataclass
class Phase:
    seconds: float
    cpu: float
    moto_cpu: float = 0.0
    client_cpu: float = 0.0  # lftp
    other_cpu: float = 0.0  # the rest of the machine: anything above ~0.1 s means the figures are disturbed
    s3: Counter[str] = field(default_factory=Counter)


def wait_for_sessions_to_end(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while children(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def lftp(server: Server, command: str) -> float:
    script = (
        "set ftp:ssl-allow no; set net:max-retries 1; set net:timeout 60; set cmd:fail-exit yes; "
        f"open -u {server.user},{server.password} -p {server.port} 127.0.0.1; {command}"
    )
    started = time.perf_counter()
    result = subprocess.run(["lftp", "-c", script], capture_output=True, check=False, timeout=3600)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"lftp {command!r} against {server.name} failed ({result.returncode}):\n"
            f"{result.stderr.decode(errors='replace')[-3000:]}"
        )
    return seconds


def phase(server: Server, command: str) -> Phase:
    before_s3 = counting_s3.counts(server.s3_endpoint) if server.s3_endpoint else Counter()
    before_moto = cpu_seconds(server.moto_pid) if server.moto_pid else 0.0
    before_client, before_machine = children_cpu_seconds(), machine_busy_seconds()
    before = server.cpu()
    seconds = lftp(server, command)
    server.settle()
    result = Phase(seconds, server.cpu() - before)
    if server.moto_pid:
        result.moto_cpu = cpu_seconds(server.moto_pid) - before_moto
    result.client_cpu = children_cpu_seconds() - before_client
    result.other_cpu = machine_busy_seconds() - before_machine - result.cpu - result.moto_cpu - result.client_cpu
    if server.s3_endpoint:
        result.s3 = counting_s3.counts(server.s3_endpoint) - before_s3
    return result


def make_bucket(endpoint: str) -> None:
    import boto3  # moto's dependency, in the venv with the test extra

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
    )
    try:
        client.create_bucket(Bucket=BUCKET)
    finally:
        client.close()


def local_gateway(work: Path, env: dict[str, str], processes: list[subprocess.Popen[bytes]]) -> Server:
    database = f"sqlite:///{work / 'local-users.db'}"
    add_gateway_user(database, USER, PASSWORD, env)
    log = work / "gateway-local.log"
    storage = f"file://{work / 'gateway'}/{{username}}"
    process, port = start_gateway(database, env, log, passive_range(50), "--storage", storage)
    processes.append(process)
    return Server("gateway-local", port, USER, PASSWORD, partial(tree_cpu_seconds, process.pid), log=log)


def s3_gateway(work: Path, env: dict[str, str], processes: list[subprocess.Popen[bytes]]) -> Server:
    moto, endpoint = counting_s3.start()
    processes.append(moto)
    make_bucket(endpoint)
    s3_env = {
        **env,
        "FTP_GATEWAY_STORAGE__DEFAULT_URI": f"s3://{BUCKET}/{{username}}",
        "FTP_GATEWAY_S3__ENDPOINT_URL": endpoint,
        "FTP_GATEWAY_S3__ACCESS_KEY_ID": "bench",
        "FTP_GATEWAY_S3__SECRET_ACCESS_KEY": "bench",
        "FTP_GATEWAY_S3__REGION": "us-east-1",
        "FTP_GATEWAY_S3__ADDRESSING_STYLE": "path",
    }
    database = f"sqlite:///{work / 's3-users.db'}"
    add_gateway_user(database, USER, PASSWORD, s3_env)
    log = work / "gateway-s3.log"
    process, port = start_gateway(database, s3_env, log, passive_range(50, 100))
    processes.append(process)
    cpu = partial(tree_cpu_seconds, process.pid)  # serve's worker processes included
    return Server("gateway-s3", port, USER, PASSWORD, cpu, s3_endpoint=endpoint, moto_pid=moto.pid, log=log)


def vsftpd(work: Path, processes: list[subprocess.Popen[bytes]]) -> Server | None:
    started = start_vsftpd(work)
    if started is None:
        return None
    process, url = started
    processes.append(process)
    port = int(url.rsplit(":", 1)[1].strip("/"))
    wait_for_port(port, process)
    cpu = partial(tree_cpu_seconds, process.pid)
    return Server("vsftpd", port, "anonymous", "bench", cpu, settle=partial(wait_for_sessions_to_end, process.pid))


# -- main -------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2500, help="files in the tree (default 2500)")
    parser.add_argument("--seed", type=int, default=11, help="seed of the tree (default 11)")
    parser.add_argument("--parallel", type=int, default=4, help="lftp mirror --parallel (default 4)")
    parser.add_argument("--runs", type=int, default=1, help="rounds over all servers; medians quoted (default 1)")
    parser.add_argument("--only", nargs="+", choices=["gateway-local", "gateway-s3", "vsftpd"], help="a subset")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="before each phase, wait up to this many seconds for other work on the machine to stop (60; 0: never)",
    )
    parser.add_argument("--quick", action="store_true", help="300 files, one run")
    args = parser.parse_args()
    if args.quick:
        args.files, args.runs = 300, 1
    if shutil.which("lftp") is None:
        raise SystemExit("lftp is needed (apt-get install lftp)")
    wanted = args.only or ["gateway-local", "gateway-s3", "vsftpd"]

    processes: list[subprocess.Popen[bytes]] = []
    results: dict[tuple[str, str], list[Phase]] = {}
    problems: dict[str, tuple[int, list[tuple[int, str]]]] = {}
    with tempfile.TemporaryDirectory(prefix="ftp-gateway-bench-small-") as tmp:
        work = Path(tmp)
        tree = work / "tree"
        total = make_tree(tree, args.files, args.seed)
        expected = digests(tree)
        directories = sum(1 for p in tree.rglob("*") if p.is_dir())
        print(
            f"tree: {len(expected)} files in {directories} directories, {total / MB:.1f} MB "
            f"(median {statistics.median(p.stat().st_size for p in tree.rglob('*') if p.is_file()):.0f} bytes), "
            f"seed {args.seed}",
            flush=True,
        )
        try:
            servers: list[Server] = []
            env = {**os.environ, "FTP_GATEWAY_LOG__LEVEL": "warning"}
            if "gateway-local" in wanted:
                servers.append(local_gateway(work, env, processes))
            if "gateway-s3" in wanted:
                servers.append(s3_gateway(work, env, processes))
            if "vsftpd" in wanted:
                peer = vsftpd(work, processes)
                if peer is None:
                    print("vsftpd not installed: no peer (apt-get install vsftpd)")
                else:
                    servers.append(peer)

            for run in range(args.runs):
                order = servers if run % 2 == 0 else list(reversed(servers))
                for server in order:
                    down = work / f"down-{server.name}-{run}"
                    remote = f"run{run}"
                    mirror = f"--parallel={args.parallel}"
                    quiet_machine(args.quiet_wait)
                    up = phase(server, f"mirror -R {mirror} {tree} {remote}")
                    results.setdefault((server.name, "up"), []).append(up)
                    quiet_machine(args.quiet_wait)
                    back = phase(server, f"mirror {mirror} {remote} {down}")
                    results.setdefault((server.name, "down"), []).append(back)
                    got = digests(down)
                    if got != expected:
                        missing = sorted(set(expected) - set(got))
                        wrong = sorted(k for k in expected if k in got and got[k] != expected[k])
                        raise SystemExit(
                            f"{server.name}: the tree down differs from the tree up: {len(missing)} missing "
                            f"(first {missing[:3]}), {len(wrong)} different (first {wrong[:3]}), "
                            f"{len(set(got) - set(expected))} extra"
                        )
                    shutil.rmtree(down)
                    print(
                        f"run {run} {server.name:13} up {up.seconds:7.2f} s  down {back.seconds:7.2f} s  "
                        "round trip verified (sha256 of every file)",
                        flush=True,
                    )
            for server in servers:
                if server.log is not None:
                    problems[server.name] = log_problems(server.log)
        finally:
            for process in reversed(processes):
                stop(process)

    files = len(expected)
    print()
    print(
        f"{files} files, {total / MB:.1f} MB, lftp mirror --parallel={args.parallel}, {args.runs} run(s), medians; "
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(
        f"{'server':14} {'direction':9} {'files/s':>8} {'MB/s':>7} {'seconds':>8} {'server CPU s':>13} "
        f"{'CPU ms/file':>12} {'moto CPU s':>11} {'lftp CPU s':>11} {'other CPU s':>12}"
    )
    rates: dict[tuple[str, str], float] = {}
    for (name, direction), phases in results.items():
        seconds = statistics.median(p.seconds for p in phases)
        cpu = statistics.median(p.cpu for p in phases)
        rates[name, direction] = files / seconds
        moto = f"{statistics.median(p.moto_cpu for p in phases):11.2f}" if name == "gateway-s3" else f"{'-':>11}"
        print(
            f"{name:14} {direction:9} {files / seconds:8.1f} {total / seconds / MB:7.1f} {seconds:8.2f} "
            f"{cpu:13.2f} {cpu / files * 1000:12.2f} {moto} {statistics.median(p.client_cpu for p in phases):11.2f} "
            f"{statistics.median(p.other_cpu for p in phases):12.2f}"
        )
    print(
        "other CPU s: what the rest of the machine used meanwhile (all CPUs busy minus server, moto and lftp); "
        "well above zero means another load shared the CPUs and the figures are disturbed"
    )
    for name in ("gateway-local", "gateway-s3"):
        for direction in ("up", "down"):
            if (name, direction) in rates and ("vsftpd", direction) in rates:
                ratio = rates[name, direction] / rates["vsftpd", direction]
                print(f"ratio {name}/vsftpd files/s {direction:4} {ratio:.3f}x")
    for direction in ("up", "down"):
        phases = results.get(("gateway-s3", direction), [])
        if phases:
            counts = phases[0].s3
            breakdown = ", ".join(f"{op} {n / files:.2f} ({n})" for op, n in counts.most_common())
            print(
                f"S3 requests per file, gateway-s3 {direction:4} (run 0): "
                f"{sum(counts.values()) / files:.2f} = {breakdown}"
            )
    for name, (count, first) in problems.items():
        print(f"{name} log: {count} warning/error records" + (", most frequent:" if first else ""))
        for times, text in first:
            print(f"  x{times}: {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
