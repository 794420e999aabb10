"""What the train / eval / chat / data-check commands do, composed from the public stages only."""

from __future__ import annotations

import os
import sys

from finetune_kit.config.parse import Built
from finetune_kit.config.run import RunConfig
from finetune_kit.data.config import DataConfig, EncodingConfig
from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.errors import ConfigError
from finetune_kit.evaluate.config import PredictConfig
from finetune_kit.evaluate.evaluator import Evaluator
from finetune_kit.models.config import ModelConfig
from finetune_kit.models.engine import Completion
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.models.loaded import LoadedModel
from finetune_kit.models.source import ModelSource
from finetune_kit.train.config import LoraConfig, TrainingConfig
from finetune_kit.train.trainer import LoraTrainer


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch (only rank 0 prints)."""
    return os.environ.get("RANK", "0") == "0"


def say(*parts: object) -> None:
    if is_main_process():
        print(*parts, flush=True)


def train_checks(built: Built) -> list[str]:
    """Cross-section rules of ``finetune-kit train`` (reported with every other problem)."""
    run, data = built[RunConfig], built[DataConfig]
    problems = []
    if run.do_train and not data.dataset:
        problems.append("do_train needs a dataset. Fix: dataset: name (from dataset_dir/dataset_info.json)")
    if run.do_predict and not data.eval_dataset:
        problems.append("do_predict needs eval_dataset. Fix: eval_dataset: name")
    if data.eval_dataset and data.val_size:
        problems.append("val_size and eval_dataset cannot both be set (as in LLaMA-Factory); pick one")
    return problems


def run_train(
    run: RunConfig,
    model_cfg: ModelConfig,
    data: DataConfig,
    encoding: EncodingConfig,
    lora: LoraConfig,
    training: TrainingConfig,
    generation: GenerationConfig,
    predict: PredictConfig,
) -> None:
    source = ModelSource.from_config(model_cfg)
    registry = DatasetRegistry.from_dir(data.dataset_dir)
    tuned: LoadedModel | None = None
    if run.do_train:
        assert data.dataset is not None  # train_checks
        train_set = registry.load(data.dataset, max_samples=data.max_samples)
        eval_set = None
        if data.val_size:
            train_set, eval_set = train_set.split(data.val_size, seed=training.seed)
        elif run.do_eval and data.eval_dataset:
            eval_set = registry.load(data.eval_dataset, max_samples=data.max_samples)
        trainer = LoraTrainer(source, lora, training, encoding)
        tokens = trainer.tokenize(train_set)
        say(trainer.explain(tokens))
        say("first example:\n" + tokens.show(0))
        result = trainer.train(tokens, eval_set)
        say(f"\nTraining finished: {result}")
        for path in result.plots:
            say(f"Loss plot: {path}")
        say(f"Adapter, tokenizer, config and logs: {result.output_dir}")
        tuned = result.load()
    if run.do_predict:
        _predict(
            tuned if tuned is not None else source.load(), registry, data, generation, predict, training.output_dir
        )


def _predict(
    model: LoadedModel,
    registry: DatasetRegistry,
    data: DataConfig,
    generation: GenerationConfig,
    predict: PredictConfig,
    output_dir: str | None,
) -> None:
    assert data.eval_dataset is not None
    eval_set = registry.load(data.eval_dataset, max_samples=data.max_samples)
    out = predict.output_dir or output_dir
    report = Evaluator(model, generation=generation, config=predict).predict(eval_set, output_dir=out)
    say(report.table())
    say(f"Predictions: {report.output_dir}")


def run_predict(model_cfg: ModelConfig, data: DataConfig, generation: GenerationConfig, predict: PredictConfig) -> None:
    problems = []
    if not data.eval_dataset:
        problems.append(
            "eval needs eval_dataset. Fix: eval_dataset: name (from dataset_dir/dataset_info.json); "
            "MMLU/CMMLU/C-Eval tasks are planned"
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


def run_data_check(data: DataConfig) -> int:
    registry = DatasetRegistry.from_dir(data.dataset_dir)
    names = list(data.dataset) if data.dataset else registry.names
    bad = 0
    for name in names:
        rows, errors = registry.check(name)
        status = "ok" if not errors else f"{len(errors)} bad rows"
        print(f"{name}: {rows} rows, {status}")
        for err in errors[:50]:
            print(f"  {err}")
        if len(errors) > 50:
            print(f"  ... and {len(errors) - 50} more")
        bad += len(errors)
    if bad:
        print(
            f"\n{bad} rows need fixing; nothing was skipped silently: training refuses these files until fixed.",
            file=sys.stderr,
        )
        return 1
    print("\nall rows are valid")
    return 0
