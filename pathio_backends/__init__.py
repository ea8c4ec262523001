"""Storage backends: each one an ``aioftp.AbstractPathIO``, reached from a storage URI through :func:`path_io_factory`.

The table below is constant: a backend's module is imported on first use, so an install that only serves
local disk never imports an S3 client.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, TypeVar

from pathio_backends.base import ObjectFacts, StorageFactory

if TYPE_CHECKING:
    from gateway.config import Settings

__all__ = ["BackendResources", "ObjectFacts", "StorageFactory", "check_uri", "path_io_factory", "SCHEMES"]
T = TypeVar("T")

# scheme -> (module, factory class, pip extra that provides its dependencies)
SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "file": ("pathio_backends.local", "LocalStorage", None),
    "s3": ("pathio_backends.s3", "S3Storage", None),
}


class BackendResources:
    """What the backends of one server share (the S3 client and its connection pool): made on first use,
    closed with the server. One per server, never module-level, so two servers in a process share nothing.
    ``facts`` is where backends keep what their objects cannot hold themselves (the gateway's database)."""

    def __init__(self, facts: ObjectFacts | None = None) -> None:
        self.facts = facts
        self._stack = AsyncExitStack()
        self._made: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def get(self, name: str, make: Callable[[AsyncExitStack], Awaitable[T]]) -> T:
        """The resource ``name``, made once by ``make`` (which registers its cleanup on the stack it is given)."""
        if name not in self._made:
            async with self._lock:
                if name not in self._made:
                    self._made[name] = await make(self._stack)
        value: T = self._made[name]
        return value

    async def aclose(self) -> None:
        self._made.clear()
        await self._stack.aclose()


def _split(uri: str) -> tuple[str, str]:
    scheme, sep, rest = uri.partition("://")
    if not sep or not scheme:
        raise ValueError(
            f"storage URI {uri!r} has no scheme (expected one of: {', '.join(s + '://' for s in SCHEMES)})"
        )
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"storage URI {uri!r}: unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    return scheme, rest


def _factory_class(scheme: str) -> type[StorageFactory]:
    module_name, class_name, extra = SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f": install ftp-gateway[{extra}]" if extra else ""
        raise ValueError(f"the {scheme}:// backend cannot be loaded ({exc}){hint}") from exc
    cls: type[StorageFactory] = getattr(module, class_name)
    return cls


def check_uri(uri: str) -> None:
    """Raise ValueError with a readable message if ``uri`` names no usable storage."""
    scheme, rest = _split(uri)
    _factory_class(scheme).check(rest)


def path_io_factory(uri: str, settings: Settings, resources: BackendResources) -> StorageFactory:
    """Turn a storage URI (``file:///srv/ftp/alice``, ``s3://bucket/prefix``) and the server's settings into
    aioftp's path-io factory.

    The result is called as aioftp calls ``path_io_factory`` (``factory(timeout=..., connection=...)``) once
    per session, and its ``base_path`` is what aioftp joins virtual paths onto. ``resources`` holds what the
    server's backends share.
    """
    scheme, rest = _split(uri)
    return _factory_class(scheme).from_uri(uri, rest, settings, resources)
