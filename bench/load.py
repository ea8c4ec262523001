#!/usr/bin/env python3
"""Many FTP clients at once against the gateway (local disk) and pyftpdlib (local disk) in the same run:
session churn (cycles/s, latency, server CPU per cycle) and idle sessions (logins/s, server RSS per session).

    python bench/load.py [churn|idle|both] [--clients 50 200] [--duration 10] [--sessions 10000] [--quick]

churn: C clients at once, each looping for --duration seconds over one cycle: connect, USER/PASS, TYPE I,
       EPSV + STOR of 64 KiB, EPSV + RETR of it, EPSV + LIST, DELE, QUIT. Printed per server and C: cycles/s
       (cycles completed / time from the start to the end of the last cycle: no client starts a cycle after
       --duration, the ones under way finish), p50/p99 cycle latency, failures (with the first messages), the
       server's CPU ms per cycle, and the CPU of the load generator and of the rest of the machine (to show
       whether the server was the bottleneck). A warm-up of 10 clients for 1 s comes first.
idle:  N sessions log in (at most --login-concurrency at a time) and stay idle. Printed: logins/s, the
       server's RSS before (after a warm-up of 100 sessions logged in and closed) and after, per session,
       NOOP answered by 100 of the idle sessions (and at the end by all), and how long a fresh client takes to
       log in and to LIST beside them (and before them, for comparison). Refusals are counted and quoted.

The gateway is `ftp-gateway serve` from this repository's venv (a new process per mode), with its users made
by `ftp-gateway user add` (argon2id hashes, as an operator makes them): --users of them (default 4), clients
spread over them round-robin, max_sessions left unlimited (the default). Its limits.max_connections (512 by
default) is raised to what the idle mode needs unless --gateway-max-connections says otherwise. pyftpdlib
runs in its own process: FTPServer with DummyAuthorizer (plain-text passwords), the same users, its
max_cons limit off, its idle timeout set to the gateway's (900 s), a passive range as large as the gateway's.
Both log at warning level only. In the idle mode both get an idle timeout of 3600 s (logging in 10,000
sessions into the gateway takes about ten minutes; its default is 900 s).

The load generator is raw asyncio streams speaking FTP (passive mode, EPSV), in --client-processes separate
processes (default 1) for churn and one process for idle, with RLIMIT_NOFILE raised to its hard limit; so are
the servers' (inherited from this process), unless --server-nofile gives their soft limit (1024 shows what a
gateway started under systemd's default would do). CPU figures come from /proc/PID/stat (all threads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    MB,
    add_gateway_user,
    children_cpu_seconds,
    cpu_seconds,
    log_problems,
    machine_busy_seconds,
    passive_range,
    quiet_machine,
    start_gateway,
    stop,
    tree_cpu_seconds,
    vm_kib,
)

PASSWORD = "load-password"
HOST = "127.0.0.1"
PASSIVE_PORTS = 1000
GATEWAY_IDLE_TIMEOUT = 900.0  # the gateway's default timeouts.idle, given to pyftpdlib too
IDLE_MODE_TIMEOUT = 3600.0  # both servers' idle timeout in the idle mode: logging in 10,000 can take 10 minutes
CYCLE_TIMEOUT = 60.0
LOGIN_TIMEOUT = 60.0
GIVE_UP = 300
EPSV_PORT = re.compile(rb"\(\|\|\|(\d+)\|\)")


# == the FTP client (runs in the load-generator processes) =================================================


class FtpError(Exception):
    pass


class Step:
    """What a client is waiting for, to name it when the wait fails (a timeout says nothing by itself)."""

    def __init__(self) -> None:
        self.now = "connect"

    def failure(self, exc: BaseException) -> str:
        if isinstance(exc, FtpError):
            return str(exc)  # names its step already
        return f"{self.now}: {type(exc).__name__}" + (f": {exc}" if str(exc) else "")


class Session:
    """One control connection, read and written with asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, step: Step) -> None:
        self.reader, self.writer, self.step = reader, writer, step

    @classmethod
    async def connect(cls, port: int, step: Step) -> Session:
        step.now = "connect"
        reader, writer = await asyncio.open_connection(HOST, port)
        session = cls(reader, writer, step)
        await session.expect("greeting", 220)
        return session

    async def reply(self) -> tuple[int, bytes]:
        line = await self.reader.readline()
        if len(line) < 4 or not line[:3].isdigit():
            raise FtpError(f"connection closed or bad reply: {line!r}")
        if line[3:4] == b"-":  # multi-line: up to "NNN " with the same code
            while True:
                more = await self.reader.readline()
                if not more:
                    raise FtpError("connection closed in a multi-line reply")
                if more[:3] == line[:3] and more[3:4] == b" ":
                    break
        return int(line[:3]), line.rstrip()

    async def expect(self, what: str, *codes: int) -> bytes:
        self.step.now = what
        code, text = await self.reply()
        if code not in codes:
            raise FtpError(f"{what}: {text.decode(errors='replace')}")
        return text

    async def command(self, line: str, *codes: int) -> bytes:
        self.writer.write(line.encode() + b"\r\n")
        return await self.expect(line.split()[0], *codes)

    async def login(self, user: str, password: str) -> None:
        await self.command(f"USER {user}", 331)
        await self.command(f"PASS {password}", 230)

    async def data(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        match = EPSV_PORT.search(await self.command("EPSV", 229))
        if match is None:
            raise FtpError("EPSV: no port in the reply")
        self.step.now = "data connection"
        return await asyncio.open_connection(HOST, int(match.group(1)))

    async def store(self, name: str, body: bytes) -> None:
        reader, writer = await self.data()
        await self.command(f"STOR {name}", 125, 150)
        self.step.now = "STOR data"
        writer.write(body)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await self.expect("STOR end", 226)

    async def fetch(self, line: str) -> bytes:
        reader, writer = await self.data()
        await self.command(line, 125, 150)
        chunks = []
        self.step.now = f"{line.split()[0]} data"
        while chunk := await reader.read(1 << 16):
            chunks.append(chunk)
        writer.close()
        await self.expect(f"{line.split()[0]} end", 226)
        return b"".join(chunks)

    async def quit(self) -> None:
        await self.command("QUIT", 221)
        self.close()

    def close(self) -> None:
        self.writer.close()


# -- churn ---------------------------------------------------------------------------------------------------


async def churn_cycle(port: int, user: str, name: str, body: bytes, step: Step) -> None:
    session = await Session.connect(port, step)
    try:
        await session.login(user, PASSWORD)
        await session.command("TYPE I", 200)
        await session.store(name, body)
        got = await session.fetch(f"RETR {name}")
        if got != body:
            raise FtpError(f"RETR: {len(got)} bytes back, {len(body)} sent, or different")
        if name.encode() not in await session.fetch("LIST"):
            raise FtpError("LIST: the file just stored is not listed")
        await session.command(f"DELE {name}", 250)
        await session.quit()
    finally:
        session.close()


async def churn_clients(config: dict[str, Any]) -> dict[str, Any]:
    body = random.Random(config["first"]).randbytes(config["size"])
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = config["start_at"] + config["duration"]
    last_end = 0.0

    async def client(index: int) -> None:
        nonlocal last_end
        user = config["users"][index % len(config["users"])]
        name = f"load-{index}.bin"
        while time.time() < deadline:
            started, step = time.perf_counter(), Step()
            try:
                async with asyncio.timeout(CYCLE_TIMEOUT):
                    await churn_cycle(config["port"], user, name, body, step)
            except Exception as exc:
                errors[step.failure(exc)] += 1
                await asyncio.sleep(0.05)  # a refused client does not spin
            else:
                latencies.append(time.perf_counter() - started)
            last_end = time.time()

    await asyncio.sleep(max(0.0, config["start_at"] - time.time()))
    await asyncio.gather(*(client(i) for i in range(config["first"], config["first"] + config["count"])))
    return {"latencies": latencies, "errors": dict(errors), "last_end": last_end}


# -- idle ----------------------------------------------------------------------------------------------------


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def log_in(port: int, user: str, step: Step) -> Session:
    session = await Session.connect(port, step)
    try:
        await session.login(user, PASSWORD)
    except BaseException:
        session.close()
        raise
    return session


async def fresh_client(port: int, user: str, step: Step) -> tuple[float, float]:
    """(seconds to connect and log in, seconds for EPSV + LIST) of a new client."""
    started = time.perf_counter()
    session = await log_in(port, user, step)
    logged_in = time.perf_counter()
    try:
        await session.fetch("LIST")
        listed = time.perf_counter()
        await session.quit()
    finally:
        session.close()
    return logged_in - started, listed - logged_in


async def fresh_clients(port: int, user: str, times: int) -> dict[str, Any]:
    results, errors = [], []
    for _ in range(times):
        step = Step()
        try:
            results.append(await asyncio.wait_for(fresh_client(port, user, step), LOGIN_TIMEOUT))
        except Exception as exc:
            errors.append(step.failure(exc))
            if len(errors) == 2:
                break
    if not results:
        return {"login": None, "list": None, "errors": errors}
    return {
        "login": statistics.median(r[0] for r in results),
        "list": statistics.median(r[1] for r in results),
        "errors": errors,
    }


async def log_in_many(port: int, users: list[str], count: int, concurrency: int) -> tuple[list[Session], Counter[str]]:
    """Sessions logged in, and why the others were not. After GIVE_UP failures in a row the rest are not tried
    (a server out of file descriptors can leave connections unanswered: each would wait LOGIN_TIMEOUT)."""
    sessions: list[Session] = []
    errors: Counter[str] = Counter()
    slots = asyncio.Semaphore(concurrency)
    failures_in_a_row = 0

    async def one(index: int) -> None:
        nonlocal failures_in_a_row
        async with slots:
            if failures_in_a_row >= GIVE_UP:
                errors[f"not tried: {GIVE_UP} logins had failed in a row"] += 1
                return
            step = Step()
            try:
                sessions.append(await asyncio.wait_for(log_in(port, users[index % len(users)], step), LOGIN_TIMEOUT))
            except Exception as exc:
                errors[step.failure(exc)] += 1
                failures_in_a_row += 1
            else:
                failures_in_a_row = 0

    await asyncio.gather(*(one(i) for i in range(count)))
    return sessions, errors


async def noop_sample(sessions: list[Session], sample: int) -> dict[str, Any]:
    chosen = random.Random(0).sample(sessions, min(sample, len(sessions)))
    started = time.perf_counter()
    outcomes = await asyncio.gather(
        *(asyncio.wait_for(s.command("NOOP", 200), 60) for s in chosen), return_exceptions=True
    )
    failed = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)]
    return {
        "asked": len(chosen),
        "answered": len(chosen) - len(failed),
        "seconds": time.perf_counter() - started,
        "errors": dict(Counter(failed)),
    }


