"""The model card (README.md) of a merged export: Hub metadata, what it was trained from, and how to load it.

Only what is known goes in: the base model's Hub id when it has one, its license when its own card
says so, datasets and settings when the adapters' provenance records are on disk. The base model's
own README.md is never copied (it describes another model), and no token is ever written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_kit._artifacts import RUN_RECORD, TRAIN_RESULTS, read_record
from finetune_kit.models.bundled import BUNDLED_PREFIX

MODEL_CARD = "README.md"

# The bundled model is a GGUF of a Hub model: the card names that model and its license.
_BUNDLED_UPSTREAM: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "its Q4_1 GGUF, dequantized"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_CACHE_DIR = re.compile(r"^models--(.+?)--(.+)$")  # the Hub cache's folder of one repo (ids never hold "--")
_STAGE_TAGS = {"sft", "pt", "dpo", "kto", "orpo", "simpo", "rm", "ppo"}


@dataclass(frozen=True)
class _Base:
    shown: str | None = None  # how the body names it
    note: str = ""  # what kind of copy it was, after the name in the facts list
    hub_id: str | None = None
    license: dict[str, str] = field(default_factory=dict)  # license (+ license_name/license_link for "other")


@dataclass(frozen=True)
class _Adapter:
    shown: str
    record: dict[str, Any] | None


def model_card(info: Mapping[str, Any], *, metrics: Mapping[str, Any] | None = None) -> str:
    """The README.md text of an export whose provenance record is ``info`` (the export's ``finetune_kit_export.json``).

    Adapter folders named in ``info["adapters"]`` that still hold their training record give the
    datasets and settings; ``metrics`` (a ``TrainResult``'s) are the final metrics, else the last
    adapter's ``train_results.json`` when present. Example::

        text = model_card(json.loads(Path("merged/finetune_kit_export.json").read_text()))
    """
    import yaml

    base = _base(info)
    adapters = [_adapter(str(a)) for a in info.get("adapters") or ()]
    final = dict(metrics) if metrics is not None else _last_metrics(info)
    trained_on = [d for a in adapters for d in (a.record or {}).get("datasets") or ()]
    datasets = _unique([*(info.get("datasets") or ()), *trained_on])
    stages = _unique([_section(a.record, "method").get("stage") for a in adapters if a.record])
    export_cfg = _section(info, "export")
    repo_id = export_cfg.get("export_hub_model_id")
    folder = Path(str(export_cfg["export_dir"])).name if export_cfg.get("export_dir") else None

    meta: dict[str, Any] = {}
    if base.hub_id:
        meta["base_model"] = base.hub_id
    meta["library_name"] = "transformers"
    meta.update(base.license)
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["finetune_kit", *(["lora"] if adapters else []), *(s for s in stages if s in _STAGE_TAGS)]
    hub_datasets = [d for d in datasets if _HUB_ID.match(d)]  # a bare local name would link to an unrelated dataset
    if hub_datasets:
        meta["datasets"] = hub_datasets
    lines = [f"# {repo_id or folder or 'Merged model'}", "", _summary(base, adapters, info), ""]
    lines += _facts(base, adapters, info, datasets)
    lines += _training(adapters, final)
    lines += _usage(repo_id or folder or "path/to/this/folder")
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"---\n{front}---\n\n" + "\n".join(lines).rstrip() + "\n"


def _summary(base: _Base, adapters: Sequence[_Adapter], info: Mapping[str, Any]) -> str:
    version = info.get("finetune_kit_version")
    by = f"finetune_kit {version}" if version else "finetune_kit"
    if adapters:
        what = f"{'a LoRA adapter' if len(adapters) == 1 else f'{len(adapters)} LoRA adapters'} merged into its weights"
        head = f"{base.shown} with {what}" if base.shown else f"A model with {what}"
    else:
        head = f"{base.shown}, exported" if base.shown else "A model exported"
    return (
        f"{head[0].upper()}{head[1:]} by {by}. It is a plain `transformers` checkpoint: "
        "loading it needs neither finetune_kit nor peft."
    )


def _facts(base: _Base, adapters: Sequence[_Adapter], info: Mapping[str, Any], datasets: Sequence[str]) -> list[str]:
    facts = []
    if base.shown:
        facts.append(f"- **Base model:** {base.shown}{base.note}")
    if adapters:
        facts.append(f"- **Adapters merged:** {', '.join(f'`{a.shown}`' for a in adapters)}")
    template = _section(info, "model").get("template", info.get("template"))
    if template is not None or info.get("template"):
        named = f"finetune_kit's `{template}` template" if template else "the base tokenizer's own chat template"
        facts.append(
            f"- **Chat template:** {named}, saved with the tokenizer, so `apply_chat_template` builds prompts as in "
            "training; its stop tokens are `generation_config.json`'s `eos_token_id`, so `generate` stops at the end "
            "of a reply."
        )
    if datasets:
        facts.append(f"- **Datasets:** {', '.join(f'`{d}`' for d in datasets)}")
    if info.get("created"):
        facts.append(f"- **Exported:** {info['created']}")
    return [*facts, ""] if facts else []


def _training(adapters: Sequence[_Adapter], final: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    recorded = [a for a in adapters if a.record]
    if recorded or final:
        lines += ["## Training", ""]
    for adapter in recorded:
        record = adapter.record or {}
        trained_on = ", ".join(f"`{d}`" for d in record.get("datasets", ()))
        lines.append(f"`{adapter.shown}`" + (f", trained on {trained_on}" if trained_on else "") + ":")
        lines += ["", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in _settings(record)]
        lines.append("")
    numbers = {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numbers:
        lines += ["Final metrics of the last training run:", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(numbers.items())]
        lines.append("")
    return lines


def _settings(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    method, lora = _section(record, "method"), _section(record, "lora")
    t, enc, resolved = _section(record, "training"), _section(record, "encoding"), record.get("resolved") or {}
    rows: list[tuple[str, Any]] = [("stage", method.get("stage")), ("fine-tuning", method.get("finetuning_type"))]
    if method.get("finetuning_type", "lora") == "lora":
        targets = resolved.get("lora_target") or lora.get("lora_target")
        rows += [
            ("LoRA rank", lora.get("lora_rank")),
            ("LoRA alpha", resolved.get("lora_alpha", lora.get("lora_alpha"))),
            ("LoRA dropout", lora.get("lora_dropout")),
            ("LoRA target modules", ", ".join(map(str, targets)) if targets else None),
            ("LoRA variant", ", ".join(n for k, n in _VARIANTS if lora.get(k)) or None),
        ]
    steps = t.get("max_steps")
    rows += [
        ("learning rate", t.get("learning_rate")),
        ("max steps", steps) if isinstance(steps, int) and steps > 0 else ("epochs", t.get("num_train_epochs")),
        ("batch size per device", t.get("per_device_train_batch_size")),
        ("gradient accumulation steps", t.get("gradient_accumulation_steps")),
        ("learning-rate schedule", t.get("lr_scheduler_type")),
        ("warm-up steps", t.get("warmup_steps") or None),
        ("warm-up ratio", t.get("warmup_ratio") or None),
        ("mixed precision", "bf16" if t.get("bf16") else "fp16" if t.get("fp16") else None),
        ("cutoff length", enc.get("cutoff_len")),
        ("seed", t.get("seed")),
        ("trained", record.get("created")),
    ]
    return [(k, _fmt(v)) for k, v in rows if v is not None]


_VARIANTS = (("use_dora", "DoRA"), ("use_rslora", "rsLoRA"), ("pissa_init", "PiSSA"))


def _usage(model_id: str) -> list[str]:
    return [
        "## Use it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model_id = {json.dumps(model_id)}",
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")',
        'messages = [{"role": "user", "content": "Hello! Who are you?"}]',
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ").to(model.device)",
        "output = model.generate(**inputs, max_new_tokens=128)",
        'print(tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True))',
        "```",
    ]


def _base(info: Mapping[str, Any]) -> _Base:
    name = info.get("model")
    if not name:
        return _Base()
    name = str(name)
    model_cfg = _section(info, "model")
    if name.startswith(BUNDLED_PREFIX):
        upstream = _BUNDLED_UPSTREAM.get(name[len(BUNDLED_PREFIX) :])
        if upstream is None:
            return _Base(f"`{name}`")
        hub_id, licence, how = upstream
        return _Base(_link(hub_id), f" (finetune_kit's bundled copy `{name}`: {how})", hub_id, {"license": licence})
    if name.startswith("modelscope:") or model_cfg.get("use_modelscope"):
        return _Base(f"`{name.removeprefix('modelscope:')}`", " (ModelScope)")
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        return _Base(f"`{path.name}`", " (a GGUF file)")
    if path.is_dir() or name.startswith(("/", ".", "~")) or "\\" in name:
        cached = next((m for p in path.parts if (m := _HUB_CACHE_DIR.match(p))), None)
        if cached:  # a snapshot folder of the Hub cache: the Hub id is known
            hub_id = f"{cached[1]}/{cached[2]}"
            return _Base(_link(hub_id), "", hub_id, _license(path / MODEL_CARD))
        return _Base(f"`{path.name}`", " (a local folder)", None, _license(path / MODEL_CARD))
    if _HUB_ID.match(name):
        return _Base(_link(name), "", name, _license(_cached_card(name, model_cfg)))
    return _Base(f"`{name}`")


def _cached_card(repo_id: str, model_cfg: Mapping[str, Any]) -> Path | None:
    """The base model's README.md in the local Hub cache, if it was downloaded (never fetched here)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(
            repo_id, MODEL_CARD, cache_dir=model_cfg.get("cache_dir"), revision=model_cfg.get("model_revision")
        )
    except (OSError, ValueError):
        return None
    return Path(found) if isinstance(found, str) else None


def _license(readme: Path | None) -> dict[str, str]:
    """``license`` (with ``license_name``/``license_link`` when it is "other") from a model card's front matter."""
    if readme is None or not readme.is_file():
        return {}
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
        meta = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") else None
    except (OSError, UnicodeDecodeError, IndexError, yaml.YAMLError):
        return {}
    if not isinstance(meta, dict) or not isinstance(meta.get("license"), str):
        return {}
    keys = ("license", "license_name", "license_link") if meta["license"] == "other" else ("license",)
    return {k: meta[k] for k in keys if isinstance(meta.get(k), str)}


def _adapter(path: str) -> _Adapter:
    folder = Path(path)
    record = _read(folder / RUN_RECORD, record=True) if folder.is_dir() else None
    shown = folder.name if folder.is_dir() or not _HUB_ID.match(path) else path  # never a local path in full
    return _Adapter(shown, record)


def _last_metrics(info: Mapping[str, Any]) -> dict[str, Any]:
    adapters = info.get("adapters") or ()
    last = Path(str(adapters[-1])) if adapters else None
    return (_read(last / TRAIN_RESULTS) or {}) if last is not None and last.is_dir() else {}


def _read(path: Path, *, record: bool = False) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing or unreadable (the card then says less)."""
    if not path.is_file():
        return None
    try:
        data = read_record(path) if record else json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _section(record: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    config = (record or {}).get("config")
    section = config.get(name) if isinstance(config, dict) else None
    return section if isinstance(section, dict) else {}


def _unique(items: Sequence[Any]) -> list[str]:
    return list(dict.fromkeys(str(i) for i in items if i))


def _link(hub_id: str) -> str:
    return f"[{hub_id}](https://huggingface.co/{hub_id})"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
