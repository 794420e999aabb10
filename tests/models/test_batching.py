"""Continuous batching (models/batching.py): requests that share decoding steps give what each gives alone.

Scheduler mechanics (the queue bound, cancellation, close, call) run on the tiny random Llama; the
tests marked ``slow`` compare batched replies with ``LoadedModel.generate`` on the real bundled model,
including a batch that mixes two named LoRA adapters and the base model.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune_kit.models.batching import BatchScheduler
from finetune_kit.models.engine import BatchingEngine, Completion, GenerationRequest, Overloaded
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.models.sampling import SamplingExtras

GREEDY = GenerationConfig(do_sample=False, max_new_tokens=12)
WORKER = "finetune_kit-batching"
PROMPTS = [
    "What is the capital of France?",
    "Write a poem about cats.",
    "List three colors, separated by commas.",
    "你好，请用中文介绍一下你自己。",
]


class Collect:
    """A sink that keeps every item and says when the request ended."""

    def __init__(self) -> None:
        self.items: list[object] = []
        self.first = threading.Event()
        self.done = threading.Event()

    def __call__(self, item: object) -> None:
        self.items.append(item)
        self.first.set()
        if isinstance(item, (Completion, BaseException)):
            self.done.set()

    @property
    def pieces(self) -> list[str]:
        return [i for i in self.items if isinstance(i, str)]

    def result(self, timeout: float = 120) -> Completion:
        assert self.done.wait(timeout), "the request did not finish"
        last = self.items[-1]
        if isinstance(last, BaseException):
            raise last
        assert isinstance(last, Completion)
        assert "".join(self.pieces) == last.text  # the streamed pieces are the final text
        assert all(self.pieces)
        return last


@contextlib.contextmanager
def held(scheduler: BatchScheduler) -> Iterator[None]:
    """Keep the worker busy in a call() so that requests submitted meanwhile join in one prefill."""
    started, release = threading.Event(), threading.Event()
    future = scheduler.call(lambda: (started.set(), release.wait(60)))
    assert started.wait(30)
    try:
        yield
    finally:
        release.set()
        future.result(30)


def wait_for(condition, timeout: float = 10.0) -> float:
    """Seconds until ``condition()`` holds (fails after ``timeout``)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.002)
    return time.monotonic() - start


def endless(lm) -> SamplingExtras:
    """Extras that ban every stop token, so a request runs to its max_new_tokens."""
    return SamplingExtras(logit_bias={t: -100.0 for t in lm.stop_token_ids})


@pytest.fixture
def tiny_scheduler(tiny_llama):
    schedulers: list[BatchScheduler] = []

    def make(**kwargs) -> BatchScheduler:
        schedulers.append(BatchScheduler(tiny_llama, **kwargs))
        return schedulers[-1]

    yield make
    for s in schedulers:
        s.close()


# ----- mechanics, on the tiny model ----------------------------------------------------------------------------
def test_loaded_model_is_a_batching_engine(tiny_llama):
    assert isinstance(tiny_llama, BatchingEngine)
    assert tiny_llama.adapter_names == ()
    scheduler = tiny_llama.scheduler(max_batch=3, max_queued=5)
    assert (scheduler.max_batch, scheduler.max_queued, scheduler.load, scheduler.peak_batch) == (3, 5, (0, 0), 0)
    scheduler.close()
    for bad in ({"max_batch": 0}, {"max_queued": -1}):
        with pytest.raises(ValueError, match="max_batch must be"):
            BatchScheduler(tiny_llama, **bad)


def test_tiny_batch_equals_generate_alone(tiny_llama, tiny_scheduler):
    prompts = ["Hi", "What is the capital of France? Answer in one long sentence.", "x"]
    scheduler = tiny_scheduler(max_batch=8)
    for max_new in (1, 7):
        gen = GREEDY.with_(max_new_tokens=max_new)
        alone = [tiny_llama.chat(p, gen) for p in prompts]
        sinks = [Collect() for _ in prompts]
        with held(scheduler):
            for p, sink in zip(prompts, sinks, strict=True):
                scheduler.submit(GenerationRequest(tiny_llama.encode_prompt(p), gen), sink)
            assert scheduler.load == (0, 3)
        assert [s.result().text for s in sinks] == alone
        assert all(s.result().completion_tokens == max_new for s in sinks)
    assert scheduler.peak_batch == 3
    wait_for(lambda: scheduler.load == (0, 0))


