"""What the train / eval / chat / data-check commands do, composed from the public stages only."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from finetune_kit._fs import write_json
from finetune_kit._version import __version__
from finetune_kit.config.parse import Built
from finetune_kit.config.run import RunConfig
from finetune_kit.data.config import DataConfig, EncodingConfig
from finetune_kit.data.conversations import Conversations, ConversationStream
from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.data.report import REPORT_JSON, REPORT_PLOT, DataReport, build_report, check_rows
from finetune_kit.errors import ConfigError
from finetune_kit.evaluate.config import BenchmarkConfig, PredictConfig
from finetune_kit.evaluate.evaluator import Evaluator
from finetune_kit.models.config import ModelConfig
from finetune_kit.models.engine import Completion
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.models.loaded import LoadedModel
from finetune_kit.models.loader import load_tokenizer
from finetune_kit.models.source import ModelSource
from finetune_kit.train.config import LoraConfig, MethodConfig, PreferenceConfig, TrainingConfig
from finetune_kit.train.distributed import check_sharding, is_main_process, plan_launch, visible_gpus
from finetune_kit.train.trainer import LoraTrainer


def say(*parts: object) -> None:
    if is_main_process():
        print(*parts, flush=True)


def run_train(
    run: RunConfig,
    model_cfg: ModelConfig,
    data: DataConfig,
    encoding: EncodingConfig,
    lora: LoraConfig,
    training: TrainingConfig,
    generation: GenerationConfig,
    predict: PredictConfig,
    method: MethodConfig | None = None,
    preference: PreferenceConfig | None = None,
) -> None:
    method, preference = method or MethodConfig(), preference or PreferenceConfig()
    source = ModelSource.from_config(model_cfg)
    if run.do_train:
        check_sharding(training)  # DeepSpeed/FSDP this machine cannot run: said before anything is read
    registry = DatasetRegistry.from_dir(data.dataset_dir)
    tuned: LoadedModel | None = None
    if run.do_train:
        assert data.dataset is not None  # train_checks
        # built first: what this machine cannot run (QLoRA without CUDA, ...) fails before any data is read
        trainer = LoraTrainer(source, lora, training, encoding, method, preference)
        train_set: Conversations | ConversationStream = (registry.stream if data.streaming else registry.load)(
            data.dataset,
            max_samples=data.max_samples,
            skip_invalid=data.skip_invalid,
            mix_strategy=data.mix_strategy,
            interleave_probs=data.interleave_probs,
            seed=training.seed,
            stage=method.stage,
        )
        if isinstance(train_set, ConversationStream):
            train_set = replace(train_set, buffer_size=data.buffer_size)
        eval_set = None
        if data.val_size and isinstance(train_set, Conversations):
            train_set, eval_set = train_set.split(data.val_size, seed=training.seed)
        elif run.do_eval and data.eval_dataset:
            eval_set = registry.load(
                data.eval_dataset, max_samples=data.max_samples, skip_invalid=data.skip_invalid, stage=method.stage
            )
        tokens = trainer.tokenize(train_set)
        say(trainer.explain(tokens))
        if visible_gpus():
            say(trainer.plan(tokens))
        say("first example:\n" + tokens.show(0))
        result = trainer.train(tokens, eval_set)
        say(f"\nTraining finished: {result}")
        for path in result.plots:
            say(f"Loss plot: {path}")
        say(f"{'Adapter' if result.is_adapter else 'Model'}, tokenizer, config and logs: {result.output_dir}")
        if not is_main_process():
            return  # rank 0 alone predicts
        tuned = result.load() if run.do_predict else None
    if run.do_predict and is_main_process():
        _predict(
            tuned if tuned is not None else source.load(), registry, data, generation, predict, training.output_dir
        )


def plan_run(built: Built) -> str:
    """``finetune-kit train --plan``: the training's memory plan on the GPUs it would launch on."""
    trainer = LoraTrainer(
        ModelSource.from_config(built[ModelConfig]),
        built[LoraConfig],
        built[TrainingConfig],
        built[EncodingConfig],
        built[MethodConfig],
        built[PreferenceConfig],
    )
    launch = plan_launch()
    return str(trainer.plan(gpus=launch.world_size if launch is not None else None))


