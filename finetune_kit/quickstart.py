"""``finetune-kit quickstart``: the whole workflow, offline, on the bundled model and demo data.

environment -> bundled SmolLM2-135M-Instruct -> demo after-sales dataset -> LoRA SFT -> before/after
comparison (ROUGE/BLEU on the test split, accuracy on a small general-knowledge quiz; table and chart)
-> merge -> one chat answer -> how to serve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from finetune_kit.config.base import StageConfig, option
from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.environment import Environment
from finetune_kit.evaluate.config import BenchmarkConfig
from finetune_kit.evaluate.evaluator import Evaluator
from finetune_kit.export.exporter import Exporter
from finetune_kit.models.generation import DEFAULT_GENERATION
from finetune_kit.models.source import ModelSource
from finetune_kit.train.trainer import LoraTrainer


@dataclass(frozen=True, repr=False)
class QuickstartConfig(StageConfig):
    """Settings of the quickstart run (defaults finish in a few minutes on 2 CPU cores)."""

    section = "quickstart"

    output_dir: str | None = option(None, "Where everything goes (default: ./quickstart_output/run-<time>).")
    num_train_epochs: float = option(3.0, "Epochs over the demo training data.")
    learning_rate: float = option(3e-3, "LoRA learning rate.")
    lora_rank: int = option(8, "LoRA rank.")
    per_device_train_batch_size: int = option(8, "Training batch size.")
    max_new_tokens: int = option(64, "Longest generated answer when predicting.")
    template: str = option("chatml", "Chat template (ChatML, the bundled model's format, without a default system).")
    seed: int = option(42, "Random seed.")
    quiz_shots: int = option(
        0, "Solved examples shown before each question of the general-knowledge quiz (mmlu_mini; 0 is fastest)."
    )


def _step(n: int, title: str) -> None:
    print(f"\n{'=' * 70}\n[{n}/7] {title}\n{'=' * 70}", flush=True)


def run_quickstart(cfg: QuickstartConfig) -> Path:
    """Run the quickstart and return its output folder."""
    start = time.time()
    out = Path(cfg.output_dir or Path("quickstart_output") / time.strftime("run-%Y%m%d-%H%M%S")).absolute()
    print(f"finetune_kit quickstart: everything will be written under {out}")

    _step(1, "Environment")
    print(Environment.detect().report())

    _step(2, "Bundled model: SmolLM2-135M-Instruct (offline)")
    model = ModelSource.bundled().load(template=cfg.template)
    print(model)

    _step(3, "Demo data: an e-commerce after-sales assistant (alpaca + sharegpt, zh + en)")
    registry = DatasetRegistry.demo()
    train_set = registry.load("shop_alpaca,shop_sharegpt")
    test_set = registry.load("shop_test")
    print(f"train: {train_set}\ntest:  {test_set}")

    generation = DEFAULT_GENERATION.with_(max_new_tokens=cfg.max_new_tokens)
    _step(4, "LoRA supervised fine-tuning")
    trainer = (
        LoraTrainer(model)
        .with_lora(lora_rank=cfg.lora_rank, lora_target="all")
        .with_data(cutoff_len=256)
        .with_training(
            output_dir=out / "lora",
            learning_rate=cfg.learning_rate,
            num_train_epochs=cfg.num_train_epochs,
            per_device_train_batch_size=cfg.per_device_train_batch_size,
            lr_scheduler_type="cosine",
            warmup_ratio=0.05,
            logging_steps=5,
            save_steps=10_000,
            group_by_length=True,
            plot_loss=True,
            seed=cfg.seed,
        )
    )
    tokens = trainer.tokenize(train_set)
    print(trainer.explain(tokens), flush=True)
    result = trainer.train(tokens)
    print(result)

    _step(5, "Before / after: the base model and the fine-tuned one (still in memory) on the same tests")
    print(
        "shop_test: answers to the 30 held-out questions, ROUGE/BLEU against the references;\n"
        f"mmlu_test: mmlu_mini, 90 general-knowledge questions in MMLU's layout ({cfg.quiz_shots}-shot), "
        "to see that fine-tuning did not break what the model knew",
        flush=True,
    )
    comparison = Evaluator.compare(
        model,
        result,
        datasets=[test_set],
        benchmarks=[BenchmarkConfig.demo(n_shot=cfg.quiz_shots)],
        generation=generation,
        save_dir=out / "compare",
    )
    print(comparison.format())

    _step(6, "Merge the adapter into the base model")
    exported = Exporter(result).with_config(export_size=1).merge(out / "merged")
    print(exported)

    _step(7, "Chat with the merged model")
    merged = exported.load()
    for question in ("运费多少钱？", "Do you offer free shipping?"):
        print(f"User: {question}\nAssistant: {merged.chat(question, generation=generation)}")

    minutes = (time.time() - start) / 60
    print(f"\nDone in {minutes:.1f} min. Everything is under {out}:")
    print(f"  {out / 'lora'}            adapter, training_loss.png, trainer_log.jsonl, config")
    print(f"  {out / 'compare'}         comparison.md and comparison.png (before/after), each side's predictions")
    print(f"  {out / 'merged'}          merged model (loads with plain transformers)")
    print("\nServe it with an OpenAI-compatible API:")
    print(f"  API_PORT=8000 finetune-kit api --model_name_or_path {out / 'merged'} --template {cfg.template}")
    print(
        '  curl http://localhost:8000/v1/chat/completions -H "Content-Type: application/json" '
        '-d \'{"model": "shop", "messages": [{"role": "user", "content": "运费多少钱？"}]}\''
    )
    return out
