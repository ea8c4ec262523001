#!/usr/bin/env python3
"""Upload and download a file through the gateway into S3 (a moto server on loopback) with curl, against
aiobotocore doing the same transfers directly in the same run; print both and the ratio, the gateway's peak
RSS growth during a 1 GiB upload and download, and how long HASH takes for a file uploaded through the
gateway (SHA-256 stored while it streamed) and for one written directly to S3 (read through the hash once,
then remembered).

    python bench/s3.py [--size-mib 256] [--runs 3] [--rss-gib 1] [--mode all|plain|throttled]
                       [--connection-mbs 50] [--stock-moto]

Uploads: the direct client uses the gateway's part size and parts in flight. Downloads: the gateway reads
ahead in ranges (its defaults), the direct client reads one GetObject stream (what a download was before);
aiobotocore's own ranged GETs (same ranges, same number in flight) are printed for reference.

``plain`` talks to moto directly. ``throttled`` puts ``throttle_proxy.py`` in front of moto, which limits each
TCP connection to ``--connection-mbs`` as S3 limits each of its connections, and times downloads only.

The gateway, moto and the proxy each run as their own process; the direct transfers run in this one. moto is
``moto_server.py`` (stock moto reads a whole object for every ranged GET; ``--stock-moto`` to see it).
Gateway uploads are timed by curl's data phase (time_total - time_pretransfer), downloads from RETR to its 226
with ftplib (the object is opened before the 150, which curl would count as pre-transfer); direct figures time
the same requests (CreateMultipartUpload to CompleteMultipartUpload, GetObject to the end of the body).
"""

from __future__ import annotations

import argparse
import asyncio
import ftplib
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from common import MB, MiB, free_port, vm_kib, wait_for_port
from common import curl as timed_curl

BUCKET = "bench"
PART_SIZE = 8 * MiB
PARTS_IN_FLIGHT = 4
# The gateway's download settings are its defaults (s3.download_range_size, s3.download_ranges_in_flight).
DOWNLOAD_RANGE = 8 * MiB
RANGES_IN_FLIGHT = 4


def client_context(endpoint: str):  # type: ignore[no-untyped-def]
    config = AioConfig(
        s3={"addressing_style": "path", "payload_signing_enabled": False},
        max_pool_connections=64,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
        config=config,
    )


async def direct_upload(endpoint: str, source: Path, key: str) -> float:
    """A multipart upload as the gateway does it: parts read in order, PARTS_IN_FLIGHT sent at once."""
    async with client_context(endpoint) as s3:
        started = time.perf_counter()
        upload_id = (await s3.create_multipart_upload(Bucket=BUCKET, Key=key))["UploadId"]
        slots = asyncio.Semaphore(PARTS_IN_FLIGHT)
        parts: list[dict[str, object]] = []
        tasks = []

        async def send(number: int, body: bytes) -> None:
            try:
                response = await s3.upload_part(
                    Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )
                parts.append({"PartNumber": number, "ETag": response["ETag"]})
            finally:
                slots.release()

        with source.open("rb") as f:
            number = 1
            while body := f.read(PART_SIZE):
                await slots.acquire()
                tasks.append(asyncio.create_task(send(number, body)))
                number += 1
        await asyncio.gather(*tasks)
        parts.sort(key=lambda part: part["PartNumber"])  # type: ignore[arg-type, return-value]
        await s3.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
        return time.perf_counter() - started


async def direct_download(endpoint: str, key: str) -> float:
    async with client_context(endpoint) as s3:
        started = time.perf_counter()
        response = await s3.get_object(Bucket=BUCKET, Key=key)
        async with response["Body"] as body:
            while await body.read(MiB):
                pass
        return time.perf_counter() - started


async def direct_ranged_download(endpoint: str, key: str, size: int) -> float:
    """The object in DOWNLOAD_RANGE ranges, RANGES_IN_FLIGHT at once (a reference for the gateway's read-ahead)."""
    async with client_context(endpoint) as s3:
        started = time.perf_counter()
        slots = asyncio.Semaphore(RANGES_IN_FLIGHT)

        async def fetch(start: int) -> None:
            async with slots:
                end = min(start + DOWNLOAD_RANGE, size) - 1
                response = await s3.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={start}-{end}")
                async with response["Body"] as body:
                    while await body.read(MiB):
                        pass

        await asyncio.gather(*(fetch(start) for start in range(0, size, DOWNLOAD_RANGE)))
        return time.perf_counter() - started


