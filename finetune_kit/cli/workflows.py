"""What the train / eval / chat / data-check commands do, in terms of the public stages."""

from __future__ import annotations

import sys
from typing import Any

from finetune_kit.config.run import RunConfig
from finetune_kit.data.config import DataConfig
from finetune_kit.errors import ConfigError
from finetune_kit.models.config import ModelConfig
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.train.config import LoraConfig, TrainingConfig


def _registry(data: DataConfig) -> Any:
    from finetune_kit.data.registry import DatasetRegistry

    return DatasetRegistry.from_dir(data.dataset_dir)


def run_train(run: RunConfig, model_cfg: ModelConfig, data: DataConfig, lora: LoraConfig, training: TrainingConfig,
              generation: GenerationConfig, predict: Any) -> None:
    from finetune_kit.models.loaded import load_model
    from finetune_kit.models.source import ModelSource
    from finetune_kit.train.trainer import LoraTrainer

    problems = []
    if run.do_train and not data.dataset:
        problems.append("do_train needs a dataset. Fix: dataset: name (from dataset_dir/dataset_info.json)")
    if run.do_predict and not data.eval_dataset:
        problems.append("do_predict needs eval_dataset. Fix: eval_dataset: name")
    if data.eval_dataset and data.val_size:
        problems.append("val_size and eval_dataset cannot both be set (as in LLaMA-Factory); pick one")
    if problems:
        raise ConfigError(problems)
    source = ModelSource.from_config(model_cfg)
    registry = _registry(data)
    tuned = None
    if run.do_train:
        model = load_model(source, for_training=True)
        train_set = registry.load(data.dataset, max_samples=data.max_samples)
        eval_set = None
        if data.val_size:
            train_set, eval_set = train_set.split(data.val_size, seed=training.seed)
        elif run.do_eval and data.eval_dataset:
            eval_set = registry.load(data.eval_dataset, max_samples=data.max_samples)
        trainer = LoraTrainer(model, lora, training, data)
        print(trainer.explain(train_set), flush=True)
        tokenized = trainer._tokenized(train_set)
        print("first example:\n" + tokenized.show(0, model.tokenizer), flush=True)
        result = trainer.train(tokenized, eval_set)
        print(f"\nTraining finished: {result}")
        for path in result.plots:
            print(f"Loss plot: {path}")
        print(f"Adapter, tokenizer, config and logs: {result.output_dir}")
        tuned = result
    if run.do_predict:
        model = tuned.load() if tuned is not None else source.load()
        _predict(model, data, generation, predict, training.output_dir)


def _predict(model: Any, data: DataConfig, generation: GenerationConfig, predict: Any, output_dir: str | None) -> None:
    from finetune_kit.evaluate.evaluator import Evaluator

    registry = _registry(data)
    eval_set = registry.load(data.eval_dataset, max_samples=data.max_samples)
    out = predict.output_dir or output_dir
    report = Evaluator(model, generation=generation, config=predict).predict(eval_set, output_dir=out)
    print(report.table())
    print(f"Predictions: {report.output_dir}")


def run_predict(model_cfg: ModelConfig, data: DataConfig, generation: GenerationConfig, predict: Any) -> None:
    from finetune_kit.models.source import ModelSource

    if not data.eval_dataset:
        raise ConfigError("eval needs eval_dataset. Fix: eval_dataset: name (from dataset_dir/dataset_info.json); "
                          "MMLU/CMMLU/C-Eval tasks are planned")
    if not predict.output_dir:
        raise ConfigError("eval needs output_dir for generated_predictions.jsonl. Fix: output_dir: saves/predict")
    _predict(ModelSource.from_config(model_cfg).load(), data, generation, predict, predict.output_dir)


def run_chat(model_cfg: ModelConfig, generation: GenerationConfig) -> None:
    from finetune_kit.models.loaded import Completion
    from finetune_kit.models.source import ModelSource

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
    from finetune_kit.data.conversations import check_dataset

    registry = _registry(data)
    names = list(data.dataset) if data.dataset else registry.names
    bad = 0
    for name in names:
        rows, errors = check_dataset(registry.spec(name), registry.dataset_dir)
        status = "ok" if not errors else f"{len(errors)} bad rows"
        print(f"{name}: {rows} rows, {status}")
        for err in errors[:50]:
            print(f"  {err}")
        if len(errors) > 50:
            print(f"  ... and {len(errors) - 50} more")
        bad += len(errors)
    if bad:
        print(f"\n{bad} rows need fixing; nothing was skipped silently: training refuses these files until fixed.",
              file=sys.stderr)
        return 1
    print("\nall rows are valid")
    return 0
