"""Storage URIs: ``file:///absolute/path``, ``file://./relative/path`` and ``s3://bucket/prefix``.

A leaf: it imports nothing of the gateway or of the backends, so the configuration and the user store check a
URI without loading a backend (and a local-disk install never imports an S3 client).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote

SCHEMES = ("file", "s3")
BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")


@dataclass(frozen=True)
class FileLocation:
    """A directory on local disk, absolute (a relative URI is taken from the server's working directory)."""

    path: str


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix inside it: ``""`` or ``"a/b/"`` (no leading slash, one trailing slash)."""

    bucket: str
    prefix: str


Location = FileLocation | S3Location


def parse_uri(uri: str) -> Location:
    """The location a storage URI names; ValueError with a readable message if it names none."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not scheme:
        expected = ", ".join(s + "://" for s in SCHEMES)
        raise ValueError(f"storage URI {uri!r} has no scheme (expected one of: {expected})")
    scheme = scheme.lower()
    if scheme == "file":
        return _file(rest)
    if scheme == "s3":
        return _s3(rest)
    raise ValueError(f"storage URI {uri!r}: unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")


def check_uri(uri: str) -> None:
    """Raise ValueError with a readable message if ``uri`` names no usable storage."""
    parse_uri(uri)


def _file(rest: str) -> FileLocation:
    path = unquote(rest)
    if not (path.startswith("/") or path in (".", "..") or path.startswith(("./", "../"))):
        raise ValueError(f"file://{rest}: expected file:///absolute/path or file://./relative/path (no host part)")
    if "\x00" in path:
        raise ValueError("file:// path contains a NUL byte")
    return FileLocation(os.path.abspath(path))


def _s3(rest: str) -> S3Location:
    bucket, _, prefix = unquote(rest).partition("/")
    parts = [part for part in prefix.split("/") if part]
    if not BUCKET_NAME.fullmatch(bucket):
        raise ValueError(f"s3://{rest}: {bucket!r} is not a valid bucket name")
    if any(part in (".", "..") or "\x00" in part for part in parts):
        raise ValueError(f"s3://{rest}: the prefix may not contain '.', '..' or NUL")
    return S3Location(bucket, "".join(part + "/" for part in parts))
