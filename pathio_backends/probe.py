"""Is a storage usable from here? One bounded probe per storage URI, for ``ftp-gateway check`` and ``user add``/``set``.

* ``s3://bucket/prefix``: HeadBucket, and with ``write`` a small object put under the prefix and deleted again
  (the same write arguments as uploads, so a bucket policy that demands encryption is honoured).
* ``file:///path``: the directory is there (with ``write``: a file created in it and removed), or, since a user's
  directory is made at the first login, the nearest directory above it that exists must let it be created (a
  directory made and removed there). The probe never leaves the user's directory created.

The trap it avoids: a storage that only fails at the first login, as ``530 Login refused: storage unavailable``,
long after the operator who made the mistake has gone. Every failure is one line (:class:`StorageUnavailable`),
never a traceback, and the whole probe is bounded by ``seconds``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Callable
from typing import Any

from pathio_backends.base import RESERVED_PREFIX
from pathio_backends.resources import BackendResources
from pathio_backends.uri import FileLocation, parse_uri


class StorageUnavailable(Exception):
    """The storage cannot be used as configured; the message is one line, without credentials."""


async def probe_storage(uri: str, resources: BackendResources, *, write: bool, seconds: float) -> str:
    """Check the storage ``uri`` names within ``seconds``; return a few words on what was found ("writable", "does
    not exist yet: created at the first login"), or raise :class:`StorageUnavailable`."""
    try:
        location = parse_uri(uri)
    except ValueError as exc:
        raise StorageUnavailable(str(exc)) from None
    try:
        async with asyncio.timeout(seconds):
            if isinstance(location, FileLocation):
                return await _in_daemon_thread(_probe_directory, location.path, write)
            return await _probe_s3(location.bucket, location.prefix, resources, write)
    except TimeoutError:
        raise StorageUnavailable(f"no answer within {seconds:g} s") from None
    except OSError as exc:
        raise StorageUnavailable(_one_line(exc)) from None
    except ImportError as exc:
        raise StorageUnavailable(f"the s3:// backend cannot be loaded ({exc})") from None
    except StorageUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - anything else is still one line for the operator, not a traceback
        raise StorageUnavailable(f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None


def template_root(template: str) -> str | None:
    """The storage every user's own one goes under, for a template with ``{username}`` (``s3://ftp/users/{username}``
    -> ``s3://ftp/users/``, ``file:///srv/ftp/{username}`` -> ``file:///srv/ftp/``); the template itself without one;
    None when no such storage exists (the bucket's name depends on the user). What to probe for the default
    storage: it must exist (S3) or be creatable (local disk) for a first login to succeed."""
    if "{username}" not in template:
        return template
    head = template[: template.index("{username}")]
    root = head[: head.rfind("/") + 1]
    try:
        parse_uri(root)
    except ValueError:
        return None
    return root


async def _in_daemon_thread(func: Callable[..., str], *args: Any) -> str:
    """``func(*args)`` in a thread of its own that the process does not wait for at exit: a directory on a hung
    network filesystem blocks its thread for good, and ``asyncio.to_thread``'s executor is waited for when
    ``asyncio.run`` ends, which would hang ``ftp-gateway check`` past its timeout."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def settle(result: str | None, exc: BaseException | None) -> None:
        if future.done():
            return  # the caller gave up (timeout)
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result or "")

    def run() -> None:
        try:
            outcome: tuple[str | None, BaseException | None] = (func(*args), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the loop has ended meanwhile: nobody waits for this answer any more

    threading.Thread(target=run, name="storage-probe", daemon=True).start()
    return await future


def _one_line(exc: OSError) -> str:
    text = exc.strerror or str(exc) or type(exc).__name__
    return " ".join(text.split())


def _probe_directory(path: str, write: bool) -> str:
    if os.path.isdir(path):
        if write:
            probe = os.path.join(path, f"{RESERVED_PREFIX}probe-{secrets.token_hex(6)}")
            try:
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            except OSError as exc:
                raise StorageUnavailable(f"{path} is not writable: {exc.strerror}") from None
            os.unlink(probe)
            return "writable"
        return "readable"
    if os.path.lexists(path):
        raise StorageUnavailable(f"{path} exists and is not a directory")
    ancestor = os.path.dirname(path)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise StorageUnavailable(f"{path} cannot be created: {ancestor} is not a directory")
    if write:
        probe = os.path.join(ancestor, f"{RESERVED_PREFIX}probe-{secrets.token_hex(6)}")
        try:
            os.mkdir(probe, 0o700)
        except OSError as exc:
            raise StorageUnavailable(f"{path} cannot be created in {ancestor}: {exc.strerror}") from None
        os.rmdir(probe)
    return "does not exist yet: created at the first login"


async def _probe_s3(bucket: str, prefix: str, resources: BackendResources, write: bool) -> str:
    from pathio_backends.s3.client import S3Context

    ctx = S3Context(resources.s3_settings, resources.s3, None, bucket, prefix, resources.observer)
    await ctx.call("head_bucket")
    if not write:
        return "reachable"
    key = f"{prefix}{RESERVED_PREFIX}probe-{secrets.token_hex(6)}"
    await ctx.call("put_object", Key=key, Body=b"", **ctx.write_args)
    await ctx.call("delete_object", Key=key)
    return "reachable, writable"