def _predict(
    model: LoadedModel,
    registry: DatasetRegistry,
    data: DataConfig,
    generation: GenerationConfig,
    predict: PredictConfig,
    output_dir: str | None,
) -> None:
    assert data.eval_dataset is not None
    eval_set = registry.load(data.eval_dataset, max_samples=data.max_samples, skip_invalid=data.skip_invalid)
    out = predict.output_dir or output_dir
    report = Evaluator(model, generation=generation, config=predict).predict(eval_set, output_dir=out)
    say(report.table())
    say(f"Predictions: {report.output_dir}")


def eval_checks(built: Built) -> list[str]:
    """Cross-section rules of ``finetune-kit eval``: a benchmark (``task``) or a prediction (``eval_dataset``)."""
    bench, data = built[BenchmarkConfig], built[DataConfig]
    if bench.compare is not None:
        return _compare_checks(bench, data, built[PredictConfig])
    if bench.task is not None and data.eval_dataset:
        return [
            f"task ({bench.task}) and eval_dataset ({','.join(data.eval_dataset)}) ask for two different runs: a "
            "benchmark and a prediction. Fix: keep one of them (run eval twice for both)"
        ]
    unused = bench.unused_keys()
    if unused:
        return [
            f"{', '.join(unused)} set the benchmark, but no task names one. Fix: add task: mmlu_test (or cmmlu_test, "
            "ceval_validation), or remove them"
        ]
    return []


def _compare_checks(bench: BenchmarkConfig, data: DataConfig, predict: PredictConfig) -> list[str]:
    problems = []
    if bench.task is None and not data.eval_dataset:
        problems.append(
            f"compare ({bench.compare}) needs something to score: task (a benchmark), eval_dataset (a prediction) "
            "or both. Fix: add task: mmlu_test with task_dir, and/or eval_dataset: name"
        )
    if bench.save_dir is None and predict.output_dir is None:
        problems.append(
            "compare writes comparison.md and comparison.png, and each model's results, into a folder. Fix: "
            "save_dir: saves/compare (or output_dir)"
        )
    elif bench.save_dir is not None and predict.output_dir is not None and bench.save_dir != predict.output_dir:
        problems.append(
            f"compare writes one folder, but save_dir ({bench.save_dir}) and output_dir ({predict.output_dir}) "
            "differ. Fix: give only one of them"
        )
    return problems


def run_compare(
    model_cfg: ModelConfig,
    bench: BenchmarkConfig,
    data: DataConfig,
    generation: GenerationConfig,
    predict: PredictConfig,
) -> None:
    """``finetune-kit eval --compare ADAPTER``: the model without and with the adapter, side by side."""
    assert bench.compare is not None  # the caller dispatches on it
    datasets = []
    if data.eval_dataset:
        registry = DatasetRegistry.from_dir(data.dataset_dir)
        datasets = [
            registry.load(name, max_samples=data.max_samples, skip_invalid=data.skip_invalid)
            for name in data.eval_dataset
        ]
    comparison = Evaluator.compare(
        ModelSource.from_config(model_cfg).load(),
        bench.compare,
        benchmarks=[bench.with_(save_dir=None, compare=None)] if bench.task is not None else [],
        datasets=datasets,
        save_dir=bench.save_dir or predict.output_dir,
        generation=generation,
        config=predict,
    )
    say(comparison.format())
    if comparison.save_dir is not None:
        say(f"\nComparison: {comparison.save_dir / 'comparison.md'} and comparison.png")


def run_benchmark(model_cfg: ModelConfig, bench: BenchmarkConfig) -> None:
    """``finetune-kit eval task=...``: LLaMA-Factory's ``llamafactory-cli eval``, on local benchmark files."""
    assert bench.task is not None  # the caller dispatches on it
    evaluator = Evaluator(ModelSource.from_config(model_cfg).load())
    result = evaluator.benchmark(
        bench.task,
        task_dir=bench.task_dir,
        n_shot=bench.n_shot,
        lang=bench.lang,
        batch_size=bench.batch_size,
        seed=bench.seed,
        scoring=bench.scoring,
        save_dir=bench.save_dir,
        subjects=bench.subjects,
    )
    say(result.format())
    if result.save_dir is not None:
        say(f"\nResults: {result.save_dir}")