async def idle_clients(config: dict[str, Any]) -> dict[str, Any]:
    port, users, pid = config["port"], config["users"], config["server_pid"]
    result: dict[str, Any] = {"nofile": raise_nofile(), "rss_start_kib": vm_kib(pid, "VmRSS")}
    warm, warm_errors = await log_in_many(port, users, config["warmup"], config["concurrency"])
    for session in warm:
        session.close()
    result["warmup"] = {"ok": len(warm), "errors": dict(warm_errors)}
    await asyncio.sleep(2)
    result["fresh_before"] = await fresh_clients(port, users[0], 5)
    await asyncio.sleep(1)
    result["rss_before_kib"] = vm_kib(pid, "VmRSS")
    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    sessions, errors = await log_in_many(port, users, config["sessions"], config["concurrency"])
    result["login_seconds"] = time.perf_counter() - started
    result["login_cpu"] = cpu_seconds(pid) - cpu_before
    result["logged_in"], result["errors"] = len(sessions), dict(errors)
    await asyncio.sleep(3)
    result["rss_after_kib"] = vm_kib(pid, "VmRSS")
    result["hwm_kib"] = vm_kib(pid, "VmHWM")
    result["noop"] = await noop_sample(sessions, 100)
    result["fresh_beside"] = await fresh_clients(port, users[0], 5)
    result["noop_all"] = await noop_sample(sessions, len(sessions))
    result["alive_with_sessions"] = running(pid)
    for session in sessions:
        session.close()
    await asyncio.sleep(0.5)
    return result


