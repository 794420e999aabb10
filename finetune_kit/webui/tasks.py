"""What the board's buttons do, as plain functions over the library (tested without a browser).

Each returns text or Markdown for the page; errors are raised as the library raises them and
shown by :func:`finetune_kit.webui.texts.error_text`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.data.report import check_rows
from finetune_kit.data.templates import TEMPLATES
from finetune_kit.errors import ConfigError, OutputExistsError
from finetune_kit.evaluate.compare import Comparison
from finetune_kit.evaluate.config import BenchmarkConfig, PredictConfig
from finetune_kit.evaluate.evaluator import EVAL_GENERATION, Evaluator
from finetune_kit.evaluate.metrics import SCORE_KEYS
from finetune_kit.export.exporter import Exporter
from finetune_kit.export.gguf_set import describe_gguf
from finetune_kit.models.engine import Completion
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.models.loader import load_tokenizer
from finetune_kit.webui.form import BUNDLED_MODEL
from finetune_kit.webui.models import ModelCache, ModelChoice

PREVIEW_ROWS = 3
BENCHMARKS = ("mmlu", "cmmlu", "ceval")


def template_choices() -> list[str]:
    """The template menu: empty (the model's or adapter's own) and every named template."""
    return ["", *TEMPLATES]


def model_choices() -> list[str]:
    """The bundled model, then the hub models already in the local Hugging Face cache (nothing is downloaded)."""
    found = [BUNDLED_MODEL]
    try:
        from huggingface_hub import scan_cache_dir

        repos = scan_cache_dir().repos
    except Exception:  # no cache folder yet, or an unreadable one: offer the bundled model only
        return found
    found += sorted(r.repo_id for r in repos if r.repo_type == "model")
    return found


def dataset_names(dataset_dir: str) -> list[str]:
    """The dataset names of ``dataset_dir/dataset_info.json``."""
    return DatasetRegistry.from_dir(dataset_dir).names


def preview_rows(dataset_dir: str, names: Sequence[str], stage: str = "sft", rows: int = PREVIEW_ROWS) -> str:
    """The first ``rows`` examples of each dataset as ``stage`` reads them (normalized messages), as JSON."""
    registry = DatasetRegistry.from_dir(dataset_dir)
    shown = {}
    for name in _names(names):
        examples = registry.load(name, max_samples=rows, stage=stage)
        shown[name] = [_example(e) for e in examples]
    return json.dumps(shown, ensure_ascii=False, indent=1)


def _example(example: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"messages": [dict(m) for m in example.messages]}
    if example.rejected is not None:
        row["rejected"] = dict(example.rejected)
    if example.kto_tag is not None:
        row["kto_tag"] = example.kto_tag
    return row


def data_report(dataset_dir: str, names: Sequence[str], choice: ModelChoice | None, cutoff_len: int) -> str:
    """``finetune-kit data check``'s report: rows and bad rows; with a model, token lengths and truncation."""
    registry = DatasetRegistry.from_dir(dataset_dir)
    wanted = _names(names)
    if choice is None:
        return check_rows(registry, wanted).format()
    source = choice.source()
    tokenizer, template = load_tokenizer(source, source.resolve(), source.plan())
    report = registry.report(wanted, tokenizer, template, cutoff_len=int(cutoff_len))
    return f"Token lengths with the tokenizer of {source.display_name}:\n{report.format()}"


def _names(names: Sequence[str] | str) -> list[str]:
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n and n.strip()]
    if not wanted:
        raise ConfigError("no dataset chosen. Fix: pick one or more datasets from dataset_dir", header="No data")
    return wanted


def predict(
    cache: ModelCache,
    choice: ModelChoice,
    dataset_dir: str,
    names: Sequence[str],
    *,
    max_samples: int | None,
    max_new_tokens: int,
    batch_size: int,
    output_dir: str = "",
    compare: bool = False,
) -> Shown:
    """ROUGE/BLEU of the chosen model's replies on the datasets; with ``compare``, of the base model's too.

    ``output_dir`` (new or empty) receives ``generated_predictions.jsonl`` and the scores; with
    ``compare`` it is :meth:`Evaluator.compare`'s ``save_dir`` (each side under ``base/`` and
    ``tuned/``, the table and chart in ``comparison.md`` and ``comparison.png``).
    """
    _needs_adapter(choice, compare)
    data = DatasetRegistry.from_dir(dataset_dir).load(_names(names), max_samples=max_samples or None)
    tuned = cache.get(choice)
    gen = EVAL_GENERATION.with_(max_new_tokens=int(max_new_tokens))
    config = PredictConfig(per_device_eval_batch_size=int(batch_size))
    out = output_dir.strip() or None
    if compare:
        base = cache.base_of(choice, tuned)
        comparison = Evaluator.compare(
            base, tuned, datasets=[data], save_dir=out, generation=gen, config=config, progress=False
        )
        return _comparison(comparison)
    report = Evaluator(tuned, generation=gen, config=config).predict(data, output_dir=out, progress=False)
    rows = [f"| {k} | {report.scores[k]:.2f} |" for k in SCORE_KEYS]
    where = f"; predictions in `{report.output_dir}`" if report.output_dir is not None else ""
    note = f"{report.num_samples} samples, {choice.describe()}, {report.runtime_s:.1f} s{where}"
    return Shown("| metric | score |\n|---|---|\n" + "\n".join(rows) + f"\n\n{note}")