async def make_bucket(endpoint: str) -> None:
    async with client_context(endpoint) as s3:
        await s3.create_bucket(Bucket=BUCKET)


def curl(*args: str) -> float:
    """Seconds of curl's data phase."""
    pre, total = timed_curl(*args)
    return total - pre


def timed_retr(port: int, name: str) -> float:
    """Seconds from RETR to its 226, all of the download the gateway does: opening the object (its GetObject
    goes out before the 150, which curl would count as pre-transfer) and sending it."""
    buffer = memoryview(bytearray(MiB))
    with ftplib.FTP() as client:  # noqa: S321 - FTP is what is measured
        client.connect("127.0.0.1", port)
        client.login("bench", "bench-password")
        client.voidcmd("TYPE I")
        started = time.perf_counter()
        with client.transfercmd(f"RETR {name}") as data:
            while data.recv_into(buffer):
                pass
        client.voidresp()
        return time.perf_counter() - started


def timed_hash(port: int, name: str) -> tuple[float, str]:
    """Seconds for one HASH command (after login), and the digest it gave."""
    with ftplib.FTP() as client:  # noqa: S321 - FTP is what is measured
        client.connect("127.0.0.1", port)
        client.login("bench", "bench-password")
        started = time.perf_counter()
        reply = client.sendcmd(f"HASH {name}")
        return time.perf_counter() - started, reply.split()[3]