def test_overloaded_when_the_queue_is_full(tiny_llama, tiny_scheduler):
    scheduler = tiny_scheduler(max_batch=1, max_queued=0)
    prompt = tiny_llama.encode_prompt("Hi")
    long = GenerationRequest(prompt, GREEDY.with_(max_new_tokens=400), extras=endless(tiny_llama))
    first = Collect()
    ticket = scheduler.submit(long, first)
    wait_for(lambda: scheduler.load == (1, 0))
    with pytest.raises(Overloaded) as info:
        scheduler.submit(GenerationRequest(prompt, GREEDY), Collect())
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert "1 generations are running" in message and "limit is 0 waiting" in message and "retry later" in message
    ticket.cancel()
    wait_for(lambda: scheduler.load == (0, 0))
    second = Collect()
    scheduler.submit(GenerationRequest(prompt, GREEDY.with_(max_new_tokens=3)), second)  # room again
    assert second.result().completion_tokens == 3
    assert not first.done.is_set()  # a cancelled request gets no Completion


def test_the_queue_bound_holds_while_a_request_is_being_prefilled(tiny_llama, tiny_scheduler):
    # The first piece is handed over during the prefill, when the request has left the queue but
    # has not joined the running batch yet: it must still count against max_batch + max_queued.
    scheduler = tiny_scheduler(max_batch=1, max_queued=0)
    prompt = tiny_llama.encode_prompt("Hi")
    outcome: list[object] = []
    first = Collect()

    def sink(item: object) -> None:
        if not first.items:
            try:
                outcome.append(scheduler.submit(GenerationRequest(prompt, GREEDY.with_(max_new_tokens=2)), Collect()))
            except Overloaded as exc:
                outcome.append(exc)
        first(item)

    scheduler.submit(GenerationRequest(prompt, GREEDY.with_(max_new_tokens=4)), sink)
    first.result()
    assert isinstance(outcome[0], Overloaded), "a second request was accepted with max_batch=1, max_queued=0"


def test_a_cancelled_waiting_request_frees_its_place_in_the_queue(tiny_llama, tiny_scheduler):
    scheduler = tiny_scheduler(max_batch=1, max_queued=1)
    prompt = tiny_llama.encode_prompt("Hi")
    long = GenerationRequest(prompt, GREEDY.with_(max_new_tokens=400), extras=endless(tiny_llama))
    running = Collect()
    first = scheduler.submit(long, running)
    wait_for(lambda: scheduler.load == (1, 0))
    waiting = scheduler.submit(GenerationRequest(prompt, GREEDY), Collect())
    assert scheduler.load == (1, 1)
    waiting.cancel()  # the client left while queued
    progress = len(running.items)
    wait_for(lambda: len(running.items) >= progress + 3)  # a few decoding steps later
    try:
        assert scheduler.load == (1, 0), "a cancelled request still counts as waiting"
        scheduler.submit(GenerationRequest(prompt, GREEDY.with_(max_new_tokens=2)), Collect())  # no Overloaded
    finally:
        first.cancel()


def test_stream_left_early_cancels_its_generation(tiny_llama, tiny_scheduler):
    scheduler = tiny_scheduler()
    request = GenerationRequest(tiny_llama.encode_prompt("Hi"), GREEDY.with_(max_new_tokens=400))
    stream = scheduler.stream(GenerationRequest(request.prompt, request.generation, extras=endless(tiny_llama)))
    assert isinstance(next(stream), str)
    wait_for(lambda: scheduler.load == (1, 0))
    stream.close()
    assert wait_for(lambda: scheduler.load == (0, 0), timeout=5) < 2


def test_close_ends_running_requests_and_refuses_new_ones(tiny_llama, tiny_scheduler):
    scheduler = tiny_scheduler()
    prompt = tiny_llama.encode_prompt("Hi")
    sink = Collect()
    scheduler.submit(GenerationRequest(prompt, GREEDY.with_(max_new_tokens=400), extras=endless(tiny_llama)), sink)
    assert sink.first.wait(30)
    scheduler.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        sink.result(10)
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(GenerationRequest(prompt, GREEDY), Collect())


def test_call_after_close_does_not_hang(tiny_scheduler):
    scheduler = tiny_scheduler()
    assert scheduler.call(lambda: 41 + 1).result(30) == 42
    scheduler.close()
    with pytest.raises(RuntimeError):  # raised by call() or set on its future; waiting forever is not fine
        try:
            scheduler.call(lambda: 1).result(2)
        except TimeoutError:
            pytest.fail("call() after close() returned a future that never completes")


def test_call_runs_on_the_worker_and_reports_its_exception(tiny_llama, tiny_scheduler):
    scheduler = tiny_scheduler()
    assert scheduler.call(lambda: threading.current_thread().name).result(30) == WORKER

    def boom() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        scheduler.call(boom).result(30)
    sink = Collect()  # the worker is still there
    scheduler.submit(GenerationRequest(tiny_llama.encode_prompt("Hi"), GREEDY.with_(max_new_tokens=2)), sink)
    assert sink.result().completion_tokens == 2