@dataclass(frozen=True)
class Shown:
    """What an Evaluate button shows: Markdown, and a chart of the before/after differences when there is one."""

    markdown: str
    figure: Any = None


def _comparison(comparison: Comparison) -> Shown:
    lines = [line for line in comparison.markdown().splitlines() if not line.startswith("![")]
    if lines and lines[0].startswith("# "):
        lines[0] = "####" + lines[0][1:]
    if comparison.save_dir is not None:
        lines += ["", f"`{comparison.save_dir}`: comparison.md, comparison.png, base/, tuned/"]
    return Shown("\n".join(lines), comparison.figure())


def _needs_adapter(choice: ModelChoice, compare: bool) -> None:
    if compare and not choice.adapters:
        raise ConfigError(
            "a before/after comparison needs an adapter: the base model is compared with the model plus adapter. "
            "Fix: fill in the adapter (a training output_dir), or untick the comparison",
            header="Cannot compare",
        )


def benchmark(
    cache: ModelCache,
    choice: ModelChoice,
    task: str,
    task_dir: str,
    *,
    n_shot: int,
    subjects: str = "",
    scoring: str = "letter",
    save_dir: str = "",
    compare: bool = False,
) -> Shown:
    """MMLU / CMMLU / C-Eval accuracy of the chosen model, or with ``compare`` of its base and it side by side."""
    _needs_adapter(choice, compare)
    if not task_dir.strip():
        raise ConfigError(
            "task_dir is empty. Fix: the folder holding the benchmark's dev/ and test/ (or val/) CSV folders",
            header="Cannot run the benchmark",
        )
    tuned = cache.get(choice)
    chosen = tuple(s.strip() for s in subjects.split(",") if s.strip()) or None
    method: Literal["letter", "loglikelihood"] = "loglikelihood" if scoring == "loglikelihood" else "letter"
    save = save_dir.strip() or None
    if compare:
        config = BenchmarkConfig(
            task=task, task_dir=task_dir.strip(), n_shot=int(n_shot), scoring=method, subjects=chosen
        )
        base = cache.base_of(choice, tuned)
        return _comparison(Evaluator.compare(base, tuned, benchmarks=[config], save_dir=save, progress=False))
    result = Evaluator(tuned).benchmark(
        task,
        task_dir=task_dir.strip(),
        n_shot=int(n_shot),
        subjects=chosen,
        scoring=method,
        save_dir=save,
        progress=False,
    )
    return Shown(f"```text\n{result.format()}\n```")


def export(
    cache: ModelCache,
    choice: ModelChoice,
    export_dir: str,
    *,
    export_size: int = 5,
    gguf_types: Sequence[str] = (),
    parity: bool = True,
    ollama: str = "",
    overwrite: bool = False,
) -> str:
    """Merge the adapter into the base and write it to ``export_dir`` (with GGUF, parity and Modelfile when asked)."""
    if not export_dir.strip():
        raise ConfigError("export_dir is empty. Fix: name a new folder for the merged model", header="Cannot export")
    target = Path(export_dir.strip())
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"export_dir {target} already holds files (an earlier export, or something else). Fix: choose a new "
            "folder, or tick 'Overwrite export dir' to replace it"
        )
    exporter = Exporter(cache.get(choice)).with_config(
        export_size=int(export_size),
        export_gguf=tuple(gguf_types),
        gguf_parity=bool(parity),
        export_ollama=ollama.strip() or None,
        overwrite_export_dir=bool(overwrite),
    )
    exported = exporter.merge(export_dir.strip())
    text = f"Merged model written to {exported.export_dir}\nfiles: {', '.join(exported.files)}"
    if exported.gguf is not None:
        text += "\n\n" + describe_gguf(exported.gguf)
        for report in exported.gguf.parity:
            text += "\n" + report.summary()
    return text


def chat_reply(
    cache: ModelCache,
    choice: ModelChoice,
    history: Sequence[dict[str, Any]],
    message: str,
    *,
    system: str = "",
    generation: GenerationConfig,
) -> Iterator[str]:
    """Stream the reply to ``message`` after ``history`` (chat messages), as the growing reply text.

    Uses :meth:`LoadedModel.stream`, the same streaming generation the server uses.
    """
    model = cache.get(choice)
    conversation = [{"role": str(m["role"]), "content": message_text(m)} for m in history]
    conversation.append({"role": "user", "content": message})
    reply = ""
    for piece in model.stream(conversation, generation, system=system.strip() or None):
        if isinstance(piece, Completion):
            yield piece.text
            return
        reply += piece
        yield reply


def message_text(message: dict[str, Any]) -> str:
    """The text of a chat message whose content is a string or a list of typed parts (gradio's format)."""
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))


def adapter_for_output(output_dir: str) -> str:
    """What the model row's adapter field takes after a run: the output_dir when it holds an adapter."""
    return output_dir if Path(output_dir, "adapter_config.json").is_file() else ""
