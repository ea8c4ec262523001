"""What the backends report for the server's metrics, as an interface: ``gateway.metrics.Metrics`` implements it,
and ``BackendResources`` hands it to the backends, which never import the gateway. A leaf module (the S3 client
and the resources both import it).
"""

from __future__ import annotations

from typing import Protocol


class StorageObserver(Protocol):
    """What the backends report for the server's metrics (``gateway.metrics.Metrics`` is one); given through
    :class:`BackendResources` so that backends never import the gateway."""

    def s3_request(self, operation: str, outcome: str, seconds: float) -> None:
        """One S3 request (retries included) of ``operation`` (``PutObject``) ended with ``outcome``: ``ok``,
        ``4xx``, ``5xx`` or ``error`` (no HTTP answer: unreachable, timed out)."""

    def multipart_started(self) -> None:
        """A multipart upload was created on S3."""

    def multipart_ended(self) -> None:
        """A multipart upload was completed or aborted."""


class NoObserver:
    def s3_request(self, operation: str, outcome: str, seconds: float) -> None:
        pass

    def multipart_started(self) -> None:
        pass

    def multipart_ended(self) -> None:
        pass