# == pyftpdlib, the peer (runs in its own process) ========================================================


def serve_pyftpdlib(config: dict[str, Any]) -> None:
    import logging

    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.log import config_logging
    from pyftpdlib.servers import FTPServer

    config_logging(level=logging.WARNING)
    authorizer = DummyAuthorizer()
    for user in config["users"]:
        home = Path(config["root"]) / user
        home.mkdir(parents=True, exist_ok=True)
        authorizer.add_user(user, PASSWORD, str(home), perm="elradfmwMT")

    class Handler(FTPHandler):  # type: ignore[misc]
        pass

    Handler.authorizer = authorizer
    Handler.passive_ports = list(range(config["passive"][0], config["passive"][1] + 1))
    Handler.timeout = config["idle_timeout"]
    server = FTPServer((HOST, 0), Handler)
    server.max_cons = 0  # no limit (default 512)
    server.max_cons_per_ip = 0
    print(f"listening on ftp://{HOST}:{server.address[1]}", flush=True)
    server.serve_forever()


# == the orchestrator ======================================================================================


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path | None = None


@dataclass
class ChurnResult:
    server: str
    clients: int
    seconds: float
    cycles: int
    latencies: list[float]
    errors: Counter[str]
    server_cpu: float
    client_cpu: float
    other_cpu: float

    @property
    def rate(self) -> float:
        return self.cycles / self.seconds if self.seconds else 0.0


