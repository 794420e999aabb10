"""The Train tab: model, data, method and hyperparameters; YAML preview, save and load; start, stop, watch, resume."""

from __future__ import annotations

from typing import Any

from finetune_kit.train.plot import loss_figure
from finetune_kit.webui import form, tasks
from finetune_kit.webui.board import Board, Labels, ModelRow, choice_of, panel
from finetune_kit.webui.runner import RunStatus, checkpoint_choices
from finetune_kit.webui.texts import error_text, text

STAGES = ("sft", "pt", "dpo", "kto")
METHODS = ("lora", "freeze", "full")
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
# form fields shown as numbers, and whether each is an integer
NUMBERS = {
    "learning_rate": False,
    "num_train_epochs": False,
    "max_steps": True,
    "per_device_train_batch_size": True,
    "gradient_accumulation_steps": True,
    "cutoff_len": True,
    "max_samples": True,
    "val_size": False,
    "warmup_ratio": False,
    "seed": True,
    "logging_steps": True,
    "save_steps": True,
    "lora_rank": True,
    "lora_alpha": True,
    "lora_dropout": False,
}


def status_text(status: RunStatus, lang: str) -> str:
    """The status line under the buttons: state, step count, percentage, loss and ETA."""
    if status.state in ("idle", "finished", "stopping", "stopped"):
        head = text(f"state.{status.state}", lang)
    elif status.state == "failed":
        head = text("state.failed", lang).format(code=status.returncode)
    else:
        head = text("state.running", lang)
    if status.total:
        loss = f" · loss {status.loss:.4f}" if status.loss is not None else ""
        eta = text("eta", lang).format(elapsed=status.elapsed, remaining=status.remaining)
        head += f" · step {status.step}/{status.total} ({status.percentage:.0f}%){loss} · {eta}"
    elif status.active:
        head += f" · {text('state.loading', lang)}"
    if status.output_dir:
        head += f"\n\n`{status.output_dir}`"
    return head


def loss_plot(status: RunStatus) -> Any:
    """The run's loss curve so far (raw and smoothed; eval loss when there is one), steps fixed to the run's total."""
    return loss_figure(status.history(), size=(7.0, 3.2), xmax=status.total or None)


