"""The Evaluate tab (ROUGE/BLEU prediction and benchmarks, before/after) and the Export tab (merge, GGUF, parity)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finetune_kit.export.config import GGUF_TYPES
from finetune_kit.webui import form, tasks
from finetune_kit.webui.board import Board, Labels, ModelRow, choice_of, log_error, shown_errors
from finetune_kit.webui.texts import error_text, text


def build_evaluate(board: Board, labels: Labels, row: ModelRow) -> None:
    """Lay out the Evaluate tab inside the current ``gr.Tab`` and wire its events."""
    import gradio as gr

    lang = labels.lang
    demo_dir = form.default_dataset_dir()
    labels(gr.Markdown(text("predict_head", lang)), "predict_head", "value")
    with gr.Row():
        dataset_dir = labels(gr.Textbox(value=demo_dir, scale=2, **labels.kw("dataset_dir")), "dataset_dir")
        names = _names(demo_dir)
        default = ["shop_test"] if "shop_test" in names else []
        datasets = labels(
            gr.Dropdown(names, value=default, multiselect=True, scale=2, **labels.kw("eval_dataset")), "eval_dataset"
        )
        max_samples = labels(gr.Number(value=None, precision=0, **labels.kw("max_samples")), "max_samples")
    with gr.Row():
        max_new_tokens = labels(gr.Number(value=128, precision=0, **labels.kw("max_new_tokens")), "max_new_tokens")
        batch_size = labels(gr.Number(value=8, precision=0, **labels.kw("batch_size")), "batch_size")
        predict_dir = labels(gr.Textbox(value="", scale=2, **labels.kw("predict_dir")), "predict_dir")
        compare = labels(gr.Checkbox(value=True, **labels.kw("compare")), "compare")
    run_predict = labels(gr.Button(text("run_predict", lang), variant="primary"), "run_predict", "value")
    predict_out = gr.Markdown(elem_id="fk-predict")
    predict_plot = gr.Plot(format="png", visible=False, show_label=False)

    labels(gr.Markdown(text("bench_head", lang)), "bench_head", "value")
    with gr.Row():
        task = labels(gr.Dropdown(list(tasks.BENCHMARKS), value="mmlu", **labels.kw("task")), "task")
        task_dir = labels(
            gr.Textbox(value="", placeholder="evaluation/mmlu", scale=2, **labels.kw("task_dir")), "task_dir"
        )
        n_shot = labels(gr.Number(value=5, precision=0, **labels.kw("n_shot")), "n_shot")
        scoring = labels(gr.Dropdown(["letter", "loglikelihood"], value="letter", **labels.kw("scoring")), "scoring")
    with gr.Row():
        subjects = labels(gr.Textbox(value="", scale=2, **labels.kw("subjects")), "subjects")
        save_dir = labels(gr.Textbox(value="", scale=2, **labels.kw("save_dir")), "save_dir")
        bench_compare = labels(gr.Checkbox(value=True, **labels.kw("compare")), "compare")
    run_bench = labels(gr.Button(text("run_bench", lang), variant="primary"), "run_bench", "value")
    bench_out = gr.Markdown(elem_id="fk-bench")
    bench_plot = gr.Plot(format="png", visible=False, show_label=False)

    dataset_dir.blur(
        lambda d, chosen: gr.update(choices=_names(d), value=[n for n in chosen or [] if n in _names(d)]),
        [dataset_dir, datasets],
        datasets,
    )

    def predict(
        m: str, t: str, a: str, d: str, n: list[str], ms: Any, mnt: Any, bs: Any, out: str, cmp: bool, lang: str
    ) -> tuple[str, Any]:
        return shown(
            lang,
            lambda: tasks.predict(
                board.cache,
                choice_of(m, t, a),
                d,
                n or [],
                max_samples=int(ms) if ms else None,
                max_new_tokens=int(mnt or 128),
                batch_size=int(bs or 8),
                output_dir=out or "",
                compare=bool(cmp and (a or "").strip()),
            ),
        )

    run_predict.click(lambda lang: text("working", lang), [row.lang], predict_out, queue=False).then(
        predict,
        [*row.inputs, dataset_dir, datasets, max_samples, max_new_tokens, batch_size, predict_dir, compare, row.lang],
        [predict_out, predict_plot],
    )

    def bench(
        m: str, t: str, a: str, k: str, td: str, shots: Any, sc: str, sub: str, sd: str, cmp: bool, lang: str
    ) -> tuple[str, Any]:
        return shown(
            lang,
            lambda: tasks.benchmark(
                board.cache,
                choice_of(m, t, a),
                k,
                td or "",
                n_shot=int(shots if shots is not None else 5),
                subjects=sub or "",
                scoring=sc,
                save_dir=sd or "",
                compare=bool(cmp and (a or "").strip()),
            ),
        )

    run_bench.click(lambda lang: text("working", lang), [row.lang], bench_out, queue=False).then(
        bench,
        [*row.inputs, task, task_dir, n_shot, scoring, subjects, save_dir, bench_compare, row.lang],
        [bench_out, bench_plot],
    )


def build_export(board: Board, labels: Labels, row: ModelRow) -> None:
    """Lay out the Export tab inside the current ``gr.Tab`` and wire its events."""
    import gradio as gr

    lang = labels.lang
    with gr.Row():
        export_dir = labels(
            gr.Textbox(value="", placeholder="saves/merged", scale=3, **labels.kw("export_dir")), "export_dir"
        )
        export_size = labels(gr.Number(value=5, precision=0, **labels.kw("export_size")), "export_size")
        overwrite = labels(gr.Checkbox(value=False, **labels.kw("overwrite_export")), "overwrite_export")
    with gr.Row():
        gguf = labels(gr.CheckboxGroup(list(GGUF_TYPES), value=[], scale=3, **labels.kw("gguf")), "gguf")
        parity = labels(gr.Checkbox(value=True, **labels.kw("parity")), "parity")
        ollama = labels(gr.Textbox(value="", **labels.kw("ollama")), "ollama")
    with gr.Row():
        run = labels(gr.Button(text("run_export", lang), variant="primary"), "run_export", "value")
        use = labels(gr.Button(text("use_export", lang)), "use_export", "value")
    out = gr.Code(language=None, lines=6, interactive=False, elem_id="fk-export")

    def export(
        m: str, t: str, a: str, d: str, size: Any, types: list[str], check: bool, name: str, ow: bool, lang: str
    ) -> str:
        return shown_errors(
            lang,
            lambda: tasks.export(
                board.cache,
                choice_of(m, t, a),
                d or "",
                export_size=int(size or 5),
                gguf_types=types or [],
                parity=bool(check),
                ollama=name or "",
                overwrite=bool(ow),
            ),
        )

    run.click(lambda lang: text("working", lang), [row.lang], out, queue=False).then(
        export, [*row.inputs, export_dir, export_size, gguf, parity, ollama, overwrite, row.lang], out
    )
    # the merged folder becomes the model (no adapter): the Chat tab then loads what was exported
    use.click(lambda d: (d, ""), [export_dir], [row.model, row.adapter])


def shown(lang: str, action: Callable[[], tasks.Shown]) -> tuple[str, Any]:
    """An Evaluate result as (Markdown, chart update): the chart shown only for a before/after comparison."""
    import gradio as gr

    try:
        result = action()
    except Exception as exc:
        log_error(exc)
        return error_text(exc, lang), gr.update(visible=False)
    return result.markdown, gr.update(value=result.figure, visible=result.figure is not None)


def _names(dataset_dir: str) -> list[str]:
    try:
        return tasks.dataset_names(dataset_dir)
    except Exception:  # shown when the user runs something with it
        return []
