"""Items made in a generation slot's worker thread, handed to the event loop as they come.

One pump for every streaming route: the worker runs in a slot (``SlotRunner.start``), each item
it yields goes through an asyncio queue, and its exception is raised in the consumer. The worker
runs to the end of its item even when the consumer leaves (a generation cannot be cancelled), and
the slot stays taken until it ends, so generations never overlap.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any, Protocol

_END = object()


class SlotRunner(Protocol):
    """What the routes need of the app's generation slots."""

    async def start(self, fn: Callable[[], Any]) -> asyncio.Future[Any]: ...


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


async def in_slot(slots: SlotRunner, produce: Callable[[threading.Event], Iterable[Any]]) -> AsyncGenerator[Any, None]:
    """The items ``produce(abandoned)`` makes in a slot's worker thread, as they come; its exception is raised
    here. ``abandoned`` is set once the consumer has left. Example::

        async for piece in in_slot(slots, lambda abandoned: engine.stream(messages, gen)):
            ...
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    abandoned = threading.Event()

    def put(item: Any) -> None:
        if not abandoned.is_set():
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def work() -> None:
        try:
            for item in produce(abandoned):
                put(item)
        except BaseException as exc:
            put(_Failure(exc))
        finally:
            put(_END)

    try:
        await slots.start(work)
        while (item := await queue.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        abandoned.set()
