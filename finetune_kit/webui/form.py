"""The Train tab's form as LLaMA-Factory keys: to YAML, from YAML, checked by ``finetune-kit train``'s parser.

The board never trains from anything but the YAML it shows: what the form holds becomes a flat
mapping of LLaMA-Factory keys (:func:`form_values`), checked with
:func:`finetune_kit.config.parse.build` over the sections of ``finetune-kit train`` (every
problem at once), written as the file ``finetune-kit train file.yaml`` runs (:func:`to_yaml`),
and read back into the form (:func:`from_yaml`).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_kit.config.parse import build, read_config_file
from finetune_kit.errors import ConfigError, OutputExistsError
from finetune_kit.models.bundled import BUNDLED_PREFIX
from finetune_kit.train.safety import checkpoints
from finetune_kit.train_command import TRAIN_SECTIONS, train_checks

BUNDLED_MODEL = BUNDLED_PREFIX + "smollm2-135m-instruct"
DEMO_DATA = Path(__file__).resolve().parent.parent / "data" / "demo"


@dataclass(frozen=True)
class Field:
    """One form field: its LLaMA-Factory key, the YAML group it is written under, and its default."""

    key: str
    group: str
    default: Any


# The form, in YAML order. Defaults are LLaMA Board's where it has one (batch 2 x accumulation 8,
# lr 5e-5, cosine, cutoff 2048); None or "" means "not written": the library's default applies.
FIELDS: tuple[Field, ...] = (
    Field("model_name_or_path", "model", BUNDLED_MODEL),
    Field("template", "model", ""),
    Field("stage", "method", "sft"),
    Field("finetuning_type", "method", "lora"),
    Field("lora_rank", "method", 8),
    Field("lora_alpha", "method", 16),
    Field("lora_dropout", "method", 0.0),
    Field("lora_target", "method", "all"),
    Field("dataset_dir", "dataset", ""),
    Field("dataset", "dataset", []),
    Field("cutoff_len", "dataset", 2048),
    Field("max_samples", "dataset", None),
    Field("val_size", "dataset", 0.0),
    Field("output_dir", "output", ""),
    Field("overwrite_output_dir", "output", False),
    Field("resume_from_checkpoint", "output", ""),
    Field("logging_steps", "output", 5),
    Field("save_steps", "output", 100),
    Field("learning_rate", "train", 5e-5),
    Field("num_train_epochs", "train", 3.0),
    Field("max_steps", "train", -1),
    Field("per_device_train_batch_size", "train", 2),
    Field("gradient_accumulation_steps", "train", 8),
    Field("lr_scheduler_type", "train", "cosine"),
    Field("warmup_ratio", "train", 0.0),
    Field("compute_type", "train", "fp32"),
    Field("seed", "train", 42),
)
FIELD_KEYS = tuple(f.key for f in FIELDS)
GROUPS = ("model", "method", "dataset", "output", "train", "extra")
PRECISIONS = ("fp32", "bf16", "fp16")
# written by the board into every run; what a loaded YAML says about them is taken as is
FIXED = {"do_train": True, "plot_loss": True}


def default_dataset_dir() -> str:
    """``data`` when the working folder has LLaMA-Factory's layout, else the bundled demo data."""
    return "data" if Path("data", "dataset_info.json").is_file() else str(DEMO_DATA)


def default_output_dir(model: str, finetuning_type: str = "lora") -> str:
    """LLaMA Board's naming: ``saves/<model>/<method>/train_<date>-<time>``."""
    name = model.removeprefix(BUNDLED_PREFIX).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "model"
    return str(Path("saves") / name / finetuning_type / time.strftime("train_%Y-%m-%d-%H-%M-%S"))


def defaults() -> dict[str, Any]:
    """The form's starting values."""
    values = {f.key: f.default for f in FIELDS}
    values["dataset_dir"] = default_dataset_dir()
    values["output_dir"] = default_output_dir(values["model_name_or_path"])
    return values


def form_values(form: Mapping[str, Any], extra_yaml: str = "") -> dict[str, Any]:
    """The LLaMA-Factory keys of a filled form (empty fields left out), then ``extra_yaml``'s keys.

    ``compute_type`` becomes ``bf16: true`` / ``fp16: true``; ``extra_yaml`` (any other keys, as
    YAML) may not repeat a form field.
    """

    unknown = sorted(set(form) - set(FIELD_KEYS))
    if unknown:
        raise ConfigError([f"unknown form field '{k}'" for k in unknown], header="Invalid form")
    values: dict[str, Any] = dict(FIXED)
    for key in FIELD_KEYS:
        value = form.get(key)
        if key == "compute_type":
            if value not in (None, "", "fp32"):
                values[str(value)] = True
            continue
        if isinstance(value, float) and value.is_integer() and isinstance(_default(key), int):
            value = int(value)  # gradio numbers arrive as floats
        if isinstance(value, str):
            value = value.strip()
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if value is None or value == "" or (key == "max_samples" and value == 0):
            continue
        values[key] = value
    extra = _extra(extra_yaml)
    repeated = sorted(set(extra) & set(values))
    if repeated:
        raise ConfigError(
            [f"'{k}' is set in the form and again in the extra keys. Fix: keep one of them" for k in repeated],
            header="Invalid extra keys",
        )
    values.update(extra)
    return values


