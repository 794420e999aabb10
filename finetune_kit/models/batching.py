"""Continuous batching: many generations share every forward pass of one model.

One worker thread owns the model. Requests wait in a bounded queue; at each step the worker
admits waiting requests (up to ``max_batch`` running), runs their prompts through the model
together (prefill, left-padded), then joins them to the running batch, whose one KV cache holds
every sequence left-padded to a common width. Each decoding step feeds every running sequence
its last token in one forward pass, picks each row's next token with that row's own settings
(``models/sampling.py``), streams the new text (``models/detok.py``) and drops finished or
cancelled rows at once, so a client that leaves frees its place within one step. Columns that
have become padding in every row are trimmed.

transformers' own continuous-batching manager was not used: it takes one generation config for
all requests, has no per-request stop strings, penalties, seeds or LoRA adapters, and needs
paged attention kernels. This scheduler works with any decoder whose cache is a ``DynamicCache``
and with peft's mixed-adapter batches (``adapter_names``), so one batch can serve the base model
and several adapters at once.

Greedy decoding in a batch gives the same tokens as alone, up to float rounding (a different
padding width can change the last bits of a logit; a tie broken the other way is rare).
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from finetune_kit.models.batch_cache import cache_keyword, join, layers_of, take_rows
from finetune_kit.models.decoding import finish, pad_token_id
from finetune_kit.models.detok import IncrementalText
from finetune_kit.models.engine import Completion, GenerationRequest, Item, Overloaded, Ticket
from finetune_kit.models.sampling import RowSampler, choose_tokens

if TYPE_CHECKING:
    import torch

    from finetune_kit.models.loaded import LoadedModel

Sink = Callable[[Item], None]
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


class _Seq:
    """One running generation."""

    def __init__(self, lm: LoadedModel, req: GenerationRequest, sink: Sink, ticket: Ticket) -> None:
        self.lm, self.req, self.sink, self.ticket = lm, req, sink, ticket
        self.prompt = list(req.prompt)
        self.row: list[int] = []  # generated ids, the stop token included
        self.sampler = RowSampler(req.generation, req.extras, lm.device)
        # text is followed token by token only when someone reads the pieces or a stop string must be seen
        self.text = (
            IncrementalText(lm.tokenizer, skip_special_tokens=req.generation.skip_special_tokens, stop=req.stop)
            if req.stream or req.stop
            else None
        )
        self.stops = set(lm.stop_token_ids)
        limit = lm.context_length
        self.max_new = req.generation.max_new_tokens
        if limit:
            self.max_new = max(1, min(self.max_new, limit - len(self.prompt)))
        self.done = False

    def accept(self, token: int) -> None:
        """Record the chosen token, stream its text, and finish the sequence when it ends."""
        self.row.append(token)
        if token in self.stops:
            self.done = True
        elif self.text is None:
            self.done = len(self.row) >= self.max_new
        else:
            piece = self.text.push(token)
            if piece and self.req.stream:
                self.sink(piece)
            self.done = self.text.stopped or len(self.row) >= self.max_new
        if self.done:
            final = finish(self.lm, self.row, len(self.prompt), self.req.generation, self.req.stop)
            if self.req.stream:
                assert self.text is not None  # followed whenever the request streams
                rest = self.text.rest(final.text)
                if rest:
                    self.sink(rest)
            self.sink(final)


class BatchScheduler:
    """Runs :class:`GenerationRequest` s of one :class:`LoadedModel` in a shared batch.

    ``max_batch`` sequences decode together; up to ``max_queued`` more wait, and :meth:`submit`
    raises :class:`Overloaded` beyond that. ``prefill_tokens`` bounds the padded prompt tokens
    admitted in one step. Example::

        scheduler = BatchScheduler(model, max_batch=16)
        for piece in scheduler.stream(GenerationRequest(model.encode_prompt("Hi"), GREEDY)):
            print(piece)
    """

    def __init__(
        self, lm: LoadedModel, *, max_batch: int = 32, max_queued: int = 256, prefill_tokens: int = 8192
    ) -> None:
        if max_batch < 1 or max_queued < 0:
            raise ValueError(f"max_batch must be ≥ 1 and max_queued ≥ 0; got {max_batch} and {max_queued}")
        self.lm, self.max_batch, self.max_queued, self.prefill_tokens = lm, max_batch, max_queued, prefill_tokens
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._running: list[_Seq] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._prefilling = 0  # admitted, not yet in the running batch
        self._cache_kw = cache_keyword(lm.model)
        self._peak = 0

    # -- public -----------------------------------------------------------------------------------

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        with self._cond:
            self._prune()
            return len(self._running) + self._prefilling, len(self._waiting)

    @property
    def peak_batch(self) -> int:
        """The most sequences that have decoded in one step so far."""
        return self._peak

    def submit(self, request: GenerationRequest, sink: Sink) -> Ticket:
        """Queue ``request``; ``sink`` then gets text pieces, one :class:`Completion` (or an exception),
        called from the worker thread. Raises :class:`Overloaded` when the queue is full."""
        self._check(request)
        ticket = Ticket()
        seq = _Seq(self.lm, request, sink, ticket)
        with self._cond:
            if self._closed:
                raise RuntimeError("this BatchScheduler is closed")
            self._prune()
            busy = len(self._running) + self._prefilling
            if len(self._waiting) >= self.max_queued + max(0, self.max_batch - busy):
                raise Overloaded(
                    f"{busy} generations are running and {len(self._waiting)} waiting "
                    f"(the limit is {self.max_queued} waiting); retry later"
                )
            self._waiting.append(seq)
            self._ensure_thread()
            self._cond.notify()
        return ticket

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the worker thread between two steps (e.g. an embedding forward pass), so
        nothing else uses the model while it runs."""
        future: Future[Any] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("this BatchScheduler is closed")
            self._calls.append((fn, future))
            self._ensure_thread()
            self._cond.notify()
        return future

    def stream(self, request: GenerationRequest) -> Iterator[str | Completion]:
        """Text pieces, then the :class:`Completion`, for one request (blocking; cancels if left early)."""
        items: queue.SimpleQueue[Item] = queue.SimpleQueue()
        ticket = self.submit(request, items.put)
        try:
            while True:
                item = items.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Completion):
                    return
        finally:
            ticket.cancel()

    def close(self) -> None:
        """Stop the worker after the current step; waiting and running requests get a RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(30)

    # -- worker -----------------------------------------------------------------------------------

    def _check(self, request: GenerationRequest) -> None:
        """Refuse what a shared batch cannot do, naming the fix."""
        names = self.lm.adapter_names
        if request.adapter is not None and request.adapter != BASE_ADAPTER and request.adapter not in names:
            known = (
                ", ".join(repr(n) for n in (BASE_ADAPTER, *names))
                if names
                else "none (the model has no named adapters)"
            )
            raise ValueError(f"adapter {request.adapter!r} is not loaded; the adapters are {known}")
        if request.adapter is not None and not names:
            raise ValueError(
                f"adapter {request.adapter!r} was asked for, but this model has no named adapters. Fix: leave "
                "adapter as None, or load some with LoadedModel.with_named_adapters({name: folder})"
            )
        if request.generation.num_beams > 1:
            raise ValueError(
                f"num_beams={request.generation.num_beams}: beam search cannot share a continuous batch. Fix: "
                "num_beams=1, or LoadedModel.generate() for beam search"
            )

    def _prune(self) -> None:
        """Forget waiting requests whose client cancelled them (called with the lock held)."""
        if any(s.ticket.cancelled for s in self._waiting):
            self._waiting = collections.deque(s for s in self._waiting if not s.ticket.cancelled)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, daemon=True, name="finetune_kit-batching")
            self._thread.start()

    def _loop(self) -> None:
        import torch

        while True:
            with self._cond:
                while not (self._waiting or self._running or self._calls or self._closed):
                    self._cond.wait()
                if self._closed:
                    self._fail_all(RuntimeError("the server is shutting down"))
                    for _, future in self._calls:
                        future.set_exception(RuntimeError("the BatchScheduler was closed before this call ran"))
                    self._calls.clear()
                    return
                calls = list(self._calls)
                self._calls.clear()
                new = self._admit()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
            try:
                with torch.inference_mode():
                    self._drop([s for s in self._running if s.ticket.cancelled or s.done])
                    if new:
                        self._prefill(new)
                    if self._running:
                        self._step()
            except Exception as exc:  # a failed forward pass ends every running generation with it
                with self._cond:
                    for seq in [*new, *self._running]:
                        if not seq.done:
                            seq.sink(exc)
                    self._running, self._cache, self._mask = [], None, None
                    self._prefilling = 0

    def _admit(self) -> list[_Seq]:
        """Waiting sequences that join now (called with the lock held)."""
        new: list[_Seq] = []
        widest = 0
        while self._waiting and len(self._running) + len(new) < self.max_batch:
            seq = self._waiting[0]
            if seq.ticket.cancelled:
                self._waiting.popleft()
                continue
            widest2 = max(widest, len(seq.prompt))
            if new and widest2 * (len(new) + 1) > self.prefill_tokens:
                break
            widest = widest2
            new.append(self._waiting.popleft())
        self._prefilling = len(new)
        return new

    def _fail_all(self, exc: BaseException) -> None:
        for seq in [*self._waiting, *self._running]:
            if not seq.done:
                seq.sink(exc)
        self._waiting.clear()
        self._running = []

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, seqs: list[_Seq], cache: Any
    ) -> Any:
        kwargs: dict[str, Any] = {self._cache_kw: cache}
        adapters = [s.req.adapter for s in seqs]
        if any(a is not None for a in adapters):
            active = getattr(self.lm.model, "active_adapter", BASE_ADAPTER)
            kwargs["adapter_names"] = [a if a is not None else active for a in adapters]
        out = self.lm.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs
        )
        return out.logits[:, -1, :]

    def _prefill(self, new: list[_Seq]) -> None:
        import torch
        from transformers import DynamicCache

        device, pad = self.lm.device, pad_token_id(self.lm)
        width = max(len(s.prompt) for s in new)
        ids = torch.tensor([[pad] * (width - len(s.prompt)) + s.prompt for s in new], device=device)
        mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in new], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, new, cache)
        tokens = choose_tokens(logits, [s.sampler for s in new], [s.prompt for s in new], [s.row for s in new])
        for seq, token in zip(new, tokens, strict=True):
            seq.accept(token)
        self._join(new, cache, mask)

    def _step(self) -> None:
        import torch

        seqs, mask = self._running, self._mask
        assert mask is not None
        device = mask.device
        ids = torch.tensor([[s.row[-1]] for s in seqs], device=device)
        positions = mask.sum(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(len(seqs), 1, dtype=mask.dtype, device=device)], dim=-1)
        logits = self._forward(ids, mask, positions, seqs, self._cache)
        self._mask = mask
        self._peak = max(self._peak, len(seqs))
        tokens = choose_tokens(logits, [s.sampler for s in seqs], [s.prompt for s in seqs], [s.row for s in seqs])
        for seq, token in zip(seqs, tokens, strict=True):
            if not seq.ticket.cancelled:
                seq.accept(token)
        self._drop([s for s in seqs if s.done or s.ticket.cancelled])

    def _join(self, new: list[_Seq], cache: Any, mask: torch.Tensor) -> None:
        """Add freshly prefilled sequences (their ``cache`` and ``mask``) to the running batch."""
        from transformers import DynamicCache

        keep = [i for i, s in enumerate(new) if not s.done]
        if not keep:
            with self._cond:
                self._prefilling = 0
            return
        layers = layers_of(cache)
        if len(keep) < len(new):
            layers, mask = take_rows(layers, mask, keep, trim=False)
        if self._running:
            assert self._mask is not None
            layers, mask = join(layers_of(self._cache), self._mask, layers, mask)
        self._cache, self._mask = DynamicCache(layers), mask
        with self._cond:
            self._running = [*self._running, *(new[i] for i in keep)]
            self._prefilling = 0

    def _drop(self, gone: list[_Seq]) -> None:
        """Remove finished and cancelled sequences, then trim columns that are padding in every row."""
        if not gone:
            return
        from transformers import DynamicCache

        keep = [i for i, s in enumerate(self._running) if s not in gone]
        with self._cond:
            self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        assert self._mask is not None
        layers, self._mask = take_rows(layers_of(self._cache), self._mask, keep, trim=True)
        self._cache = DynamicCache(layers)
