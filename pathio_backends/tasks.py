"""asyncio helpers the backends share: bounded calls, clean-up that survives the cancellation that caused it,
and one write in flight behind the caller."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


def with_timeout(
    method: Callable[Concatenate[Any, P], Awaitable[T]],
) -> Callable[Concatenate[Any, P], Coroutine[Any, Any, T]]:
    """Bound a method by its object's ``timeout`` (aioftp's ``path_timeout``), like aioftp's ``with_timeout``.

    aioftp's version uses ``asyncio.wait_for``, which on Python 3.11 swallows a cancellation that arrives as the
    awaited call completes: an ABOR during a steady upload could be lost. ``asyncio.timeout`` does not.
    """

    @functools.wraps(method)
    async def bounded(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> T:
        async with asyncio.timeout(self.timeout):
            return await method(self, *args, **kwargs)

    return bounded


async def run_to_completion(coro: Awaitable[T]) -> T:
    """Await ``coro`` to its end even if the caller is cancelled meanwhile, then re-raise the cancellation.

    Cleanup (closing a file, aborting an upload) must not be cut short by the very ABOR or disconnect
    that triggered it.
    """
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


class PendingWrite:
    """At most one write in flight, so receiving the next block overlaps storing this one.

    The write runs as its own task and is never cancelled: a thread may be busy with it, and the file must
    not be closed under that thread. A cancelled caller stops *waiting*; :meth:`settle` waits for the end.
    """

    def __init__(self) -> None:
        self.task: asyncio.Future[Any] | None = None

    async def submit(self, start: Callable[[], Awaitable[Any]]) -> None:
        await self.wait()
        self.task = asyncio.ensure_future(start())

    async def wait(self) -> None:
        """Wait for the write in flight and raise its error."""
        if self.task is not None:
            await asyncio.shield(self.task)
            self.task = None

    async def settle(self) -> None:
        """Wait for the write in flight to end, ignoring its error; interrupting this wait leaves it running."""
        task = self.task
        if task is not None:
            await asyncio.wait({task})
            self.task = None
            if not task.cancelled():
                task.exception()