def run_predict(model_cfg: ModelConfig, data: DataConfig, generation: GenerationConfig, predict: PredictConfig) -> None:
    problems = []
    if not data.eval_dataset:
        problems.append(
            "eval needs eval_dataset (a prediction) or task (a benchmark). Fix: eval_dataset: name (from "
            "dataset_dir/dataset_info.json), or task: mmlu_test with task_dir"
        )
    if not predict.output_dir:
        problems.append("eval needs output_dir for generated_predictions.jsonl. Fix: output_dir: saves/predict")
    if problems:
        raise ConfigError(problems)
    registry = DatasetRegistry.from_dir(data.dataset_dir)
    _predict(ModelSource.from_config(model_cfg).load(), registry, data, generation, predict, predict.output_dir)


def run_chat(model_cfg: ModelConfig, generation: GenerationConfig) -> None:
    model = ModelSource.from_config(model_cfg).load()
    print(f"{model!r}\nType your message; 'clear' resets the history, 'exit' quits.")
    history: list[dict[str, str]] = []
    while True:
        try:
            query = input("\nUser: ")
        except EOFError:
            break
        if query.strip() == "exit":
            break
        if query.strip() == "clear":
            history = []
            print("History cleared.")
            continue
        history.append({"role": "user", "content": query})
        print("Assistant: ", end="", flush=True)
        reply = ""
        for piece in model.stream(history, generation):
            if isinstance(piece, Completion):
                reply = piece.text
            else:
                print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": reply})


def run_data_check(
    data: DataConfig,
    model_cfg: ModelConfig | None = None,
    encoding: EncodingConfig | None = None,
    *,
    report_dir: str | os.PathLike[str] = ".",
) -> int:
    """``finetune-kit data check``: rows and bad rows; with a model, token lengths too (and the report files).

    Without ``model_name_or_path`` (the ``DATASET_DIR`` form) only rows are checked. With one, only
    its tokenizer is loaded and :data:`REPORT_PLOT` and :data:`REPORT_JSON` are written to
    ``report_dir`` (not to ``output_dir``: training refuses a non-empty ``output_dir``).
    Returns the exit status: 1 when any row is bad.
    """
    registry = DatasetRegistry.from_dir(data.dataset_dir)
    names = list(dict.fromkeys([*(data.dataset or ()), *(data.eval_dataset or ())])) or registry.names
    if model_cfg is None or not model_cfg.model_name_or_path:
        report = check_rows(registry, names)
        print(report.format())
    else:
        source = ModelSource.from_config(model_cfg)
        tokenizer, template = load_tokenizer(source, source.resolve(), source.plan())
        enc = encoding or EncodingConfig()
        report = build_report(
            registry,
            names,
            tokenizer,
            template,
            cutoff_len=enc.cutoff_len,
            train_on_prompt=enc.train_on_prompt,
            mask_history=enc.mask_history,
            max_samples=data.max_samples,
        )
        print(f"Token lengths with the tokenizer of {source.display_name}:\n{report.format()}")
        _write_report(report, Path(report_dir), source.display_name)
    if report.bad_count:
        print(
            f"\n{report.bad_count} rows need fixing; nothing was skipped silently: training refuses these files "
            "until fixed.",
            file=sys.stderr,
        )
        return 1
    print("\nall rows are valid")
    return 0


def _write_report(report: DataReport, folder: Path, model: str) -> None:
    record = {"finetune_kit_version": __version__, "model": model, **report.to_dict()}
    write_json(folder / REPORT_JSON, record)
    print(f"\nReport: {folder / REPORT_JSON}")
    if report.measured:
        print(f"Length histogram: {report.histogram(folder / REPORT_PLOT)}")
