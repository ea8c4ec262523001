"""What the backends of one server share: their settings, the facts store, and the S3 client made on first use.

One per server, never module-level, so two servers in one process (or two replicas) share nothing by accident;
``aclose`` releases what was made, with the server.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from pathio_backends.facts import ObjectFacts
from pathio_backends.observer import NoObserver, StorageObserver
from pathio_backends.s3.settings import S3Settings

if TYPE_CHECKING:
    from pathio_backends.s3.client import S3Shared


class BackendResources:
    def __init__(
        self,
        *,
        s3: S3Settings | None = None,
        facts: ObjectFacts | None = None,
        observer: StorageObserver | None = None,
    ) -> None:
        self.s3_settings = s3 or S3Settings()
        # Where backends keep what their objects cannot hold themselves (the gateway's database), or None.
        self.facts = facts
        # Told of every S3 request and multipart upload (the server's metrics).
        self.observer: StorageObserver = observer or NoObserver()
        self._stack = AsyncExitStack()
        self._s3: S3Shared | None = None
        self._lock = asyncio.Lock()

    async def s3(self) -> S3Shared:
        """The S3 client and janitor, made at the first call (aiobotocore is imported only then)."""
        if self._s3 is None:
            async with self._lock:
                if self._s3 is None:
                    from pathio_backends.s3.client import S3Shared

                    self._s3 = await S3Shared.open(self.s3_settings, self._stack)
        return self._s3

    async def aclose(self) -> None:
        self._s3 = None
        await self._stack.aclose()
