"""The Chat tab: load the base model, an adapter or a merged export; streaming chat, system prompt, settings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from finetune_kit.models.generation import GenerationConfig
from finetune_kit.webui import tasks
from finetune_kit.webui.board import Board, Labels, ModelRow, choice_of, shown_errors, streamed_errors
from finetune_kit.webui.texts import text


def generation_of(
    max_new_tokens: Any, do_sample: bool, temperature: Any, top_p: Any, top_k: Any, penalty: Any
) -> GenerationConfig:
    """The chat's :class:`GenerationConfig` from the settings panel (checked as any config)."""
    return GenerationConfig(
        do_sample=bool(do_sample),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        max_new_tokens=int(max_new_tokens),
        repetition_penalty=float(penalty),
    )


def build(board: Board, labels: Labels, row: ModelRow) -> None:
    """Lay out the Chat tab inside the current ``gr.Tab`` and wire its events."""
    import gradio as gr

    lang = labels.lang
    with gr.Row():
        load = labels(gr.Button(text("load_model", lang), variant="primary", elem_id="fk-load"), "load_model", "value")
        unload = labels(gr.Button(text("unload_model", lang)), "unload_model", "value")
    info = gr.Markdown(text("no_model", lang), elem_id="fk-model-info")
    with gr.Row():
        with gr.Column(scale=3):
            system = labels(gr.Textbox(value="", lines=1, **labels.kw("system")), "system")
            chatbot = labels(gr.Chatbot(height=360, elem_id="fk-chatbot", **labels.kw("chatbot")), "chatbot")
            message = labels(gr.Textbox(lines=2, elem_id="fk-message", **labels.kw("message")), "message")
            with gr.Row():
                send = labels(gr.Button(text("send", lang), variant="primary", elem_id="fk-send"), "send", "value")
                clear = labels(gr.Button(text("clear", lang)), "clear", "value")
        with gr.Column(scale=1):
            labels(gr.Markdown(text("generation", lang)), "generation", "value")
            max_new = labels(
                gr.Slider(8, 4096, value=512, step=8, elem_id="fk-max-new", **labels.kw("max_new_tokens")),
                "max_new_tokens",
            )
            sample = labels(gr.Checkbox(value=False, **labels.kw("do_sample")), "do_sample")
            temperature = labels(gr.Slider(0.01, 1.5, value=0.95, step=0.01, **labels.kw("temperature")), "temperature")
            top_p = labels(gr.Slider(0.01, 1.0, value=0.7, step=0.01, **labels.kw("top_p")), "top_p")
            top_k = labels(gr.Slider(1, 200, value=50, step=1, **labels.kw("top_k")), "top_k")
            penalty = labels(
                gr.Slider(1.0, 2.0, value=1.0, step=0.01, **labels.kw("repetition_penalty")), "repetition_penalty"
            )
    settings = [max_new, sample, temperature, top_p, top_k, penalty]

    def load_model(m: str, t: str, a: str, lang: str) -> str:
        def go() -> str:
            loaded = board.cache.get(choice_of(m, t, a))
            return f"{text('model_info', lang)}: `{loaded!r}`"

        return shown_errors(lang, go)

    load.click(lambda lang: text("working", lang), [row.lang], info, queue=False).then(
        load_model, [*row.inputs, row.lang], info
    )

    def unload_model(lang: str) -> str:
        board.cache.clear()
        return text("no_model", lang)

    unload.click(unload_model, [row.lang], info)

    def respond(
        history: list[dict[str, Any]] | None, msg: str, m: str, t: str, a: str, sys_prompt: str, lang: str, *gen: Any
    ) -> Iterator[tuple[list[dict[str, Any]], str, Any]]:
        history = list(history or [])
        if not (msg or "").strip():
            yield history, "", gr.skip()
            return
        shown = [*history, {"role": "user", "content": msg}, {"role": "assistant", "content": ""}]

        def stream() -> Iterator[tuple[list[dict[str, Any]], str, Any]]:
            for reply in tasks.chat_reply(
                board.cache, choice_of(m, t, a), history, msg, system=sys_prompt or "", generation=generation_of(*gen)
            ):
                shown[-1] = {"role": "assistant", "content": reply}
                yield list(shown), "", gr.skip()

        yield list(shown), "", gr.skip()
        yield from streamed_errors(lang, stream, lambda error: (history, msg, error))

    inputs = [chatbot, message, *row.inputs, system, row.lang, *settings]
    send.click(respond, inputs, [chatbot, message, info])
    message.submit(respond, inputs, [chatbot, message, info])
    clear.click(lambda: [], None, chatbot)