def start_gateway(gateway: str, database: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    low = free_port() % 10000 + 20000
    process = subprocess.Popen(
        [
            gateway,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--audit-log",
            "off",
            "--log-format",
            "text",
            "--database",
            database,
            "--passive-ports",
            f"{low}-{low + 49}",
        ],
        stdout=subprocess.PIPE,
        env=env,
    )
    line = process.stdout.readline().decode() if process.stdout else ""
    if not line.startswith("listening on ftp://"):
        raise SystemExit(f"gateway did not start: {line!r}")
    return process, f"ftp://bench:bench-password@127.0.0.1:{line.strip().rsplit(':', 1)[1]}/"


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None:
        process.terminate()
        process.wait(timeout=30)


def gateway_env(endpoint: str) -> dict[str, str]:
    return {
        **os.environ,
        "FTP_GATEWAY_STORAGE__DEFAULT_URI": f"s3://{BUCKET}/{{username}}",
        "FTP_GATEWAY_S3__ENDPOINT_URL": endpoint,
        "FTP_GATEWAY_S3__ACCESS_KEY_ID": "bench",
        "FTP_GATEWAY_S3__SECRET_ACCESS_KEY": "bench",
        "FTP_GATEWAY_S3__REGION": "us-east-1",
        "FTP_GATEWAY_S3__ADDRESSING_STYLE": "path",
        # One process: the peak RSS read from /proc is the serving process's own (not a worker's parent).
        "FTP_GATEWAY_WORKERS": "1",
        "FTP_GATEWAY_S3__PART_SIZE": str(PART_SIZE),
        "FTP_GATEWAY_S3__PARTS_IN_FLIGHT": str(PARTS_IN_FLIGHT),
        "FTP_GATEWAY_TIMEOUTS__PATH": "300",
        "FTP_GATEWAY_LOG__LEVEL": "warning",
    }


def start_proxy(upstream_port: int, rate_mbs: float) -> tuple[subprocess.Popen[bytes], int]:
    """``throttle_proxy.py`` in its own process (its copying would otherwise share this one's GIL)."""
    script = Path(__file__).with_name("throttle_proxy.py")
    process = subprocess.Popen(
        [sys.executable, str(script), "--upstream", f"127.0.0.1:{upstream_port}", "--rate-mbs", str(rate_mbs)],
        stdout=subprocess.PIPE,
    )
    line = process.stdout.readline().decode() if process.stdout else ""
    if not line.startswith("listening on "):
        raise SystemExit(f"proxy did not start: {line!r}")
    return process, int(line.split()[-1])


def report(figures: dict[str, list[float]]) -> None:
    for name, values in figures.items():
        print(f"  {name:14} median {statistics.median(values):7.1f}   runs {', '.join(f'{v:.1f}' for v in values)}")


def ratio(figures: dict[str, list[float]], gateway: str, direct: str) -> float:
    return statistics.median(figures[gateway]) / statistics.median(figures[direct])


def plain(args: argparse.Namespace, work: Path, source: Path, endpoint: str, gateway: str, database: str) -> None:
    """Uploads and downloads through the gateway against aiobotocore straight to moto; HASH; peak memory."""
    size = args.size_mib * MiB
    env = gateway_env(endpoint)
    gateway_process, url = start_gateway(gateway, database, env)
    try:
        names = ("gw up", "direct up", "gw down", "direct down", "direct ranged")
        figures: dict[str, list[float]] = {name: [] for name in names}
        port = int(url.rsplit(":", 1)[1].strip("/"))
        curl("--upload-file", str(source), url + "warm.bin")  # warm-up: client, pool, moto
        asyncio.run(direct_upload(endpoint, source, "direct-warm.bin"))
        timed_retr(port, "warm.bin")
        for run in range(args.runs):
            figures["gw up"].append(size / curl("--upload-file", str(source), url + f"run{run}.bin") / MB)
            figures["direct up"].append(size / asyncio.run(direct_upload(endpoint, source, f"d{run}.bin")) / MB)
            figures["gw down"].append(size / timed_retr(port, f"run{run}.bin") / MB)
            figures["direct down"].append(size / asyncio.run(direct_download(endpoint, f"d{run}.bin")) / MB)
            seconds = asyncio.run(direct_ranged_download(endpoint, f"d{run}.bin", size))
            figures["direct ranged"].append(size / seconds / MB)

        # HASH: stored at upload (the gateway's own), streamed once (written by another tool), remembered.
        asyncio.run(direct_upload(endpoint, source, "bench/foreign.bin"))
        with source.open("rb") as f:
            expected = hashlib.file_digest(f, "sha256").hexdigest()
        hashes = {
            "HASH of a gateway upload": timed_hash(port, "run0.bin"),
            "HASH of a foreign object, first": timed_hash(port, "foreign.bin"),
            "HASH of a foreign object, again": timed_hash(port, "foreign.bin"),
        }
        if any(digest != expected for _, digest in hashes.values()):
            raise SystemExit(f"HASH gave a wrong digest: {hashes}")

        # Peak memory of a fresh gateway while it uploads a large file, and of another while it sends it back.
        stop(gateway_process)
        gateway_process, url = start_gateway(gateway, database, env)
        port = int(url.rsplit(":", 1)[1].strip("/"))
        big = work / "big.bin"
        with big.open("wb") as f:
            for _ in range(args.rss_gib * 1024):
                f.write(os.urandom(MiB))
        small = work / "small.bin"
        small.write_bytes(b"warm-up")
        curl("--upload-file", str(small), url + "small.bin")  # the S3 client and its pool exist now
        pid = gateway_process.pid
        before = vm_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        up_seconds = curl("--upload-file", str(big), url + "big.bin")
        up_growth = (vm_kib(pid, "VmHWM") - before) / 1024
        # The download in a fresh gateway too: the memory freed after the upload would hide its buffers.
        stop(gateway_process)
        gateway_process, url = start_gateway(gateway, database, env)
        port = int(url.rsplit(":", 1)[1].strip("/"))
        timed_retr(port, "small.bin")
        pid = gateway_process.pid
        before = vm_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        down_seconds = timed_retr(port, "big.bin")
        down_growth = (vm_kib(pid, "VmHWM") - before) / 1024
    finally:
        stop(gateway_process)

    server = "stock moto_server" if args.stock_moto else "moto (bench/moto_server.py: a range costs its range)"
    print(f"{args.size_mib} MiB through {server} on loopback, {args.runs} runs after a warm-up; MB/s = 10^6 bytes/s")
    print(
        f"uploads: part size {PART_SIZE // MiB} MiB, {PARTS_IN_FLIGHT} parts in flight for the gateway and the direct "
        f"client; downloads: the gateway's defaults ({DOWNLOAD_RANGE // MiB} MiB ranges, {RANGES_IN_FLIGHT} in flight) "
        "against one GetObject stream (direct down); direct ranged: aiobotocore's ranged GETs, the same ranges"
    )
    report(figures)
    for direction in ("up", "down"):
        print(f"  ratio gateway/direct {direction:4} {ratio(figures, f'gw {direction}', f'direct {direction}'):.2f}x")
    print(f"  ratio gateway/direct ranged down {ratio(figures, 'gw down', 'direct ranged'):.2f}x")
    for what, (seconds_taken, _) in hashes.items():
        print(f"  {what:34} {seconds_taken * 1000:8.1f} ms ({args.size_mib} MiB, multipart)")
    up_bound = PART_SIZE * (PARTS_IN_FLIGHT + 1) / MiB + 64
    down_bound = DOWNLOAD_RANGE * RANGES_IN_FLIGHT / MiB + 64
    total = args.rss_gib * 1024 * MiB
    print(
        f"  {args.rss_gib} GiB upload into a fresh gateway: {total / up_seconds / MB:.1f} MB/s, "
        f"peak RSS growth {up_growth:.1f} MiB (bound: part size x (parts in flight + 1) + 64 MiB = {up_bound:.0f} MiB)"
    )
    print(
        f"  {args.rss_gib} GiB download from it: {total / down_seconds / MB:.1f} MB/s, peak RSS growth "
        f"{down_growth:.1f} MiB (bound: range size x ranges in flight + 64 MiB = {down_bound:.0f} MiB)"
    )


def throttled(args: argparse.Namespace, source: Path, moto_port: int, gateway: str, database: str) -> None:
    """Downloads through a proxy that limits each connection, as S3 does: the gateway's ranges against one
    GetObject stream, both through the same proxy."""
    size = args.size_mib * MiB
    proxy_process, proxy_port = start_proxy(moto_port, args.connection_mbs)
    endpoint = f"http://127.0.0.1:{proxy_port}"
    gateway_process = None
    try:
        moto = f"http://127.0.0.1:{moto_port}"
        asyncio.run(direct_upload(moto, source, "bench/limited.bin"))
        asyncio.run(direct_download(moto, "bench/limited.bin"))  # moto reads a new object's bytes at its first GET
        gateway_process, url = start_gateway(gateway, database, gateway_env(endpoint))
        port = int(url.rsplit(":", 1)[1].strip("/"))
        timed_retr(port, "warm.bin")  # warm-up: the S3 client and its pool
        figures: dict[str, list[float]] = {"gw down": [], "direct down": [], "direct ranged": []}
        key = "bench/limited.bin"
        for _ in range(args.runs):
            figures["gw down"].append(size / timed_retr(port, "limited.bin") / MB)
            figures["direct down"].append(size / asyncio.run(direct_download(endpoint, key)) / MB)
            figures["direct ranged"].append(size / asyncio.run(direct_ranged_download(endpoint, key, size)) / MB)
    finally:
        stop(gateway_process)
        stop(proxy_process)
    print(
        f"{args.size_mib} MiB through a proxy limiting each connection to {args.connection_mbs:g} MB/s in front of "
        f"moto, {args.runs} runs; the gateway's defaults ({DOWNLOAD_RANGE // MiB} MiB ranges, {RANGES_IN_FLIGHT} in "
        "flight) against one GetObject stream (direct down); direct ranged: aiobotocore, the same ranges"
    )
    report(figures)
    print(f"  ratio gateway/direct down {ratio(figures, 'gw down', 'direct down'):.2f}x")
    print(f"  ratio gateway/direct ranged down {ratio(figures, 'gw down', 'direct ranged'):.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rss-gib", type=int, default=1)
    parser.add_argument("--mode", choices=("all", "plain", "throttled"), default="all")
    parser.add_argument("--connection-mbs", type=float, default=50.0, help="per-connection limit of the proxy, MB/s")
    parser.add_argument(
        "--stock-moto",
        action="store_true",
        help="moto_server as released (it reads a whole object for each ranged GET), not bench/moto_server.py",
    )
    args = parser.parse_args()
    if args.stock_moto:
        moto = [shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))]
    else:
        moto = [sys.executable, str(Path(__file__).with_name("moto_server.py"))]
    gateway = str(Path(sys.executable).with_name("ftp-gateway"))
    with tempfile.TemporaryDirectory(prefix="ftp-gateway-bench-s3-") as tmp:
        work = Path(tmp)
        source = work / "source.bin"
        with source.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        moto_port = free_port()
        endpoint = f"http://127.0.0.1:{moto_port}"
        moto_process = subprocess.Popen(
            [*moto, "-H", "127.0.0.1", "-p", str(moto_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for_port(moto_port)
            asyncio.run(make_bucket(endpoint))
            database = f"sqlite:///{work / 'users.db'}"
            subprocess.run(
                [gateway, "user", "add", "bench", "--password-stdin", "--database", database],
                input=b"bench-password\n",
                check=True,
                env=gateway_env(endpoint),
                stdout=subprocess.DEVNULL,
            )
            asyncio.run(direct_upload(endpoint, source, "bench/warm.bin"))
            if args.mode in ("all", "plain"):
                plain(args, work, source, endpoint, gateway, database)
            if args.mode in ("all", "throttled"):
                throttled(args, source, moto_port, gateway, database)
        finally:
            stop(moto_process)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
