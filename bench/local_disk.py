#!/usr/bin/env python3
"""Upload and download a file through the gateway (local-disk backend) with curl, and the same through
vsftpd on the same machine in the same run when vsftpd is installed; print MB/s and the ratios.

    python bench/local_disk.py [--size-mib 256] [--runs 5] [--tls]

With --tls both servers serve explicit FTPS (AUTH TLS, PROT P on the data connection, which resumes the
control connection's TLS session: vsftpd's require_ssl_reuse, the gateway's tls.session_reuse) with the same
self-signed ECDSA P-256 certificate, and curl runs with --ssl-reqd.

Two figures per transfer, both from curl's own timers (-w):
  data  = bytes / (time_total - time_pretransfer): the data phase, from the transfer command to its final reply
  whole = bytes / time_total: the whole curl command, including connect and login (argon2id at the gateway,
          anonymous at vsftpd)
Runs alternate between the servers so that drift of the machine hits both alike; medians are quoted.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import MB, MiB, curl, free_port, wait_for_port

VSFTPD_CONFIG = """\
listen=YES
listen_address=127.0.0.1
listen_port={port}
anonymous_enable=YES
local_enable=NO
write_enable=YES
anon_upload_enable=YES
anon_mkdir_write_enable=YES
anon_other_write_enable=YES
anon_root={root}
no_anon_password=YES
anon_umask=022
pasv_enable=YES
pasv_min_port={pasv_min}
pasv_max_port={pasv_max}
pasv_address=127.0.0.1
seccomp_sandbox=NO
background=NO
run_as_launching_user=YES
secure_chroot_dir={empty}
xferlog_enable=NO
"""
VSFTPD_TLS = """\
ssl_enable=YES
allow_anon_ssl=YES
force_anon_logins_ssl=YES
force_anon_data_ssl=YES
ssl_sslv2=NO
ssl_sslv3=NO
require_ssl_reuse=YES
rsa_cert_file={cert}
rsa_private_key_file={key}
"""


def make_certificate(work: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1 (openssl), used by both servers alike."""
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def gateway_command() -> list[str]:
    local = Path(sys.executable).with_name("ftp-gateway")
    return [str(local)] if local.exists() else [sys.executable, "-m", "gateway"]


def start_gateway(work: Path, tls: tuple[Path, Path] | None) -> tuple[subprocess.Popen[bytes], str]:
    database = f"sqlite:///{work / 'users.db'}"
    env = {**os.environ, "FTP_GATEWAY_LOG__LEVEL": "warning"}
    subprocess.run(
        [*gateway_command(), "user", "add", "bench", "--password-stdin", "--database", database],
        input=b"bench-password\n",
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    low = free_port() % 10000 + 20000
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
            f"{low}-{low + 49}",
            "--storage",
            f"file://{work / 'gateway'}/{{username}}",
            *(["--tls-cert", str(tls[0]), "--tls-key", str(tls[1]), "--tls-required"] if tls else []),
        ],
        stdout=subprocess.PIPE,
        env=env,
    )
    line = process.stdout.readline().decode() if process.stdout else ""
    if not line.startswith("listening on ftp://"):
        raise SystemExit(f"gateway did not start: {line!r}")
    port = int(line.strip().rsplit(":", 1)[1])
    return process, f"ftp://bench:bench-password@127.0.0.1:{port}/"


def start_vsftpd(work: Path, tls: tuple[Path, Path] | None) -> tuple[subprocess.Popen[bytes], str] | None:
    binary = shutil.which("vsftpd") or ("/usr/sbin/vsftpd" if os.path.exists("/usr/sbin/vsftpd") else None)
    if binary is None:
        return None
    root, empty = work / "vsftpd", work / "vsftpd-empty"
    root.mkdir()
    empty.mkdir()
    port = free_port()
    low = port % 10000 + 20100
    config = work / "vsftpd.conf"
    text = VSFTPD_CONFIG.format(port=port, root=root, empty=empty, pasv_min=low, pasv_max=low + 49)
    config.write_text(text + (VSFTPD_TLS.format(cert=tls[0], key=tls[1]) if tls else ""))
    process = subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, process)
    return process, f"ftp://anonymous:bench@127.0.0.1:{port}/"


def measure(url: str, source: Path, size: int, run: int, tls: list[str]) -> dict[str, tuple[float, float]]:
    # A new name each run: replacing a file would time the old file's deletion too (vsftpd truncates it
    # before its 150 reply, the gateway frees it when the new one is renamed into place).
    name = f"bench-{run}.bin"
    up = curl(*tls, "--upload-file", str(source), url + name)
    down = curl(*tls, "--output", os.devnull, url + name)
    curl(*tls, "--quote", f"DELE {name}", "--list-only", url)
    return {
        "upload": (size / (up[1] - up[0]) / MB, size / up[1] / MB),
        "download": (size / (down[1] - down[0]) / MB, size / down[1] / MB),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tls", action="store_true", help="explicit FTPS on both servers (curl --ssl-reqd)")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed")
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="ftp-gateway-bench-") as tmp:
        work = Path(tmp)
        source = work / "source.bin"
        with source.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        tls = make_certificate(work) if args.tls else None
        curl_tls = ["--ssl-reqd", "--cacert", str(tls[0])] if tls else []
        servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {"gateway": start_gateway(work, tls)}
        try:
            vsftpd = start_vsftpd(work, tls)
            if vsftpd is not None:
                servers["vsftpd"] = vsftpd
            else:
                print("vsftpd not installed: gateway figures only (apt-get install vsftpd for the comparison)")
            results: dict[str, dict[str, list[tuple[float, float]]]] = {
                s: {"upload": [], "download": []} for s in servers
            }
            for _, url in servers.values():  # warm-up: page cache, first login, pool
                measure(url, source, size, -1, curl_tls)
            for run in range(args.runs):
                order = list(servers) if run % 2 == 0 else list(reversed(servers))
                for name in order:
                    for direction, figures in measure(servers[name][1], source, size, run, curl_tls).items():
                        results[name][direction].append(figures)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=15)

    mode = "explicit FTPS (PROT P)" if args.tls else "plain FTP"
    print(f"{args.size_mib} MiB over loopback with curl, {mode}, {args.runs} runs after a warm-up; MB/s = 10^6 bytes/s")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'server':8} {'direction':9} {'data median':>12} {'(min-max)':>15} {'whole median':>13}")
    medians: dict[tuple[str, str], tuple[float, float]] = {}
    for name, directions in results.items():
        for direction, figures in directions.items():
            data = [f[0] for f in figures]
            whole = [f[1] for f in figures]
            medians[name, direction] = (statistics.median(data), statistics.median(whole))
            spread = f"({min(data):.0f}-{max(data):.0f})"
            print(
                f"{name:8} {direction:9} {statistics.median(data):12.0f} {spread:>15} {statistics.median(whole):13.0f}"
            )
    if "vsftpd" in results:
        for direction in ("upload", "download"):
            gw, vs = medians["gateway", direction], medians["vsftpd", direction]
            print(f"ratio gateway/vsftpd {direction:9} data {gw[0] / vs[0]:.2f}x  whole {gw[1] / vs[1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