def test_an_adapter_on_a_model_without_named_adapters_is_refused(tiny_llama, tiny_scheduler):
    scheduler = tiny_scheduler()
    request = GenerationRequest(tiny_llama.encode_prompt("Hi"), GREEDY.with_(max_new_tokens=2), adapter="nope")
    with pytest.raises(ValueError, match="nope"):  # not silently answered by the base model
        scheduler.submit(request, Collect())


def test_beam_search_is_refused_rather_than_silently_dropped(tiny_llama, tiny_scheduler):
    scheduler = tiny_scheduler()
    request = GenerationRequest(tiny_llama.encode_prompt("Hi"), GREEDY.with_(num_beams=3, max_new_tokens=4))
    with pytest.raises(ValueError, match="num_beams"):
        scheduler.submit(request, Collect())


# ----- the bundled model -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alone(bundled_model) -> list[Completion]:
    """Each prompt's greedy reply, generated on its own."""
    return [_one(bundled_model, p, GREEDY) for p in PROMPTS]


def _one(lm, prompt: str, gen: GenerationConfig, stop=()) -> Completion:
    return lm.generate([[{"role": "user", "content": prompt}]], gen, batch_size=1, stop=stop)[0]


@pytest.fixture(scope="module")
def scheduler(bundled_model):
    s = bundled_model.scheduler(max_batch=8, max_queued=8)
    yield s
    s.close()


@pytest.mark.slow
def test_concurrent_requests_equal_generate_alone(bundled_model, scheduler, alone):
    assert {a.finish_reason for a in alone} == {"stop", "length"}  # both endings are covered
    results: dict[int, list] = {}

    def client(i: int) -> None:
        request = GenerationRequest(bundled_model.encode_prompt(PROMPTS[i]), GREEDY)
        results[i] = list(scheduler.stream(request))

    with held(scheduler):
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        wait_for(lambda: scheduler.load == (0, len(PROMPTS)))
    for t in threads:
        t.join(120)
    assert scheduler.peak_batch == len(PROMPTS)  # they shared decoding steps
    for i, expected in enumerate(alone):
        *pieces, final = results[i]
        assert final == expected
        assert "".join(pieces) == final.text and all(isinstance(p, str) and p for p in pieces)
    wait_for(lambda: scheduler.load == (0, 0))


@pytest.mark.slow
def test_requests_that_join_mid_generation_equal_generate_alone(bundled_model, alone):
    scheduler = bundled_model.scheduler(max_batch=8)
    try:
        order = [1, 3, 0, 2]  # the long replies first, the others join while they decode
        sinks = {i: Collect() for i in order}
        for k, i in enumerate(order):
            scheduler.submit(GenerationRequest(bundled_model.encode_prompt(PROMPTS[i]), GREEDY), sinks[i])
            if k < len(order) - 1:
                wait_for(lambda i=i: len(sinks[i].pieces) >= 3, timeout=60)
        for i in order:
            assert sinks[i].result() == alone[i]
        assert scheduler.peak_batch >= 2  # a later request joined running ones
    finally:
        scheduler.close()


@pytest.mark.slow
def test_stop_strings_stop_token_and_length(bundled_model, scheduler, alone):
    poem, capital = alone[1], alone[0]
    assert capital.finish_reason == "stop" and capital.completion_tokens < GREEDY.max_new_tokens  # a stop token
    assert poem.finish_reason == "length" and poem.completion_tokens == GREEDY.max_new_tokens
    full = poem.text
    stops = [["\n"], ["realm of f"], ["beauty", "\n"]]
    for stop in stops:
        if not any(s in full for s in stop):
            raise RuntimeError(f"precondition: {stop!r} is not in {full!r}")
    sinks = [Collect() for _ in stops]
    with held(scheduler):
        for stop, sink in zip(stops, sinks, strict=True):
            scheduler.submit(GenerationRequest(bundled_model.encode_prompt(PROMPTS[1]), GREEDY, stop=stop), sink)
    for stop, sink in zip(stops, sinks, strict=True):
        got = sink.result()
        cut = min(full.index(s) for s in stop if s in full)
        assert got.text == full[:cut] and got.finish_reason == "stop"
        assert not any(s in piece for s in stop for piece in sink.pieces)
        assert got == _one(bundled_model, PROMPTS[1], GREEDY, stop=stop)  # same text and token counts