@dataclass
class Setup:
    work: Path
    users: list[str]
    database: str
    env: dict[str, str]
    gateway_max_connections: int | None
    logs: list[Path] = field(default_factory=list)


def internal(role: str, config: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__)), role, json.dumps(config)]


def start_pyftpdlib(setup: Setup, tag: str, idle_timeout: float = GATEWAY_IDLE_TIMEOUT) -> Server:
    log = setup.work / f"pyftpdlib-{tag}.log"
    config = {
        "root": str(setup.work / "pyftpdlib"),
        "users": setup.users,
        "passive": passive_range(PASSIVE_PORTS, 1000),
        "idle_timeout": idle_timeout,
    }
    with log.open("ab") as stderr:
        process = subprocess.Popen(internal("_pyftpdlib", config), stdout=subprocess.PIPE, stderr=stderr)
    line = process.stdout.readline().decode() if process.stdout else ""
    if not line.startswith("listening on ftp://"):
        process.kill()
        raise SystemExit(f"pyftpdlib did not start: {line!r}; {log.read_text(errors='replace')[-2000:]}")
    return Server("pyftpdlib", process, int(line.strip().rsplit(":", 1)[1]), log)


def start_gateway_server(
    setup: Setup,
    tag: str,
    max_connections: int | None,
    idle_timeout: float = GATEWAY_IDLE_TIMEOUT,
    workers: int | None = None,
) -> Server:
    env = {**setup.env, "FTP_GATEWAY_TIMEOUTS__IDLE": str(idle_timeout)}
    if workers is not None:
        env["FTP_GATEWAY_WORKERS"] = str(workers)
    if max_connections is not None:
        env["FTP_GATEWAY_LIMITS__MAX_CONNECTIONS"] = str(max_connections)
    log = setup.work / f"gateway-{tag}.log"
    process, port = start_gateway(
        setup.database,
        env,
        log,
        passive_range(PASSIVE_PORTS),
        "--storage",
        f"file://{setup.work / 'gateway'}/{{username}}",
    )
    return Server("gateway", process, port, log)


