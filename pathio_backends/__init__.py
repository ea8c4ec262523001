"""Storage backends: each one an ``aioftp.AbstractPathIO`` (``base.TransactionalPathIO``), reached from a storage
URI through :func:`path_io_factory`.

A backend's module is imported on first use, so an install that only serves local disk never imports an S3
client.
"""

from __future__ import annotations

from pathio_backends.base import StorageFactory
from pathio_backends.resources import BackendResources
from pathio_backends.uri import FileLocation, parse_uri

__all__ = ["BackendResources", "StorageFactory", "path_io_factory"]


def path_io_factory(uri: str, resources: BackendResources) -> StorageFactory:
    """Turn a storage URI (``file:///srv/ftp/alice``, ``s3://bucket/prefix``) into aioftp's path-io factory.

    The result is called as aioftp calls ``path_io_factory`` (``factory(timeout=..., connection=...)``) once
    per session, and its ``base_path`` is what aioftp joins virtual paths onto. ``resources`` holds what the
    server's backends share. ValueError (one readable line) if the URI names no storage.
    """
    location = parse_uri(uri)
    if isinstance(location, FileLocation):
        from pathio_backends.local import LocalStorage

        return LocalStorage(uri, location)
    try:
        from pathio_backends.s3.pathio import S3Storage
    except ImportError as exc:
        raise ValueError(f"the s3:// backend cannot be loaded ({exc})") from exc
    return S3Storage(uri, location, resources)
