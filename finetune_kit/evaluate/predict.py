"""Batch generation over a dataset's prompts, written as LLaMA-Factory's prediction files.

``generated_predictions.jsonl`` is streamed: finished records are appended, in order, to
``generated_predictions.jsonl.tmp`` (flushed, so ``tail -f`` shows progress and a crash keeps
what was done), which is renamed to its final name only when every example is done.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from finetune_kit._artifacts import ALL_RESULTS as ALL_RESULTS_FILE
from finetune_kit._artifacts import PREDICT_RECORD as RUN_FILE
from finetune_kit._artifacts import PREDICT_RESULTS as RESULTS_FILE
from finetune_kit._artifacts import PREDICTIONS as PREDICTIONS_FILE
from finetune_kit._artifacts import write_record
from finetune_kit._fs import write_json
from finetune_kit.errors import FinetuneKitWarning, OutputExistsError
from finetune_kit.evaluate import compiled
from finetune_kit.evaluate.config import PredictBackend
from finetune_kit.models.engine import BatchingEngine, Completion, Engine, GenerationRequest
from finetune_kit.models.loaded import LoadedModel

if TYPE_CHECKING:
    from finetune_kit.data.conversations import Conversations
    from finetune_kit.models.generation import GenerationConfig
Record = dict[str, str]


def check_output_dir(output_dir: Path, *, overwrite: bool) -> None:
    """Refuse to replace earlier predictions in ``output_dir`` unless ``overwrite``."""
    if overwrite:
        return
    earlier = [
        output_dir / name
        for name in (PREDICTIONS_FILE, RESULTS_FILE)
        if (output_dir / name).is_file() and (output_dir / name).stat().st_size > 0
    ]
    if earlier:
        raise OutputExistsError(
            f"{earlier[0]} already exists (predictions of an earlier run); refusing to overwrite it. "
            "Fix: pass another output_dir, or allow it with with_config(overwrite_output_dir=True) "
            "(YAML: overwrite_output_dir: true)"
        )


def generate_records(
    model: Engine,
    data: Conversations,
    generation: GenerationConfig,
    *,
    batch_size: int,
    sink: IO[str] | None = None,
    progress: bool = True,
    backend: PredictBackend = "auto",
    stop: Sequence[str] = (),
) -> list[Record]:
    """Generate a reply to every example's prompt; one ``{prompt, predict, label}`` record each.

    ``backend`` (``PredictConfig.predict_backend``) picks how a :class:`BatchingEngine` (a
    :class:`LoadedModel`) decodes with ``num_beams == 1``: ``static_compiled`` (``auto`` on a CUDA
    device) in same-shape batches through a static KV cache that transformers compiles
    (:mod:`finetune_kit.evaluate.compiled`; if compiling fails, a :class:`FinetuneKitWarning` and
    the continuous batch for what is left); ``continuous`` (``auto`` elsewhere) in one continuous
    batch of ``batch_size`` sequences (:func:`_continuous`). Another engine gets batches of
    ``batch_size`` prompts through :meth:`Engine.generate` (left-padded). Replies end at ``stop``
    strings too. Records reach ``sink`` as JSON lines, flushed, in the dataset's order as soon as
    every earlier one is done.
    """
    from tqdm.auto import tqdm

    examples = data.examples
    writer = _InOrder(model, examples, sink)
    with tqdm(total=len(examples), desc="Predicting", unit="example", disable=not progress) as bar:
        if compiled.use_static(model, generation, backend):
            assert isinstance(model, LoadedModel)
            try:
                compiled.static_records(
                    model, examples, generation, batch_size=batch_size, put=writer.put, bar=bar, stop=stop
                )
            except compiled.CompileFailed as exc:
                rest = writer.missing()
                warnings.warn(
                    f"predict_backend: compiling the static-cache generation failed ({exc}); the "
                    f"{len(rest)} examples left are generated in one continuous batch instead (slower on a GPU). "
                    "Fix: check that torch.compile works here (a C compiler, triton), or set "
                    "predict_backend: continuous to skip compilation",
                    FinetuneKitWarning,
                    stacklevel=2,
                )
                _continuous(
                    model,
                    [examples[i] for i in rest],
                    generation,
                    batch_size=batch_size,
                    put=lambda k, text: writer.put(rest[k], text),
                    bar=bar,
                    stop=stop,
                )
            return writer.records()
        if isinstance(model, BatchingEngine) and generation.num_beams == 1:
            _continuous(model, examples, generation, batch_size=batch_size, put=writer.put, bar=bar, stop=stop)
            return writer.records()
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            prompts = [e.prompt_messages for e in chunk]
            completions = model.generate(prompts, generation, batch_size=batch_size, stop=stop)
            for k, completion in enumerate(completions):
                writer.put(start + k, completion.text)
            bar.update(len(chunk))
    return writer.records()


class _InOrder:
    """Replies that arrive in any order, each made the ``{prompt, predict, label}`` record of its
    example and written to ``sink`` as soon as every earlier one is there."""

    def __init__(self, model: Engine, examples: Sequence[Any], sink: IO[str] | None) -> None:
        self._model = model
        self._examples = examples
        self._slots: list[Record | None] = [None] * len(examples)
        self._written = 0
        self._sink = sink

    def put(self, index: int, text: str) -> None:
        example = self._examples[index]
        self._slots[index] = {
            "prompt": self._model.render_prompt(example.prompt_messages),
            "predict": text,
            "label": example.label,
        }
        start = self._written
        while self._written < len(self._slots) and self._slots[self._written] is not None:
            self._written += 1
        if self._sink is not None and self._written > start:
            self._sink.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self._slots[start : self._written])
            self._sink.flush()

    def missing(self) -> list[int]:
        return [i for i, r in enumerate(self._slots) if r is None]

    def records(self) -> list[Record]:
        return [r for r in self._slots if r is not None]


def _continuous(
    model: BatchingEngine,
    examples: Sequence[Any],
    generation: GenerationConfig,
    *,
    batch_size: int,
    put: Callable[[int, str], None],
    bar: Any,
    stop: Sequence[str] = (),
) -> None:
    """Every example through one continuous batch: a sequence that ends frees its place for the next
    prompt at once, so no batch waits for its longest reply. ``put(i, text)`` gets example ``i``'s
    reply, in order; what is done is kept also when a later example fails."""
    assert isinstance(model, Engine)
    if not examples:
        return
    ids = [model.encode_prompt(e.prompt_messages) for e in examples]
    done: dict[int, Completion | BaseException] = {}
    changed = threading.Condition()

    def finisher(i: int) -> Any:
        def put_done(item: Any) -> None:
            if isinstance(item, (Completion, BaseException)):
                with changed:
                    done[i] = item
                    changed.notify()

        return put_done

    scheduler = model.scheduler(max_batch=batch_size, max_queued=len(examples))
    try:
        for i, prompt in enumerate(ids):  # in order, so the file grows from its start
            scheduler.submit(GenerationRequest(prompt, generation, stop=stop, stream=False), finisher(i))
        shown = 0
        finished = 0
        while finished < len(examples):
            with changed:
                changed.wait_for(lambda seen=shown: len(done) > seen)  # type: ignore[misc]
                count = len(done)
            bar.update(count - shown)
            shown = count
            while finished in done:
                item = done[finished]
                if isinstance(item, BaseException):
                    raise item
                put(finished, item.text)
                finished += 1
    finally:
        scheduler.close()


def predict_to_dir(
    model: Engine,
    data: Conversations,
    generation: GenerationConfig,
    output_dir: Path,
    *,
    batch_size: int,
    progress: bool = True,
    backend: PredictBackend = "auto",
) -> list[Record]:
    """:func:`generate_records`, streaming ``generated_predictions.jsonl`` into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / PREDICTIONS_FILE
    partial = final.with_name(final.name + ".tmp")
    with partial.open("w", encoding="utf-8") as sink:
        records = generate_records(
            model, data, generation, batch_size=batch_size, sink=sink, progress=progress, backend=backend
        )
        os.fsync(sink.fileno())
    os.replace(partial, final)
    return records


