"""`ftp-gateway dev`: one command, an S3 in the process, a demo login that works."""

from __future__ import annotations

import ftplib
import io
import re
import signal
import subprocess
import sys
from pathlib import Path

import boto3


def test_dev_serves_onto_its_own_s3(tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("ftp-gateway")),
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]
    process = subprocess.Popen(
        [*command, "--data-dir", str(tmp_path / "dev")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        while not lines or not lines[-1].startswith("listening on ftp://"):
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else ""
            lines.append(line.strip())
        text = "\n".join(lines)
        user, password = re.search(r"login: (\S+) / (\S+)", text).groups()  # type: ignore[union-attr]
        endpoint, bucket = re.search(r"S3 endpoint: (\S+)\s+bucket: (\S+)", text).groups()  # type: ignore[union-attr]
        port = int(lines[-1].rsplit(":", 1)[1])

        with ftplib.FTP() as ftp:
            ftp.connect("127.0.0.1", port, timeout=30)
            ftp.login(user, password)
            ftp.storbinary("STOR hello.txt", io.BytesIO(b"hello from ftp"))
            ftp.quit()

        s3 = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
        )
        try:
            body = s3.get_object(Bucket=bucket, Key=f"{user}/hello.txt")["Body"]
            assert body.read() == b"hello from ftp"
            body.close()
        finally:
            s3.close()
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
        stderr = process.stderr.read() if process.stderr else ""
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert (tmp_path / "dev" / "users.db").exists()
