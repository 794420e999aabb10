"""What the board's buttons do, as plain functions over the library (tested without a browser).

Each returns text or Markdown for the page; errors are raised as the library raises them and
shown by :func:`finetune_kit.webui.texts.error_text`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.data.report import check_rows
from finetune_kit.data.templates import TEMPLATES
from finetune_kit.errors import ConfigError
from finetune_kit.evaluate.benchmark import BenchmarkResult
from finetune_kit.evaluate.evaluator import EVAL_GENERATION, Evaluator
from finetune_kit.evaluate.metrics import SCORE_KEYS
from finetune_kit.evaluate.result import EvalReport
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
) -> str:
    """ROUGE/BLEU of the chosen model's replies on the datasets; with ``compare``, of the base model's too.

    ``output_dir`` receives ``generated_predictions.jsonl`` and the scores (the tuned model's, and
    the base model's under ``output_dir/base``); it must be new or empty.
    """
    if compare and not choice.adapters:
        raise ConfigError(
            "a before/after comparison needs an adapter: the base model is compared with the model plus adapter. "
            "Fix: fill in the adapter (a training output_dir), or untick the comparison",
            header="Cannot compare",
        )
    data = DatasetRegistry.from_dir(dataset_dir).load(_names(names), max_samples=max_samples or None)
    tuned = cache.get(choice)
    gen = EVAL_GENERATION.with_(max_new_tokens=int(max_new_tokens))
    out = output_dir.strip() or None

    def run(model: Any, folder: str | None) -> EvalReport:
        evaluator = Evaluator(model, generation=gen).with_config(per_device_eval_batch_size=int(batch_size))
        return evaluator.predict(data, output_dir=folder, progress=False)

    after = run(tuned, out)
    if not compare:
        rows = [f"| {k} | {after.scores[k]:.2f} |" for k in SCORE_KEYS]
        table = "| metric | score |\n|---|---|\n" + "\n".join(rows)
        return f"{table}\n\n{_run_note(after, choice.describe())}"
    before = run(cache.base_of(choice, tuned), os.path.join(out, "base") if out else None)
    return f"{scores_table(before, after)}\n\n{_run_note(after, choice.describe())}"


def scores_table(before: EvalReport, after: EvalReport) -> str:
    """A Markdown before/after/delta table of two reports' ROUGE/BLEU."""
    lines = ["| metric | base | tuned | delta |", "|---|---|---|---|"]
    for k in SCORE_KEYS:
        old, new = before.scores[k], after.scores[k]
        lines.append(f"| {k} | {old:.2f} | {new:.2f} | {new - old:+.2f} |")
    return "\n".join(lines)


def _run_note(report: EvalReport, model: str) -> str:
    where = f"; predictions in `{report.output_dir}`" if report.output_dir is not None else ""
    return f"{report.num_samples} samples, {model}, {report.runtime_s:.1f} s{where}"


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
) -> str:
    """MMLU / CMMLU / C-Eval accuracy of the chosen model (and of its base with ``compare``), as Markdown."""
    if not task_dir.strip():
        raise ConfigError(
            "task_dir is empty. Fix: the folder holding the benchmark's dev/ and test/ (or val/) CSV folders",
            header="Cannot run the benchmark",
        )
    tuned = cache.get(choice)
    chosen = tuple(s.strip() for s in subjects.split(",") if s.strip()) or None
    save = save_dir.strip() or None

    def run(model: Any, folder: str | None) -> BenchmarkResult:
        return Evaluator(model).benchmark(
            task,
            task_dir=task_dir.strip(),
            n_shot=int(n_shot),
            subjects=chosen,
            scoring="loglikelihood" if scoring == "loglikelihood" else "letter",
            save_dir=folder,
            progress=False,
        )

    after = run(tuned, save)
    if not (compare and choice.adapters):
        return f"```text\n{after.format()}\n```"
    before = run(cache.base_of(choice, tuned), os.path.join(save, "base") if save else None)
    rows = {"Average": (before.accuracy, after.accuracy)}
    rows.update({c: (before.categories[c], v) for c, v in after.categories.items() if c in before.categories})
    lines = ["| | base | tuned | delta |", "|---|---|---|---|"]
    lines += [f"| {name} | {old:.2f} | {new:.2f} | {new - old:+.2f} |" for name, (old, new) in rows.items()]
    return "\n".join(lines) + f"\n\n```text\n{after.format()}\n```"


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
