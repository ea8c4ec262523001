#!/usr/bin/env python3
"""moto's S3 server (as ``moto_server`` runs it: werkzeug, a thread per request) with every request counted by
S3 operation, for the benchmarks that report S3 requests per FTP operation.

    python bench/counting_s3.py [--port 0]        # prints "listening on http://127.0.0.1:PORT"

``GET /_bench/counts`` answers the counts so far as JSON ({"PutObject": 12, ...}); nothing else is changed in
moto. The operation is told from the method, the path (path-style addressing: /bucket or /bucket/key), the
query and the x-amz-copy-source header, the way S3's own API reference tells them apart.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

COUNTS_PATH = "/_bench/counts"

BUCKET_OPERATIONS = {
    "PUT": "CreateBucket",
    "HEAD": "HeadBucket",
    "DELETE": "DeleteBucket",
}


def operation(method: str, path: str, query: str, copy_source: bool) -> str:
    """The S3 operation of one path-style request."""
    args = parse_qs(query, keep_blank_values=True)
    bucket, _, key = path.lstrip("/").partition("/")
    if not bucket:
        return "ListBuckets" if method == "GET" else f"{method} /"
    if not key:
        if method == "GET":
            if args.get("list-type") == ["2"]:
                return "ListObjectsV2"
            for name, op in (("uploads", "ListMultipartUploads"), ("location", "GetBucketLocation")):
                if name in args:
                    return op
            return "ListObjects"
        if method == "POST" and "delete" in args:
            return "DeleteObjects"
        return BUCKET_OPERATIONS.get(method, f"{method} bucket?{'&'.join(sorted(args))}")
    upload = "uploadId" in args
    if method == "GET":
        return "ListParts" if upload else "GetObject"
    if method == "HEAD":
        return "HeadObject"
    if method == "PUT":
        if upload and "partNumber" in args:
            return "UploadPartCopy" if copy_source else "UploadPart"
        return "CopyObject" if copy_source else "PutObject"
    if method == "POST":
        if "uploads" in args:
            return "CreateMultipartUpload"
        if upload:
            return "CompleteMultipartUpload"
    if method == "DELETE":
        return "AbortMultipartUpload" if upload else "DeleteObject"
    return f"{method} object?{'&'.join(sorted(args))}"


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class CountingApp:
    """WSGI middleware: counts each request's S3 operation, then hands it to moto."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == COUNTS_PATH:
            with self.lock:
                body = json.dumps(dict(self.counts)).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        name = operation(
            environ["REQUEST_METHOD"], path, environ.get("QUERY_STRING", ""), "HTTP_X_AMZ_COPY_SOURCE" in environ
        )
        with self.lock:
            self.counts[name] += 1
        return self.app(environ, start_response)


def counts(endpoint: str) -> Counter[str]:
    with urllib.request.urlopen(endpoint + COUNTS_PATH, timeout=30) as response:  # noqa: S310 - our own server
        return Counter(json.load(response))


def start(port: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    """This file as a server process; (process, endpoint) once it listens."""
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__)), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    line = process.stdout.readline().decode() if process.stdout else ""
    if not line.startswith("listening on "):
        process.kill()
        raise SystemExit(f"counting moto server did not start: {line!r}")
    return process, line.split()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = CountingApp(DomainDispatcherApplication(create_backend_app))
    server = make_server(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