def build(board: Board, labels: Labels, row: ModelRow) -> Any:
    """Lay out the Train tab inside the current ``gr.Tab`` and wire its events; returns its timer, which the
    page starts on load while a run goes on (a page opened or reloaded mid-run follows it)."""
    import gradio as gr

    lang = labels.lang
    start = form.defaults()
    fields: dict[str, Any] = {"model_name_or_path": row.model, "template": row.template}

    def number(key: str) -> Any:
        integer = NUMBERS[key]
        value = start[key]
        return labels(gr.Number(value=value, precision=0 if integer else None, **labels.kw(key)), key)

    with gr.Row():
        fields["stage"] = labels(gr.Dropdown(list(STAGES), value=start["stage"], **labels.kw("stage")), "stage")
        fields["finetuning_type"] = labels(
            gr.Dropdown(list(METHODS), value=start["finetuning_type"], **labels.kw("finetuning_type")),
            "finetuning_type",
        )
        fields["dataset_dir"] = labels(
            gr.Textbox(value=start["dataset_dir"], scale=2, **labels.kw("dataset_dir")), "dataset_dir"
        )
        fields["dataset"] = labels(
            gr.Dropdown(_names(start["dataset_dir"]), value=[], multiselect=True, scale=2, **labels.kw("dataset")),
            "dataset",
        )
    with gr.Row():
        preview = labels(gr.Button(text("preview", lang), size="sm"), "preview", "value")
        check = labels(gr.Button(text("check_data", lang), size="sm"), "check_data", "value")
    notice = gr.Markdown(elem_id="fk-train-notice")
    data_out = labels(
        gr.Code(language="json", lines=6, max_lines=18, interactive=False, visible=False, **labels.kw("data_out")),
        "data_out",
    )
    with labels(gr.Accordion(text("hyper", lang), open=True), "hyper"):
        with gr.Row():
            for key in ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size"):
                fields[key] = number(key)
            fields["gradient_accumulation_steps"] = number("gradient_accumulation_steps")
        with gr.Row():
            for key in ("cutoff_len", "max_samples", "val_size"):
                fields[key] = number(key)
            fields["lr_scheduler_type"] = labels(
                gr.Dropdown(list(SCHEDULES), value=start["lr_scheduler_type"], **labels.kw("lr_scheduler_type")),
                "lr_scheduler_type",
            )
            fields["warmup_ratio"] = number("warmup_ratio")
        with gr.Row():
            fields["compute_type"] = labels(
                gr.Dropdown(list(form.PRECISIONS), value=start["compute_type"], **labels.kw("compute_type")),
                "compute_type",
            )
            for key in ("seed", "logging_steps", "save_steps"):
                fields[key] = number(key)
    with labels(gr.Accordion(text("lora", lang), open=False), "lora"):
        with gr.Row():
            for key in ("lora_rank", "lora_alpha", "lora_dropout"):
                fields[key] = number(key)
            fields["lora_target"] = labels(
                gr.Textbox(value=start["lora_target"], **labels.kw("lora_target")), "lora_target"
            )
    extra = labels(gr.Textbox(lines=2, placeholder="weight_decay: 0.01", **labels.kw("extra")), "extra")
    with gr.Row():
        fields["output_dir"] = labels(
            gr.Textbox(value=start["output_dir"], scale=3, **labels.kw("output_dir")), "output_dir"
        )
        fields["overwrite_output_dir"] = labels(
            gr.Checkbox(value=False, **labels.kw("overwrite_output_dir")), "overwrite_output_dir"
        )
        fields["resume_from_checkpoint"] = labels(
            gr.Dropdown([""], value="", allow_custom_value=True, scale=2, **labels.kw("resume_from_checkpoint")),
            "resume_from_checkpoint",
        )
        refresh = labels(gr.Button(text("refresh", lang), size="sm", scale=0), "refresh", "value")
    with gr.Row():
        config_path = labels(
            gr.Textbox(value="", placeholder="configs/train.yaml", scale=3, **labels.kw("config_path")), "config_path"
        )
        overwrite_file = labels(gr.Checkbox(value=False, **labels.kw("overwrite_file")), "overwrite_file")
        save = labels(gr.Button(text("save", lang), size="sm"), "save", "value")
        load = labels(gr.Button(text("load", lang), size="sm"), "load", "value")
        show = labels(gr.Button(text("preview_cmd", lang), size="sm"), "preview_cmd", "value")
    yaml_out = labels(
        gr.Code(language="yaml", lines=4, interactive=False, visible=False, **labels.kw("yaml_out")), "yaml_out"
    )
    with gr.Row():
        start_btn = labels(gr.Button(text("start", lang), variant="primary", elem_id="fk-start"), "start", "value")
        stop_btn = labels(gr.Button(text("stop", lang), variant="stop", elem_id="fk-stop"), "stop", "value")
    status = gr.Markdown(text("state.idle", lang), elem_id="fk-status")
    plot = labels(gr.Plot(format="png", elem_id="fk-loss", **labels.kw("loss_plot")), "loss_plot")
    log = labels(gr.Textbox(lines=10, max_lines=10, autoscroll=True, interactive=False, **labels.kw("log")), "log")
    timer = gr.Timer(1.0, active=False)
    shown_records = gr.State(0)

    keys = list(form.FIELD_KEYS)
    form_inputs = [fields[k] for k in keys]

    def values_of(args: tuple[Any, ...]) -> dict[str, Any]:
        *filled, extra_text = args
        return form.form_values(dict(zip(keys, filled, strict=True)), extra_text or "")

    def on_dir(dataset_dir: str, chosen: list[str], lang: str) -> tuple[Any, str]:
        try:
            names = tasks.dataset_names(dataset_dir)
        except Exception as exc:
            return gr.update(choices=[], value=[]), error_text(exc, lang)
        return gr.update(choices=names, value=[n for n in chosen or [] if n in names]), ""

    fields["dataset_dir"].blur(
        on_dir, [fields["dataset_dir"], fields["dataset"], row.lang], [fields["dataset"], notice]
    )
    preview.click(
        lambda d, n, s, lang: panel(lang, lambda: (tasks.preview_rows(d, n or [], s), "")),
        [fields["dataset_dir"], fields["dataset"], fields["stage"], row.lang],
        [data_out, notice],
    )
    check.click(
        lambda d, n, m, t, c, lang: panel(lang, lambda: (tasks.data_report(d, n or [], choice_of(m, t, ""), c), "")),
        [fields["dataset_dir"], fields["dataset"], row.model, row.template, fields["cutoff_len"], row.lang],
        [data_out, notice],
    )

    def preview_yaml(*args: Any) -> tuple[Any, str]:
        def show() -> tuple[str, str]:
            values = values_of(args[:-1])
            form.check(values)
            return form.to_yaml(values), ""

        return panel(args[-1], show)

    show.click(preview_yaml, [*form_inputs, extra, row.lang], [yaml_out, notice])

    def save_file(*args: Any) -> tuple[Any, str]:
        *rest, path, overwrite, lang = args

        def write() -> tuple[str, str]:
            values = values_of(tuple(rest))
            form.check(values)
            saved = form.save_yaml(values, path, overwrite=bool(overwrite))
            return form.to_yaml(values), f"{text('saved', lang).format(path=saved)} `{form.command_line(saved)}`"

        return panel(lang, write)

    save.click(save_file, [*form_inputs, extra, config_path, overwrite_file, row.lang], [yaml_out, notice])

    def load_file(path: str, lang: str) -> list[Any]:
        try:
            loaded, extra_text = form.from_yaml(path)
            names = tasks.dataset_names(loaded["dataset_dir"]) if loaded["dataset_dir"] else []
            shown = form.to_yaml(form.form_values(loaded, extra_text))
        except Exception as exc:
            return [gr.skip()] * (len(keys) + 2) + [error_text(exc, lang)]
        updates = [gr.update(value=loaded[k]) for k in keys]
        updates[keys.index("dataset")] = gr.update(
            choices=sorted({*names, *loaded["dataset"]}), value=loaded["dataset"]
        )
        note = text("loaded", lang).format(path=path)
        return [*updates, extra_text, gr.update(value=shown, visible=True), note]

    load.click(load_file, [config_path, row.lang], [*form_inputs, extra, yaml_out, notice])

    def start_run(*args: Any) -> tuple[Any, ...]:
        lang = args[-1]
        try:
            values = values_of(args[:-1])
            form.check(values)
            form.check_output_dir(values)
            path = board.run.start(values)
        except Exception as exc:
            return error_text(exc, lang), gr.skip(), gr.Timer(active=False), 0
        shown = gr.update(value=f"# {form.command_line(path)}\n{form.to_yaml(values)}", visible=True)
        return status_text(board.run.status(), lang), shown, gr.Timer(active=True), 0

    start_btn.click(start_run, [*form_inputs, extra, row.lang], [status, yaml_out, timer, shown_records])

    def stop_run(lang: str) -> tuple[str, Any]:
        board.run.stop()
        return status_text(board.run.status(), lang), gr.Timer(active=True)

    stop_btn.click(stop_run, [row.lang], [status, timer])

    def tick(shown: int, lang: str, adapter: str) -> tuple[Any, ...]:
        now = board.run.status()
        new_plot = loss_plot(now) if len(now.records) != shown else gr.skip()
        done = not now.active
        new_adapter = tasks.adapter_for_output(now.output_dir) if now.state == "finished" else ""
        message = status_text(now, lang)
        if new_adapter and new_adapter != adapter:
            message += "\n\n" + text("adapter_set", lang).format(path=new_adapter)
        return (
            message,
            new_plot,
            now.log_tail,
            len(now.records),
            gr.Timer(active=not done),
            gr.update(value=new_adapter) if new_adapter else gr.skip(),
            gr.update(choices=checkpoint_choices(now.output_dir)) if done else gr.skip(),
        )

    timer.tick(
        tick,
        [shown_records, row.lang, row.adapter],
        [status, plot, log, shown_records, timer, row.adapter, fields["resume_from_checkpoint"]],
        show_progress="hidden",
    )
    refresh.click(
        lambda out, current: gr.update(choices=_merged(checkpoint_choices(out or ""), current), value=current),
        [fields["output_dir"], fields["resume_from_checkpoint"]],
        fields["resume_from_checkpoint"],
    )
    row.lang.change(lambda lang: status_text(board.run.status(), lang), row.lang, status)
    return timer


def _names(dataset_dir: str) -> list[str]:
    try:
        return tasks.dataset_names(dataset_dir)
    except Exception:  # a missing dataset_info.json: the field says so once the user edits it
        return []


def _merged(choices: list[str], current: str | None) -> list[str]:
    return choices if not current or current in choices else [*choices, current]
