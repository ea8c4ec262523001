"""The one table from S3's answers to the builtin exceptions backends raise (aioftp's ``PathIO`` raises them too).

No logging here: ``gateway.errors`` logs each failure once, with the S3 error code and message carried in the
exception's text.
"""

from __future__ import annotations

import asyncio
import errno

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

# What an S3 call can fail with, translated by :func:`translate`.
S3_ERRORS = (ClientError, BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError)

# S3 error code (or HTTP status) -> (exception type, errno). Everything else is EIO.
ERROR_CODES: dict[str, tuple[type[OSError], int]] = {
    "NoSuchKey": (FileNotFoundError, errno.ENOENT),
    "NotFound": (FileNotFoundError, errno.ENOENT),
    "404": (FileNotFoundError, errno.ENOENT),
    "NoSuchBucket": (OSError, errno.ENXIO),
    "AccessDenied": (PermissionError, errno.EACCES),
    "AllAccessDisabled": (PermissionError, errno.EACCES),
    "InvalidAccessKeyId": (PermissionError, errno.EACCES),
    "SignatureDoesNotMatch": (PermissionError, errno.EACCES),
    "AccountProblem": (PermissionError, errno.EACCES),
    "403": (PermissionError, errno.EACCES),
    "SlowDown": (OSError, errno.EBUSY),
    "ServiceUnavailable": (OSError, errno.EBUSY),
    "503": (OSError, errno.EBUSY),
    "RequestTimeout": (TimeoutError, errno.ETIMEDOUT),
    "EntityTooLarge": (OSError, errno.EFBIG),
    "KeyTooLongError": (OSError, errno.ENAMETOOLONG),
    "InvalidRange": (OSError, errno.EINVAL),
    "QuotaExceeded": (OSError, errno.EDQUOT),
    "XMinioStorageFull": (OSError, errno.ENOSPC),
    "PreconditionFailed": (OSError, errno.EAGAIN),
}


def translate(exc: BaseException, operation: str, key: str | None) -> OSError:
    """A builtin OSError for an aiobotocore failure of ``operation`` (``PutObject``) on ``key``."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        kind, number = ERROR_CODES.get(code) or ERROR_CODES.get(status) or (OSError, errno.EIO)
        message = str(error.get("Message", "")).strip()
        return kind(number, f"S3 {operation}: {code or '-'} (HTTP {status or '-'}) {message}".rstrip(), key)
    if isinstance(exc, EndpointConnectionError):
        return OSError(errno.ECONNREFUSED, f"S3 {operation}: endpoint unreachable: {exc}", key)
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError | asyncio.TimeoutError):
        return TimeoutError(errno.ETIMEDOUT, f"S3 {operation}: timed out: {exc}", key)
    if isinstance(exc, NoCredentialsError):
        return PermissionError(errno.EACCES, f"S3 {operation}: no credentials", key)
    return OSError(errno.EIO, f"S3 {operation}: {type(exc).__name__}: {exc}", key)
