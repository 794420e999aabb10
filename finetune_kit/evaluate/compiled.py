"""Prediction through transformers ``generate`` with a static KV cache, compiled on CUDA.

Per decoding step, a small model on a GPU is bound by kernel launches, not by arithmetic: a
continuous batch over a growing ``DynamicCache`` launches every kernel of every layer from Python
at each step. With ``cache_implementation="static"`` transformers compiles the decoding step
(``torch.compile``, CUDA graphs), which replays a whole step as one graph. A compiled graph is
tied to its shapes, so every batch here has the same shape: prompts sorted longest first,
left-padded to one width for the whole run (the longest prompt, rounded up to a multiple of
:data:`WIDTH_STEP` so that later runs with similar prompts reuse the graph), and on CUDA the last
batch filled up with copies of its last prompt. Only the first batch pays for compilation.

Off CUDA nothing is compiled (``disable_compile``): the static cache alone gives no speed there,
but forcing this path on CPU (``predict_backend="static_compiled"``) lets tests check that it
gives the continuous path's replies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from finetune_kit.errors import ConfigError
from finetune_kit.evaluate.config import PredictBackend
from finetune_kit.models.decoding import generate_batch
from finetune_kit.models.loaded import LoadedModel

if TYPE_CHECKING:
    from finetune_kit.models.engine import Engine
    from finetune_kit.models.generation import GenerationConfig

WIDTH_STEP = 64
"""Prompt widths are rounded up to a multiple of this, so runs with similar prompts share one graph."""


class CompileFailed(RuntimeError):
    """torch.compile failed while generating: the caller falls back to the continuous batch.

    Internal to prediction: :func:`finetune_kit.evaluate.predict.generate_records` catches it.
    """


def use_static(model: Engine, generation: GenerationConfig, backend: PredictBackend) -> bool:
    """Whether ``backend`` picks the static-cache path for ``model`` and ``generation``.

    ``auto`` picks it for a :class:`LoadedModel` on a CUDA device with ``num_beams == 1`` and no
    named adapters; ``static_compiled`` forces it on any device and is an error where it cannot run.
    """
    if backend == "continuous":
        return False
    problems = []
    if not isinstance(model, LoadedModel):
        problems.append(f"the model is a {type(model).__name__}, not a LoadedModel")
    elif model.adapter_names:
        problems.append(f"the model holds named adapters {list(model.adapter_names)}")
    if generation.num_beams != 1:
        problems.append(f"num_beams is {generation.num_beams} (beam search)")
    if backend == "auto":
        return not problems and isinstance(model, LoadedModel) and model.device.type == "cuda"
    if problems:
        raise ConfigError(
            f"predict_backend: got 'static_compiled', which needs a LoadedModel without named adapters "
            f"and num_beams 1, but {'; '.join(problems)}. Fix: set predict_backend to 'auto' or 'continuous'"
        )
    return True


def static_records(
    model: LoadedModel,
    examples: Sequence[Any],
    generation: GenerationConfig,
    *,
    batch_size: int,
    put: Callable[[int, str], None],
    bar: Any,
    stop: Sequence[str] = (),
) -> None:
    """Generate a reply to every example in same-shape static-cache batches, longest prompts first.

    ``put(i, text)`` receives example ``i``'s reply as its batch finishes (out of dataset order:
    the caller puts them back in order). Replies are decoded
    exactly as :meth:`LoadedModel.generate` decodes them (stop tokens, stop strings,
    ``skip_special_tokens``). Raises :class:`CompileFailed` where torch.compile fails.
    """
    ids = [model.encode_prompt(e.prompt_messages) for e in examples]
    # stable sort: equal lengths keep the dataset order
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    compiling = model.device.type == "cuda"
    width = _width(model, max(len(p) for p in ids), generation.max_new_tokens)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = chunk + [chunk[-1]] * (batch_size - len(chunk)) if compiling else chunk
        completions = _generate(model, [ids[i] for i in rows], width, generation, stop, compiling=compiling)
        for i, completion in zip(chunk, completions, strict=False):
            put(i, completion.text)
        bar.update(len(chunk))


def _width(model: LoadedModel, longest: int, max_new_tokens: int) -> int:
    """The padded prompt width: ``longest`` rounded up to :data:`WIDTH_STEP` where the model's positions allow."""
    rounded = -(-longest // WIDTH_STEP) * WIDTH_STEP
    limit = getattr(model.model.config, "max_position_embeddings", None)
    return rounded if limit is None or rounded + max_new_tokens <= limit else longest


def _generate(
    model: LoadedModel,
    prompts: list[list[int]],
    width: int,
    generation: GenerationConfig,
    stop: Sequence[str],
    *,
    compiling: bool,
) -> list[Any]:
    try:
        return generate_batch(
            model, prompts, generation, stop=stop, width=width,
            cache_implementation="static", disable_compile=not compiling,
        )  # fmt: skip
    except Exception as exc:
        if _compile_error(exc):
            raise CompileFailed(f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}") from exc
        raise


def _compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps) comes from torch.compile: dynamo, inductor or triton."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__module__.startswith(("torch._dynamo", "torch._inductor", "triton")):
            return True
        current = current.__cause__ or current.__context__
    return False