def _default(key: str) -> Any:
    return next(f.default for f in FIELDS if f.key == key)


def _extra(text: str) -> dict[str, Any]:
    import yaml

    if not text.strip():
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the extra keys are not valid YAML: {exc}", header="Invalid extra keys") from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"the extra keys must be 'key: value' lines, got {type(data).__name__}. Fix: e.g. weight_decay: 0.01",
            header="Invalid extra keys",
        )
    return {str(k): v for k, v in data.items()}


def check(values: Mapping[str, Any]) -> None:
    """Check ``values`` as ``finetune-kit train`` would, and that the run has what it needs; all problems at once."""
    problems = []
    if not values.get("dataset"):
        problems.append("no dataset chosen. Fix: pick one or more datasets from dataset_dir")
    if not values.get("output_dir"):
        problems.append("output_dir is empty. Fix: name a new folder for the adapter, logs and checkpoints")
    try:
        build(values, TRAIN_SECTIONS, checks=(train_checks,))
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems, header="Cannot start training")


def check_output_dir(values: Mapping[str, Any]) -> None:
    """Refuse to write into a folder that holds something, unless overwrite or resume was chosen.

    Stricter than the trainer, which resumes silently from the last checkpoint of a used folder:
    the board asks the user to choose (resume, overwrite or a new folder).
    """
    out = Path(str(values.get("output_dir", "")))
    if not out.is_dir() or not any(out.iterdir()) or values.get("resume_from_checkpoint"):
        return
    if _true(values.get("overwrite_output_dir")):
        return
    found = checkpoints(out)
    if found:
        raise OutputExistsError(
            f"output_dir {out} holds an earlier run with {len(found)} checkpoint(s), the last {found[-1].name}. "
            "Fix: choose 'latest' (or a checkpoint) under Resume to continue it, a new output_dir, or tick "
            "'overwrite output dir' to start over"
        )
    raise OutputExistsError(
        f"output_dir {out} already exists and is not empty. Fix: choose a new output_dir, or tick "
        "'overwrite output dir' to write over it"
    )


def _true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on"))


def to_yaml(values: Mapping[str, Any]) -> str:
    """``values`` as an LLaMA-Factory-style YAML, grouped under ``### model``, ``### method``, ... comments."""
    import yaml

    group_of = {f.key: f.group for f in FIELDS}
    group_of.update({"do_train": "method", "stage": "method", "bf16": "train", "fp16": "train", "plot_loss": "output"})
    parts = []
    for group in GROUPS:
        keys = {k: v for k, v in values.items() if group_of.get(k, "extra") == group}
        if keys:
            body = yaml.safe_dump(keys, sort_keys=False, allow_unicode=True, default_flow_style=False)
            parts.append(f"### {group}\n{body}")
    return "".join(parts)


def command_line(path: str | os.PathLike[str]) -> str:
    """The shell command that runs the saved YAML."""
    return f"finetune-kit train {shlex.quote(os.fspath(path))}"


def save_yaml(values: Mapping[str, Any], path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write :func:`to_yaml` to ``path`` (a ``.yaml`` file); an existing file is kept unless ``overwrite``."""
    p = Path(path).expanduser()
    if p.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"config path {p}: expected a .yaml file name. Fix: e.g. configs/shop_lora.yaml")
    if p.exists() and not overwrite:
        raise OutputExistsError(f"{p} already exists. Fix: choose another file name, or tick 'overwrite' to replace it")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(to_yaml(values), encoding="utf-8")
    return p


def from_yaml(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """A config file as form values (every form field, defaults where the file is silent) and the extra keys.

    The extra keys are the file's keys the form has no field for, as YAML text; ``do_train`` and
    ``plot_loss``, which the board always sets, are dropped; ``bf16``/``fp16`` set the precision.
    """
    import yaml

    data = read_config_file(Path(path))
    form = {f.key: f.default for f in FIELDS}
    form["output_dir"] = ""
    for key in FIELD_KEYS:
        if key in data:
            form[key] = data.pop(key)
    for flag in ("bf16", "fp16"):
        if _true(data.get(flag)):
            form["compute_type"] = flag
        data.pop(flag, None)
    for key in FIXED:
        data.pop(key, None)
    if isinstance(form["dataset"], str):
        form["dataset"] = [d.strip() for d in form["dataset"].split(",") if d.strip()]
    for key in ("template", "resume_from_checkpoint", "dataset_dir", "lora_target"):
        if isinstance(form[key], (list, tuple)):
            form[key] = ",".join(str(v) for v in form[key])
        form[key] = "" if form[key] is None else str(form[key])
    extra = yaml.safe_dump(data, sort_keys=False, allow_unicode=True) if data else ""
    return form, extra
