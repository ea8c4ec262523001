#!/usr/bin/env python3
"""The cost of the extra hop between replicas: 256 MiB up and down through a data connection that lands on the
replica holding the session ("own") and through one that lands on another replica and is relayed ("relayed"),
in the same run; MB/s of each and the ratio (target: relayed >= 0.8x own).

    python bench/cluster.py [--size-mib 256] [--runs 3] [--storage disk,s3]

Three ``ftp-gateway serve`` replicas on 127.0.0.11, .12 and .13 share one passive range through Redis
(127.0.0.1:6379, a key prefix of their own), as in tests/test_cluster.py. The client logs in on the first
replica and opens each data connection itself: to the first replica (own), or to the second (relayed to the
first with a PROXY v2 header). No balancer sits in front: it would add the same hop to both paths.

Storage: "disk" is a directory all replicas share (as a shared volume): the gateway's own path is fastest there,
so the hop shows most. "s3" is moto (bench/moto_server.py) on this machine: moto's pace dominates both paths.
The figure is the data phase: from the transfer command to its 226, the client reading or writing with a
1 MiB buffer; medians of the runs. Runs alternate own/relayed so that drift of the machine hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import MB, MiB, cpu_seconds, free_port, quiet_machine, stop, wait_for_port

REPLICAS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
REDIS_URL = os.environ.get("FTP_GATEWAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
BUCKET = "bench"


def gateway_command() -> list[str]:
    local = Path(sys.executable).with_name("ftp-gateway")
    return [str(local)] if local.exists() else [sys.executable, "-m", "gateway"]


class Control:
    """A raw FTP control connection, so the bench chooses where each data connection goes."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=120)
        self.file = self.sock.makefile("rb")
        self.expect("220")

    def reply(self) -> str:
        line = self.file.readline().decode()
        while len(line) > 3 and line[3] == "-":
            line = self.file.readline().decode()
        return line.strip()

    def expect(self, code: str, command: str | None = None) -> str:
        if command is not None:
            self.sock.sendall(command.encode() + b"\r\n")
        reply = self.reply()
        if not reply.startswith(code):
            raise SystemExit(f"{command!r}: expected {code}, got {reply!r}")
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def transfer(control: Control, data_host: str, command: str, size: int) -> float:
    """One STOR (``size`` bytes from memory) or RETR through a data connection to ``data_host``; seconds from the
    command to its 226."""
    reply = control.expect("229", "EPSV")
    port = int(reply.split("|")[3])
    data = socket.create_connection((data_host, port), timeout=120)
    buffer = bytearray(MiB)
    start = time.perf_counter()
    control.expect("150", command)
    if command.startswith("STOR"):
        view = memoryview(os.urandom(MiB))
        for _ in range(size // MiB):
            data.sendall(view)
        data.shutdown(socket.SHUT_WR)
        data.recv(1)
    else:
        received = 0
        while count := data.recv_into(buffer):
            received += count
        if received != size:
            raise SystemExit(f"{command}: {received} bytes, expected {size}")
    data.close()
    control.expect("226")
    return time.perf_counter() - start


def start_replicas(work: Path, env: dict[str, str]) -> tuple[list[subprocess.Popen[bytes]], int]:
    port = free_port()
    processes = []
    for index, host in enumerate(REPLICAS):
        with (work / f"replica-{index}.log").open("ab") as log:
            process = subprocess.Popen(
                [*gateway_command(), "serve", "--listen", f"{host}:{port}"], stdout=subprocess.PIPE, stderr=log, env=env
            )
        processes.append(process)
        line = process.stdout.readline().decode() if process.stdout else ""
        if not line.startswith("listening on"):
            for started in processes:
                stop(started)
            raise SystemExit(f"replica {host} did not start: {(work / f'replica-{index}.log').read_text()[-2000:]}")
    return processes, port


def measure(work: Path, env: dict[str, str], label: str, size_mib: int, runs: int) -> None:
    processes, port = start_replicas(work, env)
    size = size_mib * MiB
    figures: dict[str, list[float]] = {}
    # CPU seconds each path cost the first replica (the session's) and the second (the relaying one), per GiB.
    cpu: dict[str, list[float]] = {"own": [0.0, 0.0], "relayed": [0.0, 0.0]}
    try:
        control = Control(REPLICAS[0], port)
        control.expect("331", "USER bench")
        control.expect("230", "PASS bench-password")
        control.expect("200", "TYPE I")
        for run in range(runs):
            paths = [("own", REPLICAS[0]), ("relayed", REPLICAS[1])]
            for path, host in paths if run % 2 == 0 else reversed(paths):
                name = f"{path}-{run}.bin"
                before = [cpu_seconds(process.pid) for process in processes[:2]]
                up = transfer(control, host, f"STOR {name}", size)
                down = transfer(control, host, f"RETR {name}", size)
                for index, process in enumerate(processes[:2]):
                    cpu[path][index] += cpu_seconds(process.pid) - before[index]
                figures.setdefault(f"{path} up", []).append(size / up / MB)
                figures.setdefault(f"{path} down", []).append(size / down / MB)
                control.expect("250", f"DELE {name}")
        control.close()
    finally:
        for process in processes:
            stop(process)
    print(f"\n{label}: {size_mib} MiB, median of {runs} runs (MB/s)")
    for direction in ("up", "down"):
        own = statistics.median(figures[f"own {direction}"])
        relayed = statistics.median(figures[f"relayed {direction}"])
        print(f"  {direction:5} own {own:8.0f}   relayed {relayed:8.0f}   ratio {relayed / own:.2f}x")
    gib = 2 * runs * size / (1 << 30)  # up and down, every run
    for path, (holder, relaying) in cpu.items():
        print(
            f"  CPU per GiB moved, {path:8}: session's replica {holder / gib:.2f} s, "
            f"relaying replica {relaying / gib:.2f} s"
        )


async def make_bucket(endpoint: str) -> None:
    from aiobotocore.session import get_session

    session = get_session()
    async with session.create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench", aws_secret_access_key="bench"
    ) as client:
        await client.create_bucket(Bucket=BUCKET)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--storage", default="disk,s3", help="disk, s3 or both (comma-separated)")
    parser.add_argument("--quiet-wait", type=float, default=30, help="seconds to wait for an idle machine first")
    args = parser.parse_args()
    quiet_machine(args.quiet_wait)
    with tempfile.TemporaryDirectory(prefix="ftp-gateway-bench-cluster-") as tmp:
        work = Path(tmp)
        low = 21000 + free_port() % 1000
        base = {key: value for key, value in os.environ.items() if not key.startswith("FTP_GATEWAY_")} | {
            "FTP_GATEWAY_DATABASE__URL": f"sqlite:///{work / 'users.db'}",
            "FTP_GATEWAY_PASSIVE__PORT_MIN": str(low),
            "FTP_GATEWAY_PASSIVE__PORT_MAX": str(low + 9),
            "FTP_GATEWAY_CLUSTER__REDIS_URL": REDIS_URL,
            "FTP_GATEWAY_ADMIN__LISTEN": "off",
            "FTP_GATEWAY_LOG__AUDIT": "off",
            "FTP_GATEWAY_LOG__LEVEL": "warning",
            "FTP_GATEWAY_TIMEOUTS__PATH": "300",
        }
        subprocess.run(
            [*gateway_command(), "user", "add", "bench", "--password-stdin"],
            input=b"bench-password\n",
            check=True,
            env=base,
            stdout=subprocess.DEVNULL,
        )
        storages = args.storage.split(",")
        if "disk" in storages:
            env = base | {
                "FTP_GATEWAY_STORAGE__DEFAULT_URI": f"file://{work / 'shared'}/{{username}}",
                "FTP_GATEWAY_CLUSTER__KEY_PREFIX": f"bench-{uuid.uuid4().hex}",
            }
            measure(work, env, "shared local disk", args.size_mib, args.runs)
            shutil.rmtree(work / "shared", ignore_errors=True)
        if "s3" in storages:
            moto_port = free_port()
            endpoint = f"http://127.0.0.1:{moto_port}"
            moto = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).with_name("moto_server.py")),
                    "-H",
                    "127.0.0.1",
                    "-p",
                    str(moto_port),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_for_port(moto_port)
                asyncio.run(make_bucket(endpoint))
                env = base | {
                    "FTP_GATEWAY_STORAGE__DEFAULT_URI": f"s3://{BUCKET}/{{username}}",
                    "FTP_GATEWAY_S3__ENDPOINT_URL": endpoint,
                    "FTP_GATEWAY_S3__ACCESS_KEY_ID": "bench",
                    "FTP_GATEWAY_S3__SECRET_ACCESS_KEY": "bench",
                    "FTP_GATEWAY_S3__REGION": "us-east-1",
                    "FTP_GATEWAY_S3__ADDRESSING_STYLE": "path",
                    "FTP_GATEWAY_CLUSTER__KEY_PREFIX": f"bench-{uuid.uuid4().hex}",
                }
                measure(work, env, "S3 (moto on this machine)", args.size_mib, args.runs)
            finally:
                stop(moto)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