@pytest.mark.slow
def test_cancelling_one_request_leaves_the_others_untouched(bundled_model, scheduler, alone):
    lm = bundled_model
    long = GenerationRequest(
        lm.encode_prompt("Tell me a very long story about a dragon."),
        GREEDY.with_(max_new_tokens=500),
        extras=endless(lm),
    )
    victim, others = Collect(), [Collect(), Collect()]
    with held(scheduler):
        ticket = scheduler.submit(long, victim)
        for i, sink in zip((1, 3), others, strict=True):
            scheduler.submit(GenerationRequest(lm.encode_prompt(PROMPTS[i]), GREEDY), sink)
    assert victim.first.wait(60)
    progress = len(others[0].pieces)
    ticket.cancel()
    seen = len(victim.items)
    wait_for(lambda: scheduler.load[0] < 3, timeout=30)  # gone, long before its 500 tokens
    assert len(others[0].pieces) <= progress + 2  # within one decoding step (plus the one under way)
    assert [s.result() for s in others] == [alone[1], alone[3]]
    assert len(victim.items) <= seen + 1 and not victim.done.is_set()  # at most the piece of a step under way
    wait_for(lambda: scheduler.load == (0, 0))


@pytest.mark.slow
def test_call_runs_between_steps_while_requests_generate(bundled_model, scheduler, alone):
    texts = ["where is my parcel?", "has my order shipped?", "退货怎么办？"]
    direct = np.array(bundled_model.embed(texts))
    sinks = [Collect(), Collect()]
    for i, sink in zip((1, 3), sinks, strict=True):
        scheduler.submit(GenerationRequest(bundled_model.encode_prompt(PROMPTS[i]), GREEDY), sink)
    assert all(s.first.wait(60) for s in sinks)
    assert scheduler.load[0] == 2  # both are mid-generation
    future = scheduler.call(lambda: (threading.current_thread().name, bundled_model.embed(texts)))
    name, vectors = future.result(60)
    assert name == WORKER
    np.testing.assert_allclose(np.array(vectors), direct, atol=1e-6)
    assert [s.result() for s in sinks] == [alone[1], alone[3]]


@pytest.mark.slow
def test_a_seed_gives_the_same_sample_alone_and_in_a_batch(bundled_model, scheduler, alone):
    lm = bundled_model
    sample = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12)
    prompt = lm.encode_prompt(PROMPTS[1])

    def seeded(seed: int) -> GenerationRequest:
        return GenerationRequest(prompt, sample, extras=SamplingExtras(seed=seed))

    def run(request: GenerationRequest) -> Completion:
        *_, final = scheduler.stream(request)
        return final

    first = run(seeded(1234))
    assert run(seeded(1234)) == first
    sinks = [Collect() for _ in range(3)]
    with held(scheduler):
        scheduler.submit(GenerationRequest(lm.encode_prompt(PROMPTS[0]), GREEDY), sinks[0])
        scheduler.submit(seeded(99), sinks[1])
        scheduler.submit(seeded(1234), sinks[2])
    assert sinks[2].result() == first  # the batch mates do not change the draws
    assert sinks[0].result() == alone[0]
    assert sinks[1].result().text != first.text  # another seed, another sample


@pytest.mark.slow
def test_repetition_penalty_and_logit_bias_in_a_batch(bundled_model, scheduler, alone):
    lm = bundled_model
    penalized = GREEDY.with_(repetition_penalty=1.3)
    expected = _one(lm, PROMPTS[1], penalized)
    forced = lm.tokenizer.encode(" banana", add_special_tokens=False)
    assert len(forced) == 1
    banned = lm.tokenizer.encode(alone[1].text, add_special_tokens=False)[0]
    sinks = [Collect() for _ in range(3)]
    prompt = lm.encode_prompt(PROMPTS[1])
    with held(scheduler):
        scheduler.submit(GenerationRequest(prompt, penalized), sinks[0])
        short = GREEDY.with_(max_new_tokens=3)
        scheduler.submit(GenerationRequest(prompt, short, extras=SamplingExtras(logit_bias={forced[0]: 100})), sinks[1])
        scheduler.submit(GenerationRequest(prompt, short, extras=SamplingExtras(logit_bias={banned: -100})), sinks[2])
    assert sinks[0].result() == expected  # transformers' own repetition penalty gives the same reply
    assert sinks[1].result().text == lm.tokenizer.decode(forced * 3)
    assert not sinks[2].result().text.startswith(lm.tokenizer.decode([banned]))


