"""The ``finetune-kit`` commands: one table gives each its summary, its config sections and its handler."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_kit._version import __version__
from finetune_kit.cli.workflows import (
    eval_checks,
    plan_run,
    run_benchmark,
    run_chat,
    run_compare,
    run_data_check,
    run_predict,
    run_train,
)
from finetune_kit.config.base import StageConfig
from finetune_kit.config.parse import Built, Check, build, collect, describe
from finetune_kit.config.run import RunConfig
from finetune_kit.data.config import DataConfig, EncodingConfig
from finetune_kit.environment import Environment
from finetune_kit.evaluate.config import BenchmarkConfig, PredictConfig
from finetune_kit.export.config import ExportConfig
from finetune_kit.export.exporter import Exporter
from finetune_kit.export.gguf_set import describe_gguf
from finetune_kit.models.adapters import split_named_adapters
from finetune_kit.models.config import ModelConfig
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.models.source import ModelSource
from finetune_kit.quickstart import QuickstartConfig, run_quickstart
from finetune_kit.serve.config import ServeConfig
from finetune_kit.serve.server import Server
from finetune_kit.train.config import LoraConfig, MethodConfig, PreferenceConfig, TrainingConfig
from finetune_kit.train.distributed import is_main_process, plan_launch, run_launch
from finetune_kit.train_command import TRAIN_SECTIONS, train_checks
from finetune_kit.webui import launch as launch_board


def _parse(argv: Sequence[str], command: Command) -> Built | None:
    if "-h" in argv or "--help" in argv:
        print(f"usage: finetune-kit {command.usage}\n{command.summary}." + describe(command.sections))
        return None
    return build(collect(argv), command.sections, checks=command.checks)


def env(argv: Sequence[str]) -> int:
    print(Environment.detect().report())
    return 0


def version(argv: Sequence[str]) -> int:
    print(__version__)
    return 0


def train(argv: Sequence[str]) -> int:
    plan_only = "--plan" in argv
    cfg = _parse([a for a in argv if a != "--plan"], COMMANDS["train"])
    if cfg is None:
        return 0
    if plan_only:
        print(plan_run(cfg))
        return 0
    launch = plan_launch()
    if launch is not None:  # several GPUs (or FORCE_TORCHRUN): run this same command once per process
        return run_launch(launch, argv)
    run_train(
        cfg[RunConfig],
        cfg[ModelConfig],
        cfg[DataConfig],
        cfg[EncodingConfig],
        cfg[LoraConfig],
        cfg[TrainingConfig],
        cfg[GenerationConfig],
        cfg[PredictConfig],
        cfg[MethodConfig],
        cfg[PreferenceConfig],
    )
    return 0


def evaluate(argv: Sequence[str]) -> int:
    cfg = _parse(argv, COMMANDS["eval"])
    if cfg is not None and cfg[BenchmarkConfig].compare is not None:
        run_compare(cfg[ModelConfig], cfg[BenchmarkConfig], cfg[DataConfig], cfg[GenerationConfig], cfg[PredictConfig])
    elif cfg is not None and cfg[BenchmarkConfig].task is not None:
        run_benchmark(cfg[ModelConfig], cfg[BenchmarkConfig])
    elif cfg is not None:
        run_predict(cfg[ModelConfig], cfg[DataConfig], cfg[GenerationConfig], cfg[PredictConfig])
    return 0


def export(argv: Sequence[str]) -> int:
    cfg = _parse(argv, COMMANDS["export"])
    if cfg is not None:
        exported = Exporter(ModelSource.from_config(cfg[ModelConfig]), cfg[ExportConfig]).merge()
        print(f"Merged model written to {exported.export_dir} ({', '.join(exported.files)})")
        if exported.gguf is not None:
            print(describe_gguf(exported.gguf))
        if exported.hub_url is not None:
            print(f"Pushed to {exported.hub_url}")
    return 0


def api(argv: Sequence[str]) -> int:
    cfg = _parse(argv, COMMANDS["api"])
    if cfg is not None:
        model_cfg = cfg[ModelConfig]
        chain, named = split_named_adapters(model_cfg.adapter_name_or_path or ())
        model = ModelSource.from_config(model_cfg.with_(adapter_name_or_path=chain or None)).load()
        if named:  # name=folder entries: served side by side, each chosen by the request's model
            model = model.with_named_adapters(named)
        Server(model, config=cfg[ServeConfig], generation=cfg[GenerationConfig]).run()
    return 0


def chat(argv: Sequence[str]) -> int:
    cfg = _parse(argv, COMMANDS["chat"])
    if cfg is not None:
        run_chat(cfg[ModelConfig], cfg[GenerationConfig])
    return 0


def quickstart(argv: Sequence[str]) -> int:
    cfg = _parse(argv, COMMANDS["quickstart"])
    if cfg is not None:
        run_quickstart(cfg[QuickstartConfig])
    return 0


def data(argv: Sequence[str]) -> int:
    if not argv or argv[0] != "check":
        print(f"usage: finetune-kit {COMMANDS['data'].usage}")
        return 2
    rest = list(argv[1:])
    if rest and not rest[0].startswith("-") and "=" not in rest[0] and Path(rest[0]).is_dir():
        rest = [f"dataset_dir={rest[0]}", *rest[1:]]
    command = COMMANDS["data"]
    if "-h" in rest or "--help" in rest:
        _parse(rest, command)
        return 0
    values = collect(rest)
    # A training YAML checks as it trains, but RunConfig refuses a config with nothing to do and a
    # data check needs no do_train: the run keys are checked when given, not required.
    run_keys = set(RunConfig.field_names()) & values.keys()
    sections = tuple(s for s in command.sections if s is not RunConfig or run_keys)
    cfg = build(values, sections, checks=command.checks)
    return run_data_check(cfg[DataConfig], cfg[ModelConfig], cfg[EncodingConfig])


def webui(argv: Sequence[str]) -> int:
    if _parse(argv, COMMANDS["webui"]) is not None:
        launch_board()
    return 0


@dataclass(frozen=True)
class Command:
    """One ``finetune-kit`` command: what ``--help`` and the usage list say, what it parses, what runs."""

    usage: str
    summary: str
    run: Callable[[Sequence[str]], int]
    sections: tuple[type[StageConfig], ...] = ()
    checks: tuple[Check, ...] = ()


COMMANDS: dict[str, Command] = {
    "env": Command("env", "print Python, torch, CUDA, GPUs and library versions", env),
    "train": Command(
        "train config.yaml [key=value ...] [--key value ...] [--plan]",
        "fine-tune (LoRA/QLoRA/freeze/full; sft, pt, dpo, kto) and do_predict from an LLaMA-Factory-style YAML; "
        "on several GPUs it launches itself once per GPU (FORCE_TORCHRUN, NNODES, NODE_RANK, MASTER_ADDR, "
        "MASTER_PORT as in LLaMA-Factory); --plan prints the GPU memory plan and exits",
        train,
        TRAIN_SECTIONS,
        (train_checks,),
    ),
    "eval": Command(
        "eval config.yaml task=mmlu_test task_dir=DIR ... | eval config.yaml eval_dataset=NAME output_dir=DIR ... "
        "| eval config.yaml --compare ADAPTER [task=...] [eval_dataset=...] save_dir=DIR",
        "score MMLU/CMMLU/C-Eval (task, task_dir, n_shot, lang, save_dir), or generate on eval_dataset and score "
        "ROUGE/BLEU (predict); --compare ADAPTER does both for the model without and with the adapter and writes "
        "comparison.md and comparison.png",
        evaluate,
        (ModelConfig, MethodConfig, LoraConfig, DataConfig, GenerationConfig, PredictConfig, BenchmarkConfig),
        (eval_checks,),
    ),
    "export": Command(
        "export --model_name_or_path M --adapter_name_or_path A --export_dir D",
        "merge a LoRA adapter into its base model (export_dir, export_size)",
        export,
        (ModelConfig, MethodConfig, LoraConfig, ExportConfig),
    ),
    "api": Command(
        "api --model_name_or_path M [--adapter_name_or_path A]   (API_HOST, API_PORT, API_KEY)",
        "serve an OpenAI-compatible API (API_HOST, API_PORT, API_KEY)",
        api,
        (ModelConfig, MethodConfig, LoraConfig, GenerationConfig, ServeConfig),
    ),
    "chat": Command(
        "chat --model_name_or_path M [--adapter_name_or_path A] [--template T]",
        "chat in the terminal (type 'clear' to reset, 'exit' to quit)",
        chat,
        (ModelConfig, MethodConfig, LoraConfig, GenerationConfig),
    ),
    "quickstart": Command(
        "quickstart [--output_dir DIR] [--num_train_epochs N]",
        "the whole workflow offline on the bundled model",
        quickstart,
        (QuickstartConfig,),
    ),
    "data": Command(
        "data check CONFIG.yaml | DATASET_DIR [--dataset a,b] [key=value ...]",
        "check every row; with a model, token lengths, truncation and a histogram",
        data,
        TRAIN_SECTIONS,  # a train YAML is checked with the sections it trains with
    ),
    "webui": Command(
        "webui   (GRADIO_SERVER_NAME, GRADIO_SERVER_PORT, GRADIO_SHARE)",
        "the browser board: train, watch, evaluate, export and chat without writing YAML (needs the webui extra)",
        webui,
    ),
    "version": Command("version", "print the version", version),
}


def usage() -> str:
    """The top-level usage text, from :data:`COMMANDS`."""
    width = max(len(n) for n in COMMANDS) + 3
    lines = [
        f"  {(name + ' check') if name == 'data' else name:<{width + 3}}{c.summary}" for name, c in COMMANDS.items()
    ]
    return (
        "usage: finetune-kit <command> [config.yaml] [key=value ...] [--key value ...]\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n`finetune-kit <command> --help` lists the keys a command accepts."
    )


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a note is logged (a notebook's or a test's capture)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging() -> None:
    """Notes from the library (``finetune_kit.*`` loggers, INFO and up) go to stderr, one line each;
    launched processes other than rank 0 keep only warnings, so each note shows once."""
    logger = logging.getLogger("finetune_kit")
    if not logger.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("[finetune_kit] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)