def results_dict(scores: dict[str, float], *, num_samples: int, runtime_s: float) -> dict[str, Any]:
    """LLaMA-Factory's (Hugging Face's) ``predict_results.json`` content."""
    results: dict[str, Any] = {f"predict_{key}": value for key, value in scores.items()}
    results["predict_runtime"] = round(runtime_s, 4)
    results["predict_samples"] = num_samples
    results["predict_samples_per_second"] = round(num_samples / runtime_s, 3) if runtime_s > 0 else 0.0
    return results


def write_results(output_dir: Path, results: dict[str, Any], run_info: dict[str, Any]) -> None:
    """Write ``predict_results.json``, merge it into ``all_results.json`` and record the run settings."""
    _write_json(output_dir / RESULTS_FILE, results)
    combined_path = output_dir / ALL_RESULTS_FILE
    combined: dict[str, Any] = {}
    if combined_path.is_file():
        try:
            combined = json.loads(combined_path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            combined = {}
    _write_json(combined_path, {**combined, **results})
    write_record(output_dir, RUN_FILE, run_info)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_json(path, data, indent=4, sort_keys=True)  # the Hugging Face Trainer's metrics format


def read_predictions(path: str | os.PathLike[str]) -> list[Record]:
    """Read a ``generated_predictions.jsonl`` (ours or LLaMA-Factory's) back into records."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prediction_pairs(records: Sequence[Record]) -> tuple[list[str], list[str]]:
    """The ``(predictions, labels)`` columns of ``records``, ready for scoring."""
    return [r["predict"] for r in records], [r["label"] for r in records]
