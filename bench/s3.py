#!/usr/bin/env python3
"""Upload and download a file through the gateway into S3 (a moto server on loopback) with curl, against
aiobotocore doing the same transfers directly (same endpoint, part size and parts in flight) in the same
run; print both and the ratio, the gateway's peak RSS growth during a 1 GiB upload, and how long HASH
takes for a file uploaded through the gateway (SHA-256 stored while it streamed) and for one written
directly to S3 (read through the hash once, then remembered).

    python bench/s3.py [--size-mib 256] [--runs 3] [--rss-gib 1]

The gateway and moto each run as their own process; the direct transfers run in this one.
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
        [gateway, "serve", "--listen", "127.0.0.1:0", "--database", database, "--passive-ports", f"{low}-{low + 49}"],
        stdout=subprocess.PIPE,
        env=env,
    )
    line = process.stdout.readline().decode() if process.stdout else ""
    if not line.startswith("listening on ftp://"):
        raise SystemExit(f"gateway did not start: {line!r}")
    return process, f"ftp://bench:bench-password@127.0.0.1:{line.strip().rsplit(':', 1)[1]}/"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rss-gib", type=int, default=1)
    args = parser.parse_args()
    moto = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    gateway = str(Path(sys.executable).with_name("ftp-gateway"))
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="ftp-gateway-bench-s3-") as tmp:
        work = Path(tmp)
        source = work / "source.bin"
        with source.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        moto_port = free_port()
        endpoint = f"http://127.0.0.1:{moto_port}"
        moto_process = subprocess.Popen(
            [moto, "-H", "127.0.0.1", "-p", str(moto_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        gateway_process = None
        try:
            wait_for_port(moto_port)
            asyncio.run(make_bucket(endpoint))
            env = {
                **os.environ,
                "FTP_GATEWAY_STORAGE__DEFAULT_URI": f"s3://{BUCKET}/{{username}}",
                "FTP_GATEWAY_S3__ENDPOINT_URL": endpoint,
                "FTP_GATEWAY_S3__ACCESS_KEY_ID": "bench",
                "FTP_GATEWAY_S3__SECRET_ACCESS_KEY": "bench",
                "FTP_GATEWAY_S3__REGION": "us-east-1",
                "FTP_GATEWAY_S3__ADDRESSING_STYLE": "path",
                "FTP_GATEWAY_S3__PART_SIZE": str(PART_SIZE),
                "FTP_GATEWAY_S3__PARTS_IN_FLIGHT": str(PARTS_IN_FLIGHT),
                "FTP_GATEWAY_TIMEOUTS__PATH": "300",
                "FTP_GATEWAY_LOG__LEVEL": "warning",
            }
            database = f"sqlite:///{work / 'users.db'}"
            subprocess.run(
                [gateway, "user", "add", "bench", "--password-stdin", "--database", database],
                input=b"bench-password\n",
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )
            gateway_process, url = start_gateway(gateway, database, env)

            figures: dict[str, list[float]] = {k: [] for k in ("gw up", "gw down", "direct up", "direct down")}
            port = int(url.rsplit(":", 1)[1].strip("/"))
            curl("--upload-file", str(source), url + "warm.bin")  # warm-up: client, pool, moto
            asyncio.run(direct_upload(endpoint, source, "direct-warm.bin"))
            for run in range(args.runs):
                figures["gw up"].append(size / curl("--upload-file", str(source), url + f"run{run}.bin") / MB)
                figures["direct up"].append(size / asyncio.run(direct_upload(endpoint, source, f"d{run}.bin")) / MB)
                figures["gw down"].append(size / timed_retr(port, f"run{run}.bin") / MB)
                figures["direct down"].append(size / asyncio.run(direct_download(endpoint, f"d{run}.bin")) / MB)

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

            # Peak memory of a fresh gateway while it uploads a large file.
            gateway_process.terminate()
            gateway_process.wait(timeout=30)
            gateway_process, url = start_gateway(gateway, database, env)
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
            seconds = curl("--upload-file", str(big), url + "big.bin")
            growth = (vm_kib(pid, "VmHWM") - before) / 1024
        finally:
            if gateway_process is not None:
                gateway_process.terminate()
                gateway_process.wait(timeout=30)
            moto_process.terminate()
            moto_process.wait(timeout=30)

    print(f"{args.size_mib} MiB through moto on loopback, {args.runs} runs after a warm-up; MB/s = 10^6 bytes/s")
    print(f"part size {PART_SIZE // MiB} MiB, {PARTS_IN_FLIGHT} parts in flight for the gateway and the direct client")
    for name, values in figures.items():
        print(f"{name:12} median {statistics.median(values):7.1f}   runs {', '.join(f'{v:.1f}' for v in values)}")
    for direction in ("up", "down"):
        ratio = statistics.median(figures[f"gw {direction}"]) / statistics.median(figures[f"direct {direction}"])
        print(f"ratio gateway/direct {direction:4} {ratio:.2f}x")
    for what, (seconds_taken, _) in hashes.items():
        print(f"{what:34} {seconds_taken * 1000:8.1f} ms ({args.size_mib} MiB, multipart)")
    bound = PART_SIZE * (PARTS_IN_FLIGHT + 1) / MiB + 64
    print(
        f"{args.rss_gib} GiB upload into a fresh gateway: {args.rss_gib * 1024 * MiB / seconds / MB:.1f} MB/s, "
        f"peak RSS growth {growth:.1f} MiB (bound: part size x (parts in flight + 1) + 64 MiB = {bound:.0f} MiB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