# ----- named LoRA adapters ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def grad_flags_kept(model) -> Iterator[None]:
    """Restore the shared fixture's requires_grad flags, whatever the block does to them."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@pytest.fixture(scope="module")
def adapter_dirs(bundled_model, tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(copy.deepcopy(bundled_model.model), config)
        peft_model.save_pretrained(root / name)
        del peft_model
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def multi(bundled_model, adapter_dirs):
    with grad_flags_kept(bundled_model.model):
        return bundled_model.with_named_adapters(adapter_dirs)


@pytest.fixture(scope="module")
def adapter_alone(bundled_model, adapter_dirs, alone) -> dict[str, list[Completion]]:
    """Greedy replies to two prompts from each single-adapter model, and the base model, run alone."""
    out = {"__base__": alone[1:3]}
    for name, folder in adapter_dirs.items():
        with grad_flags_kept(bundled_model.model):
            single = bundled_model.with_adapter(folder)
        out[name] = [_one(single, p, GREEDY) for p in PROMPTS[1:3]]
    assert len({tuple(c.text for c in v) for v in out.values()}) == 3  # each adapter changes the replies
    return out


@pytest.mark.slow
def test_one_batch_serves_two_adapters_and_the_base_model(bundled_model, multi, adapter_alone):
    assert multi.adapter_names == ("a", "b")
    assert isinstance(multi, BatchingEngine)
    scheduler = multi.scheduler(max_batch=8)
    try:
        wanted = ["a", "__base__", "b", None]  # None: the model as loaded, i.e. its first adapter
        sinks = {(w, i): Collect() for w in wanted for i in range(2)}
        with held(scheduler):
            for (w, i), sink in sinks.items():
                scheduler.submit(GenerationRequest(multi.encode_prompt(PROMPTS[1 + i]), GREEDY, adapter=w), sink)
        for (w, i), sink in sinks.items():
            assert sink.result() == adapter_alone[w or "a"][i], (w, i)
        assert scheduler.peak_batch == len(sinks)
    finally:
        scheduler.close()
    assert [c.text for c in multi.generate([[{"role": "user", "content": PROMPTS[1]}]], GREEDY)] == [
        adapter_alone["a"][0].text
    ]


@pytest.mark.slow
def test_an_unknown_adapter_is_refused_at_submit_and_does_not_end_the_batch(bundled_model, multi, adapter_alone):
    scheduler = multi.scheduler(max_batch=8)
    try:
        good = Collect()
        with held(scheduler):
            scheduler.submit(GenerationRequest(multi.encode_prompt(PROMPTS[1]), GREEDY, adapter="b"), good)
            with pytest.raises(ValueError) as info:
                scheduler.submit(GenerationRequest(multi.encode_prompt(PROMPTS[1]), GREEDY, adapter="c"), Collect())
        assert "'c'" in str(info.value) and "'a'" in str(info.value) and "'b'" in str(info.value)
        assert good.result() == adapter_alone["b"][0]
    finally:
        scheduler.close()


@pytest.mark.parametrize("name", ["__base__", "has space", "", "-dash-first", "x" * 65, "a/b"])
def test_named_adapters_refuse_a_name_that_cannot_be_a_model_id(tiny_llama, tmp_path, name):
    with pytest.raises(ValueError) as info:
        tiny_llama.with_named_adapters({"a": tmp_path, name: tmp_path})
    assert repr(name) in str(info.value) and "Fix:" in str(info.value)


def test_named_adapters_need_at_least_one_and_real_folders(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="at least one adapter"):
        tiny_llama.with_named_adapters({})
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        tiny_llama.with_named_adapters({"a": tmp_path})
    assert not hasattr(tiny_llama.model, "peft_config")


@pytest.mark.slow
def test_named_adapters_leave_the_original_model_unchanged(bundled_model, multi, adapter_alone):
    assert type(bundled_model.model).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in name for name in bundled_model.model.state_dict())
    assert bundled_model.adapter_names == ()
    embed = bundled_model.model.get_input_embeddings().weight
    assert multi.model.get_input_embeddings().weight is embed  # shared, not copied
    assert [_one(bundled_model, p, GREEDY) for p in PROMPTS[1:3]] == adapter_alone["__base__"]


@pytest.mark.slow
def test_named_adapters_leave_the_original_requires_grad_flags_alone(bundled_model, adapter_dirs):
    before = {n: p.requires_grad for n, p in bundled_model.model.named_parameters()}
    with grad_flags_kept(bundled_model.model):
        bundled_model.with_named_adapters(adapter_dirs)
        after = {n: p.requires_grad for n, p in bundled_model.model.named_parameters()}
    changed = sorted(n for n in before if before[n] != after[n])
    assert not changed, f"{len(changed)} parameters of the original model changed requires_grad, e.g. {changed[:2]}"
