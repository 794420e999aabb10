"""How the routes of both APIs get generations: one :class:`Runner` per app.

With a :class:`~finetune_kit.models.engine.BatchingEngine` (a :class:`LoadedModel`), every
request joins one continuous batch: ``max_concurrent`` sequences decode together, up to
``max_queued`` more wait, and beyond that a request is refused at once (:class:`Overloaded`: 429
on ``/v1``, 503 on ``/api``). Any other :class:`Engine` runs each request in a worker thread,
``max_concurrent`` at a time (never more than its ``max_concurrency``), with the same bound on the
waiting ones. Either way a request is submitted before its response starts, so an overloaded
server answers with a status, not a broken stream; and a client that leaves cancels its
generation (in a batch, before the next decoding step).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from finetune_kit.data.template import Message
from finetune_kit.errors import RequestError
from finetune_kit.models.engine import (
    BatchingEngine,
    Completion,
    Engine,
    GenerationRequest,
    Item,
    Overloaded,
    Scheduler,
    TextCompletionEngine,
    Ticket,
)
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.models.sampling import NO_EXTRAS, SamplingExtras
from finetune_kit.serve.config import ServeConfig

BASE_ADAPTER = "__base__"


@dataclass(frozen=True)
class Job:
    """One generation a route asks for: ``prompt`` ids (what the model continues), and the chat
    ``messages`` or raw ``text`` they came from (for an engine without a scheduler)."""

    prompt: Sequence[int]
    generation: GenerationConfig
    stop: Sequence[str] = ()
    messages: Sequence[Message] | None = None
    text: str | None = None
    extras: SamplingExtras = NO_EXTRAS
    adapter: str | None = None

    def request(self, *, stream: bool = True) -> GenerationRequest:
        return GenerationRequest(self.prompt, self.generation, self.stop, self.extras, self.adapter, stream=stream)


def concurrency(engine: Engine, config: ServeConfig) -> int:
    """Generations at once for an engine without a scheduler: ``max_concurrent``, capped by the engine."""
    if engine.max_concurrency < 1:
        raise ValueError(
            f"{type(engine).__name__}.max_concurrency is {engine.max_concurrency}; an Engine must "
            "run at least one generation at a time"
        )
    return min(config.max_concurrent, engine.max_concurrency)


class Runner:
    """Generations for the routes, and the model ids they may name."""

    def __init__(self, engine: Engine, config: ServeConfig) -> None:
        self.engine = engine
        self.name = config.served_name(engine)
        self.adapters: tuple[str, ...] = ()
        self._scheduler: Scheduler | None = None
        self._threads: _Threads | None = None
        if isinstance(engine, BatchingEngine):
            self.adapters = tuple(engine.adapter_names)
            self._scheduler = engine.scheduler(max_batch=config.max_concurrent, max_queued=config.max_queued)
        else:
            self._threads = _Threads(engine, concurrency(engine, config), config.max_queued)

    @property
    def batched(self) -> bool:
        """Whether requests share one continuous batch (else each runs in its own worker thread)."""
        return self._scheduler is not None

    @property
    def names(self) -> list[str]:
        """Every model id served: the model itself, then each named adapter."""
        return [self.name, *self.adapters]

    def adapter_for(self, requested: str | None) -> str | None:
        """The adapter a request's ``model`` picks. With named adapters the name must be one of
        :attr:`names` (a ``:latest`` tag is ignored); with none, any name means the one model, as
        in LLaMA-Factory."""
        if not self.adapters:
            return None
        wanted = (requested or "").removesuffix(":latest")
        if wanted == self.name:
            return BASE_ADAPTER
        if wanted in self.adapters:
            return wanted
        raise RequestError(
            f"The model '{requested}' does not exist; this server serves {', '.join(repr(n) for n in self.names)}.",
            param="model",
            status=404,
            code="model_not_found",
        )

    def served_name(self, adapter: str | None) -> str:
        """The model id a response carries: the adapter's name, else the served model's."""
        return adapter if adapter is not None and adapter != BASE_ADAPTER else self.name

    def check_extras(self, extras: SamplingExtras) -> None:
        """Refuse OpenAI extras an engine without a scheduler cannot honour (400 naming the field)."""
        if self.batched or extras == NO_EXTRAS:
            return
        field = next(
            f
            for f, v in (
                ("seed", extras.seed),
                ("presence_penalty", extras.presence_penalty),
                ("frequency_penalty", extras.frequency_penalty),
                ("logit_bias", extras.logit_bias),
            )
            if v
        )
        raise RequestError(
            f"{field} is not supported by this server's engine ({type(self.engine).__name__}); leave it out",
            param=field,
        )

    def open(self, job: Job, *, stream: bool = True) -> AsyncGenerator[str | Completion, None]:
        """Submit ``job`` now (raising :class:`Overloaded` when the queue is full) and return its items:
        text pieces, then one :class:`Completion`. Leaving the iteration early cancels the generation."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Item] = asyncio.Queue()

        def sink(item: Item) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

        if self._scheduler is not None:
            try:
                ticket = self._scheduler.submit(job.request(stream=stream), sink)
            except ValueError as exc:  # a setting the batch cannot honour (beam search)
                raise RequestError(str(exc)) from exc
        else:
            assert self._threads is not None
            ticket = self._threads.submit(job, sink)
        return _drain(items, ticket)

    async def complete(self, jobs: Sequence[Job]) -> list[Completion]:
        """Run ``jobs`` (one request's choices: same settings) side by side and return their Completions, in order.

        An engine without a scheduler gets them as one ``generate`` (chat) or ``complete`` (raw text) call."""
        if self._threads is not None:
            done: list[Completion] = await asyncio.wrap_future(self._threads.batch(jobs))
            return done
        streams = [self.open(job, stream=False) for job in jobs]
        return list(await asyncio.gather(*(_last(s) for s in streams)))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (e.g. an embedding forward pass) where it cannot overlap a generation step."""
        backend = self._scheduler or self._threads
        assert backend is not None
        return await asyncio.wrap_future(backend.call(fn))

    def close(self) -> None:
        for backend in (self._scheduler, self._threads):
            if backend is not None:
                backend.close()


async def _drain(items: asyncio.Queue[Item], ticket: Ticket) -> AsyncGenerator[str | Completion, None]:
    """The items of one generation, as the scheduler made them; the generation is cancelled when this ends."""
    try:
        while True:
            item = await items.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Completion):
                return
    finally:
        ticket.cancel()


async def _last(stream: AsyncGenerator[str | Completion, None]) -> Completion:
    final = None
    async for item in stream:
        final = item
    assert isinstance(final, Completion)
    return final


class _Threads:
    """A :class:`Scheduler` over an :class:`Engine` without one: each request runs ``engine.stream`` in a
    worker thread, ``size`` at once, at most ``max_queued`` more waiting."""

    def __init__(self, engine: Engine, size: int, max_queued: int) -> None:
        self.engine, self.size, self.max_queued = engine, size, max_queued
        self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="finetune_kit-generate")
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not finished

    def submit(self, job: Job, sink: Callable[[Item], None]) -> Ticket:
        self._take()
        ticket = Ticket()
        self._pool.submit(self._run, job, sink, ticket)
        return ticket

    def batch(self, jobs: Sequence[Job]) -> Future[list[Completion]]:
        """All of ``jobs`` in one engine call, in a worker thread (counted as one pending request)."""
        self._take()
        first = jobs[0]

        def work() -> list[Completion]:
            try:
                size = min(len(jobs), 8)
                if first.messages is not None:
                    return self.engine.generate(
                        [job.messages or [] for job in jobs], first.generation, batch_size=size, stop=first.stop
                    )
                assert isinstance(self.engine, TextCompletionEngine)
                texts = [job.text or "" for job in jobs]
                return self.engine.complete(texts, first.generation, batch_size=size, stop=first.stop)
            finally:
                self._release()

        return self._pool.submit(work)

    def _take(self) -> None:
        with self._lock:
            if self._pending >= self.size + self.max_queued:
                raise Overloaded(
                    f"{self._pending} requests are running or waiting (the limit is {self.size} running and "
                    f"{self.max_queued} waiting); retry later"
                )
            self._pending += 1

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def _run(self, job: Job, sink: Callable[[Item], None], ticket: Ticket) -> None:
        try:
            if ticket.cancelled:
                return
            last: Any = None
            for last in self._items(job):
                if ticket.cancelled:  # the client left: stop reading (the engine may run on)
                    return
                sink(last)
            if not isinstance(last, Completion):
                raise TypeError(
                    f"{type(self.engine).__name__}.stream() ended without a Completion; an Engine's "
                    "stream yields text pieces, then one Completion"
                )
        except BaseException as exc:
            sink(exc)
        finally:
            self._release()

    def _items(self, job: Job) -> Iterator[str | Completion]:
        if job.messages is not None:
            yield from _with_tail(self.engine.stream(job.messages, job.generation, stop=job.stop))
        else:
            assert isinstance(self.engine, TextCompletionEngine) and job.text is not None
            yield from _with_tail(self.engine.stream_text(job.text, job.generation, stop=job.stop))

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        return self._pool.submit(fn)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _with_tail(items: Iterator[str | Completion]) -> Iterator[str | Completion]:
    """An engine's stream, plus any final text it held back and did not send as a piece."""
    sent = ""
    for item in items:
        if isinstance(item, str):
            sent += item
        elif len(item.text) > len(sent) and item.text.startswith(sent):
            yield item.text[len(sent) :]
        yield item
