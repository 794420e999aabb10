"""Evaluator: generate replies for a dataset's prompts and score them against the references."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from finetune_kit._artifacts import provenance
from finetune_kit.data.conversations import Conversations
from finetune_kit.errors import ConfigError, DatasetError
from finetune_kit.evaluate import predict as pred
from finetune_kit.evaluate.benchmark import BenchmarkResult, run_benchmark
from finetune_kit.evaluate.benchmark_data import resolve_task
from finetune_kit.evaluate.compare import BenchmarkSpecs, Comparison, DatasetSpecs, run_comparison
from finetune_kit.evaluate.config import BenchmarkConfig, PredictConfig
from finetune_kit.evaluate.metrics import generation_scores, require_metrics
from finetune_kit.evaluate.result import EvalReport
from finetune_kit.models.engine import Engine
from finetune_kit.models.generation import DEFAULT_GENERATION, GenerationConfig
from finetune_kit.models.loadable import as_engine
from finetune_kit.models.loaded import LoadedModel

EVAL_GENERATION = DEFAULT_GENERATION.with_(max_new_tokens=128)
"""The library's greedy default, capped at 128 new tokens: deterministic, so two runs' scores compare."""


@dataclass(frozen=True, init=False)
class Evaluator:
    """Batch prediction on a dataset's prompts, scored with LLaMA-Factory's ROUGE/BLEU recipe.

    ``model`` is a :class:`LoadedModel` (or any :class:`Engine`), or what gives one: a
    ``TrainResult`` hands over its trained model from memory, a ``ModelSource`` is loaded
    here, once. ``with_generation``/``with_config`` return new Evaluators sharing that model.

    Decoding follows the library's rule (greedy unless asked) and stops at **128 new tokens**,
    so scores are reproducible and a before/after comparison measures the model, not sampling
    luck. LLaMA-Factory samples by default (temperature 0.95, top_p 0.7); to match that, use
    ``with_generation(do_sample=True)`` (and ``max_new_tokens=1024`` for its length limit).

    Example::

        test = DatasetRegistry.demo().load("shop_test")
        report = Evaluator(model).with_config(per_device_eval_batch_size=4).predict(test, output_dir="saves/pred")
        print(report.table())
    """

    model: Engine
    generation: GenerationConfig
    config: PredictConfig

    def __init__(
        self, model: object, generation: GenerationConfig | None = None, config: PredictConfig | None = None
    ) -> None:
        if generation is not None and not isinstance(generation, GenerationConfig):
            raise TypeError(
                f"generation must be a GenerationConfig, got {type(generation).__name__}; "
                "use Evaluator(model).with_generation(max_new_tokens=...) to change settings"
            )
        if config is not None and not isinstance(config, PredictConfig):
            raise TypeError(
                f"config must be a PredictConfig, got {type(config).__name__}; "
                "use Evaluator(model).with_config(per_device_eval_batch_size=...) to change settings"
            )
        object.__setattr__(self, "model", as_engine(model, who="Evaluator"))
        object.__setattr__(self, "generation", generation if generation is not None else EVAL_GENERATION)
        object.__setattr__(self, "config", config if config is not None else PredictConfig())

    def __repr__(self) -> str:
        gen = self.generation
        decoding = "greedy" if gen.greedy else f"sampling(temperature={gen.temperature}, top_p={gen.top_p})"
        if gen.num_beams > 1:
            decoding += f", num_beams={gen.num_beams}"
        limit = f", max_samples={self.config.max_samples}" if self.config.max_samples is not None else ""
        out = f", output_dir='{self.config.output_dir}'" if self.config.output_dir is not None else ""
        return (
            f"Evaluator({_display(self.model)}, template={_template(self.model)}, {decoding}, "
            f"max_new_tokens={gen.max_new_tokens}, batch_size={self.config.per_device_eval_batch_size}"
            f"{limit}{out})"
        )

    def with_generation(self, **changes: Any) -> Evaluator:
        """A new Evaluator with these :class:`GenerationConfig` fields changed."""
        return replace(self, generation=self.generation.with_(**changes))

    def with_config(self, **changes: Any) -> Evaluator:
        """A new Evaluator with these :class:`PredictConfig` fields changed."""
        return replace(self, config=self.config.with_(**changes))

    def explain(self) -> str:
        """The resolved settings of the next :meth:`predict`, before any generation."""
        cfg, gen = self.config, self.generation
        return "\n".join(
            [
                f"model:       {_display(self.model)} (template {_template(self.model)})",
                f"decoding:    {gen!r}",
                f"batch size:  {cfg.per_device_eval_batch_size} (left-padded)",
                f"max samples: {cfg.max_samples if cfg.max_samples is not None else 'all'}",
                f"output_dir:  {cfg.output_dir or '(nothing written)'}"
                + (" (overwrite allowed)" if cfg.overwrite_output_dir else ""),
                "metrics:     ROUGE-1/2/L F on jieba words, BLEU-4 on characters (nltk method3), x100",
            ]
        )

    def predict(
        self, data: Conversations, *, output_dir: str | Path | None = None, progress: bool = True
    ) -> EvalReport:
        """Generate a reply for every example's prompt and score it against the example's last reply.

        ``output_dir`` (or the config's) receives ``generated_predictions.jsonl`` (written batch by
        batch), ``predict_results.json`` with ``predict_rouge-1`` ... keys, ``all_results.json`` and
        ``finetune_kit_predict.json`` (the provenance record). Without one, nothing is written.
        Raises :class:`OutputExistsError` before generating if earlier predictions are there.
        """
        cfg = self.config if output_dir is None else self.config.with_(output_dir=output_dir)
        if cfg.max_samples is not None:
            data = data.head(cfg.max_samples)
        if len(data) == 0:
            raise DatasetError(
                "no examples to predict: the dataset is empty. Fix: pass a dataset with rows "
                "(and max_samples of at least 1)"
            )
        require_metrics()
        out = Path(cfg.output_dir) if cfg.output_dir is not None else None
        if out is not None:
            pred.check_output_dir(out, overwrite=cfg.overwrite_output_dir)

        started = time.perf_counter()
        batch, backend = cfg.per_device_eval_batch_size, cfg.predict_backend
        if out is not None:
            records = pred.predict_to_dir(
                self.model, data, self.generation, out, batch_size=batch, progress=progress, backend=backend
            )
        else:
            records = pred.generate_records(
                self.model, data, self.generation, batch_size=batch, progress=progress, backend=backend
            )
        scores = generation_scores(*pred.prediction_pairs(records))
        runtime = time.perf_counter() - started

        if out is not None:
            results = pred.results_dict(scores, num_samples=len(records), runtime_s=runtime)
            pred.write_results(out, results, self._record(data, cfg))
        return EvalReport(
            scores=scores, records=tuple(records), output_dir=out, num_samples=len(records), runtime_s=runtime
        )

    def benchmark(
        self,
        task: str,
        *,
        task_dir: str | os.PathLike[str],
        split: str | None = None,
        n_shot: int = 5,
        lang: Literal["en", "zh"] | None = None,
        batch_size: int = 8,
        seed: int = 42,
        scoring: Literal["letter", "loglikelihood"] = "letter",
        save_dir: str | os.PathLike[str] | None = None,
        subjects: Sequence[str] | None = None,
        template: str | None = None,
        progress: bool = True,
    ) -> BenchmarkResult:
        """Few-shot multiple-choice accuracy on MMLU, CMMLU or C-Eval, read from local CSV files.

        ``task`` is ``"mmlu"``, ``"cmmlu"``, ``"ceval"`` or LLaMA-Factory's ``"mmlu_test"``,
        ``"cmmlu_test"``, ``"ceval_validation"``; ``task_dir`` the folder holding the benchmark's
        ``dev/`` and ``test/`` (or ``val/``) folders as released. ``scoring="letter"`` is
        LLaMA-Factory's recipe (chat-template prompt, ``n_shot`` exemplars shuffled with ``seed``,
        softmax over the A/B/C/D logits); ``"loglikelihood"`` is lm-evaluation-harness's (raw text,
        the first ``n_shot`` dev questions, log-likelihood of each choice). ``lang`` picks the
        wording (default: the benchmark's language); ``template`` a named chat template for the
        letter prompts instead of the model's (LLaMA-Factory's tutorial uses ``"fewshot"``);
        ``subjects`` limits the run. With ``save_dir``, ``results.json`` and ``results.log`` are
        written there (it must be new or empty). Example::

            result = Evaluator(model).benchmark("mmlu_test", task_dir="data/mmlu", template="fewshot")
            print(result.format())
        """
        if not isinstance(self.model, LoadedModel):
            raise TypeError(
                f"benchmark() scores from the model's logits, so it needs a LoadedModel; this Evaluator holds "
                f"{type(self.model).__name__}. Fix: Evaluator(ModelSource(...).load()).benchmark(...)"
            )
        if template is not None and scoring != "letter":
            raise ConfigError(
                f"template: got {template!r}, but {scoring} scoring writes raw text without a chat template "
                "(as lm-evaluation-harness does). Fix: leave template out, or use scoring='letter'"
            )
        spec, chosen = resolve_task(task, split)
        config = BenchmarkConfig(
            task=f"{spec.name}_{chosen}",
            task_dir=os.fspath(task_dir),
            lang=lang,
            n_shot=n_shot,
            batch_size=batch_size,
            seed=seed,
            save_dir=os.fspath(save_dir) if save_dir is not None else None,
            scoring=scoring,
            subjects=tuple([subjects] if isinstance(subjects, str) else subjects) if subjects is not None else None,
        )
        return run_benchmark(self.model, config, template=template, progress=progress)

    @classmethod
    def compare(
        cls,
        base: object,
        tuned: object,
        *,
        benchmarks: BenchmarkSpecs = (),
        datasets: DatasetSpecs = (),
        save_dir: str | os.PathLike[str] | None = None,
        generation: GenerationConfig | None = None,
        config: PredictConfig | None = None,
        progress: bool = True,
    ) -> Comparison:
        """Score a base model and a tuned one on the same benchmarks and datasets, and set the results side by side.

        ``base`` and ``tuned`` are anything an Evaluator takes (a ``LoadedModel``, ``ModelSource``,
        ``TrainResult``, ``ExportedModel``); ``tuned`` may also be an adapter folder, applied to
        ``base`` in memory. ``benchmarks`` is a ``task -> task_dir`` mapping or
        :class:`BenchmarkConfig` objects (for ``n_shot``, ``scoring``...); ``datasets`` loaded
        :class:`Conversations`, scored with ROUGE/BLEU under the same ``generation`` and ``config``
        for both models. With ``save_dir`` (new or empty), each run's files go to
        ``save_dir/{base,tuned}/<source>/`` and the comparison to ``comparison.md``,
        ``comparison.png`` and ``comparison.json``. Example::

            comparison = Evaluator.compare(
                model, result, datasets=[registry.load("shop_test")],
                benchmarks={"mmlu_test": "data/mmlu"}, save_dir="saves/compare",
            )
            comparison  # in Jupyter: the table and a bar chart of the differences
        """
        if config is not None and not isinstance(config, PredictConfig):
            raise TypeError(f"config must be a PredictConfig, got {type(config).__name__}")
        settings = (config or PredictConfig()).with_(output_dir=None)  # each side writes under save_dir
        first = cls(base, generation, settings)
        if isinstance(tuned, str | os.PathLike):
            tuned = _adapter_on(first.model, tuned)
        second = cls(tuned, generation, settings)
        return run_comparison(
            first,
            second,
            names=(_labelled(first.model), _labelled(second.model)),
            benchmarks=benchmarks,
            datasets=datasets,
            save_dir=save_dir,
            progress=progress,
        )

    def _record(self, data: Conversations, cfg: PredictConfig) -> dict[str, Any]:
        return provenance(
            "predict",
            model=_display(self.model),
            adapters=getattr(self.model, "adapters", ()),
            template=_template(self.model),
            datasets=data.names,
            config={"generation": self.generation.to_dict(), "predict": cfg.to_dict()},
            metrics={
                "rouge": "rouge_chinese F on jieba.cut(HMM=True, cut_all=False) words",
                "bleu": "nltk sentence_bleu on characters, SmoothingFunction().method3",
            },
        )


def _adapter_on(base: Engine, folder: str | os.PathLike[str]) -> LoadedModel:
    if not isinstance(base, LoadedModel):
        raise TypeError(
            f"tuned is an adapter folder ({os.fspath(folder)!r}), which is applied to a loaded base model; base is a "
            f"{type(base).__name__}. Fix: pass the base as a LoadedModel or ModelSource"
        )
    if not (Path(folder) / "adapter_config.json").is_file():
        raise ConfigError(
            f"tuned: {os.fspath(folder)!r} holds no adapter_config.json, so it is not a LoRA adapter folder. Fix: "
            "pass the training output_dir, or a merged model as ModelSource.local(folder)"
        )
    return base.with_adapter(folder)


def _display(engine: Engine) -> str:
    source = getattr(engine, "source", None)
    return source.display_name if source is not None else engine.name


def _labelled(engine: Engine) -> str:
    """:func:`_display` and the adapter folders applied, as a comparison names a model."""
    adapters = getattr(engine, "adapters", ())
    return f"{_display(engine)} + {', '.join(adapters)}" if adapters else _display(engine)


def _template(engine: Engine) -> str:
    template = getattr(engine, "template", None)
    return template.name if template is not None else "engine's own"