def run_internal(role: str, config: dict[str, Any]) -> dict[str, Any]:
    result = subprocess.run(internal(role, config), capture_output=True, check=False)
    if result.returncode != 0:
        raise SystemExit(
            f"load generator {role} failed (exit code {result.returncode}): "
            f"{result.stderr.decode(errors='replace')[-3000:]} {result.stdout.decode(errors='replace')[-1000:]}"
        )
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def churn_once(
    server: Server, users: list[str], clients: int, duration: float, processes: int, size: int
) -> ChurnResult:
    share = [clients // processes + (i < clients % processes) for i in range(processes)]
    start_at = time.time() + 1.5  # the generators' Python starts meanwhile
    launched, first = [], 0
    for count in share:
        config = {
            "port": server.port,
            "users": users,
            "first": first,
            "count": count,
            "start_at": start_at,
            "duration": duration,
            "size": size,
        }
        launched.append(subprocess.Popen(internal("_churn", config), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        first += count
    client_before = children_cpu_seconds()
    time.sleep(max(0.0, start_at - time.time()))
    server_before, machine_before = tree_cpu_seconds(server.process.pid), machine_busy_seconds()
    outputs = [p.communicate() for p in launched]
    server_cpu = tree_cpu_seconds(server.process.pid) - server_before
    machine = machine_busy_seconds() - machine_before
    client_cpu = children_cpu_seconds() - client_before
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    last_end = start_at
    for process, (stdout, stderr) in zip(launched, outputs, strict=True):
        if process.returncode != 0:
            raise SystemExit(f"load generator failed: {stderr.decode(errors='replace')[-3000:]}")
        part = json.loads(stdout)
        latencies += part["latencies"]
        errors.update(part["errors"])
        last_end = max(last_end, part["last_end"])
    return ChurnResult(
        server.name,
        clients,
        last_end - start_at,
        len(latencies),
        latencies,
        errors,
        server_cpu,
        client_cpu,
        machine - server_cpu - client_cpu,
    )


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_churn(setup: Setup, args: argparse.Namespace) -> list[ChurnResult]:
    results: list[ChurnResult] = []
    servers = []
    if "gateway" in args.servers:
        servers.append(start_gateway_server(setup, "churn", setup.gateway_max_connections))
    if "pyftpdlib" in args.servers:
        servers.append(start_pyftpdlib(setup, "churn"))
    setup.logs += [s.log for s in servers if s.log]
    try:
        for server in servers:  # warm-up: first logins, passive ports, worker threads, page cache
            churn_once(server, setup.users, min(10, max(args.clients)), 1.0, 1, args.size_kib * 1024)
        for index, clients in enumerate(args.clients):
            order = servers if index % 2 == 0 else list(reversed(servers))
            for server in order:
                quiet_machine(args.quiet_wait)
                result = churn_once(
                    server, setup.users, clients, args.duration, args.client_processes, args.size_kib * 1024
                )
                results.append(result)
                print(
                    f"churn {server.name:9} C={clients:<4} {result.rate:8.1f} cycles/s  {result.cycles} cycles, "
                    f"{sum(result.errors.values())} failures",
                    flush=True,
                )
    finally:
        for server in servers:
            stop(server.process)
    return results


def run_idle(setup: Setup, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    # Unless given, the gateway's own default: sized from its open-files limit. One worker process: the
    # figures are per process (RSS per session, sessions one process holds).
    max_connections = setup.gateway_max_connections
    for name in args.servers:
        server = (
            start_gateway_server(setup, "idle", max_connections, IDLE_MODE_TIMEOUT, workers=1)
            if name == "gateway"
            else start_pyftpdlib(setup, "idle", IDLE_MODE_TIMEOUT)
        )
        if server.log:
            setup.logs.append(server.log)
        try:
            config = {
                "port": server.port,
                "users": setup.users,
                "server_pid": server.process.pid,
                "sessions": args.sessions,
                "warmup": args.warmup,
                "concurrency": args.login_concurrency,
            }
            quiet_machine(args.quiet_wait)
            print(f"idle {name}: logging in {args.sessions} sessions ...", flush=True)
            result = run_internal("_idle", config)
            result["server_nofile"] = open_files_limit(server.process.pid)
            result["max_connections"] = max_connections if name == "gateway" else None
            result["alive"] = server.process.poll() is None
            results[name] = result
            print(
                f"idle {name:9} {result['logged_in']} of {args.sessions} logged in, "
                f"{result['logged_in'] / result['login_seconds']:.1f} logins/s",
                flush=True,
            )
        finally:
            stop(server.process)
    return results


def open_files_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft}/{hard}"
    return "?"


def argon2_cpu_ms() -> float:
    """CPU ms of one argon2id verify with the gateway's parameters, in this process."""
    from gateway.users.passwords import make_hasher

    hasher = make_hasher()
    digest = hasher.hash(PASSWORD)
    started = time.process_time()
    for _ in range(10):
        hasher.verify(digest, PASSWORD)
    return (time.process_time() - started) * 100


# -- printing -------------------------------------------------------------------------------------------------


def print_churn(results: list[ChurnResult], args: argparse.Namespace) -> None:
    print()
    print(
        f"churn: each cycle = connect, USER/PASS, TYPE I, STOR {args.size_kib} KiB, RETR, LIST, DELE, QUIT; "
        f"{args.duration:g} s per run, {args.client_processes} load-generator process(es), {len(args.users_list)} users"
    )
    print(
        f"{'server':10} {'C':>4} {'cycles/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cycles':>7} {'failures':>9} "
        f"{'server CPU ms/cycle':>20} {'server CPU %':>13} {'client CPU %':>13} {'other CPU %':>12}"
    )
    for r in results:
        per_cycle = r.server_cpu / r.cycles * 1000 if r.cycles else math.nan
        print(
            f"{r.server:10} {r.clients:4} {r.rate:9.1f} {percentile(r.latencies, 0.5) * 1000:8.1f} "
            f"{percentile(r.latencies, 0.99) * 1000:8.1f} {r.cycles:7} {sum(r.errors.values()):9} {per_cycle:20.2f} "
            f"{r.server_cpu / r.seconds * 100:13.0f} {r.client_cpu / r.seconds * 100:13.0f} "
            f"{r.other_cpu / r.seconds * 100:12.0f}"
        )
    for clients in args.clients:
        pair = {r.server: r for r in results if r.clients == clients}
        if "gateway" in pair and "pyftpdlib" in pair and pair["pyftpdlib"].rate:
            gw, peer = pair["gateway"], pair["pyftpdlib"]
            cpu_ratio = (
                (gw.server_cpu / gw.cycles) / (peer.server_cpu / peer.cycles) if gw.cycles and peer.cycles else math.nan
            )
            print(
                f"ratio gateway/pyftpdlib C={clients}: cycles/s {gw.rate / peer.rate:.3f}x, "
                f"server CPU per cycle {cpu_ratio:.1f}x"
            )
    print("(CPU %: of one CPU over the run; 200 = both CPUs of this machine. other = the rest of the machine)")
    for r in results:
        for message, count in r.errors.most_common(5):
            print(f"  {r.server} C={r.clients} failure x{count}: {message}")


def print_idle(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print()
    print(
        f"idle: {args.sessions} sessions logged in ({args.login_concurrency} logins in flight), "
        f"RSS baseline after {args.warmup} sessions logged in and closed"
    )
    print(
        f"{'server':10} {'logged in':>10} {'logins/s':>9} {'CPU ms/login':>13} {'RSS before MiB':>15} "
        f"{'RSS after MiB':>14} {'KiB/session':>12} {'fresh login ms':>15} {'fresh LIST ms':>14}"
    )
    per_session: dict[str, float] = {}
    for name, r in results.items():
        ok = r["logged_in"]
        growth = (r["rss_after_kib"] - r["rss_before_kib"]) / ok if ok else math.nan
        per_session[name] = growth
        for label, fresh in (("before", r["fresh_before"]), ("beside", r["fresh_beside"])):
            login = f"{fresh['login'] * 1000:15.1f}" if fresh["login"] is not None else f"{'failed':>15}"
            listing = f"{fresh['list'] * 1000:14.1f}" if fresh["list"] is not None else f"{'failed':>14}"
            if label == "before":
                print(f"{name:10} {'(0 idle)':>10} {'':9} {'':13} {'':15} {'':14} {'':12} {login} {listing}")
            else:
                print(
                    f"{name:10} {ok:10} {ok / r['login_seconds']:9.1f} {r['login_cpu'] / max(ok, 1) * 1000:13.1f} "
                    f"{r['rss_before_kib'] / 1024:15.1f} {r['rss_after_kib'] / 1024:14.1f} {growth:12.1f} "
                    f"{login} {listing}"
                )
    if per_session.get("pyftpdlib") and "gateway" in per_session:
        print(f"ratio gateway/pyftpdlib RSS per idle session: {per_session['gateway'] / per_session['pyftpdlib']:.1f}x")
    for name, r in results.items():
        noop = r["noop"]
        print(
            f"{name}: NOOP on {noop['asked']} idle sessions: {noop['answered']} answered "
            f"in {noop['seconds'] * 1000:.0f} ms; "
            f"at the end NOOP on all {r['noop_all']['asked']}: {r['noop_all']['answered']} answered; "
            f"RSS at start {r['rss_start_kib'] / 1024:.1f} MiB, peak {r['hwm_kib'] / 1024:.1f} MiB; "
            f"server's open-files limit {r['server_nofile']}"
            + (f"; limits.max_connections {r['max_connections']}" if r["max_connections"] else "")
            + ("" if r["alive_with_sessions"] else "; THE SERVER PROCESS HAD EXITED while the sessions were open")
            + ("" if r["alive"] or not r["alive_with_sessions"] else "; the server exited once they were closed")
        )
        refused = sum(r["errors"].values())
        if refused:
            print(f"  {refused} of {args.sessions} logins failed:")
            for message, count in Counter(r["errors"]).most_common(5):
                print(f"    x{count}: {message}")
        for label in ("fresh_before", "fresh_beside"):
            for message in r[label]["errors"][:3]:
                print(f"  fresh client ({label}) failed: {message}")
        for message, count in (Counter(noop["errors"]) + Counter(r["noop_all"]["errors"])).most_common(3):
            print(f"  NOOP failed x{count}: {message}")
        if r["warmup"]["errors"]:
            print(f"  warm-up failures: {r['warmup']['errors']}")


# -- main -------------------------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] in INTERNAL:
        INTERNAL[sys.argv[1]](json.loads(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=["churn", "idle", "both"], default="both")
    parser.add_argument("--clients", type=int, nargs="+", default=[50, 200], help="churn: clients at once (50 200)")
    parser.add_argument("--duration", type=float, default=10.0, help="churn: seconds per run (10)")
    parser.add_argument("--size-kib", type=int, default=64, help="churn: file size (64)")
    parser.add_argument("--client-processes", type=int, default=1, help="churn: load-generator processes (1)")
    parser.add_argument("--sessions", type=int, default=10_000, help="idle: sessions (10000)")
    parser.add_argument("--warmup", type=int, default=100, help="idle: sessions logged in and closed first (100)")
    parser.add_argument("--login-concurrency", type=int, default=100, help="idle: logins in flight (100)")
    parser.add_argument(
        "--servers", nargs="+", choices=["gateway", "pyftpdlib"], default=["gateway", "pyftpdlib"], help="(both)"
    )
    parser.add_argument("--users", type=int, default=4, help="users the clients are spread over (4)")
    parser.add_argument(
        "--gateway-max-connections", type=int, help="the gateway's limits.max_connections (default: what idle needs)"
    )
    parser.add_argument(
        "--server-nofile", type=int, help="the servers' soft RLIMIT_NOFILE (default: raised to the hard limit)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="before each run, wait up to this many seconds for other work on the machine to stop (60; 0: never)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (servers' logs, files)")
    parser.add_argument("--quick", action="store_true", help="churn C=20 for 3 s, idle 500 sessions")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.duration, args.sessions = [20], 3.0, 500
    hard = raise_nofile()
    if args.server_nofile:  # the servers inherit it; the load generators raise theirs again
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.server_nofile, hard), hard))
    limit = min(args.server_nofile or hard, hard)
    if args.mode != "churn" and args.sessions + 200 > limit:
        print(
            f"warning: the servers' RLIMIT_NOFILE ({limit}) is below {args.sessions} sessions + 200: expect them to "
            "run out of file descriptors (and the gateway's log to grow fast: asyncio logs each failed accept())"
        )
    args.users_list = [f"load{i}" for i in range(args.users)]
    print(f"argon2id verify with the gateway's parameters: {argon2_cpu_ms():.1f} ms CPU (in this process)", flush=True)

    churn: list[ChurnResult] = []
    idle: dict[str, dict[str, Any]] = {}
    prefix = "ftp-gateway-bench-load-"
    directory = (
        nullcontext(tempfile.mkdtemp(prefix=prefix)) if args.keep else tempfile.TemporaryDirectory(prefix=prefix)
    )
    with directory as tmp:
        work = Path(tmp)
        if args.keep:
            print(f"work directory (kept): {work}", flush=True)
        env = {**os.environ, "FTP_GATEWAY_LOG__LEVEL": "warning"}
        setup = Setup(work, args.users_list, f"sqlite:///{work / 'users.db'}", env, args.gateway_max_connections)
        for user in setup.users:
            add_gateway_user(setup.database, user, PASSWORD, env)
        if args.mode in ("churn", "both"):
            churn = run_churn(setup, args)
        if args.mode in ("idle", "both"):
            idle = run_idle(setup, args)
        problems = [(log, log.stat().st_size, log_problems(log)) for log in setup.logs]

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    if churn:
        print_churn(churn, args)
    if idle:
        print_idle(idle, args)
    print()
    for log, size, (count, first) in problems:
        print(f"{log.name} ({size / MB:.1f} MB): {count} warning/error records" + (", most frequent:" if first else ""))
        for times, text in first:
            print(f"  x{times}: {text}")
    return 0


def _churn_role(config: dict[str, Any]) -> None:
    raise_nofile()
    print(json.dumps(asyncio.run(churn_clients(config))))


def _idle_role(config: dict[str, Any]) -> None:
    print(json.dumps(asyncio.run(idle_clients(config))))


INTERNAL = {"_churn": _churn_role, "_idle": _idle_role, "_pyftpdlib": serve_pyftpdlib}


if __name__ == "__main__":
    raise SystemExit(main())
