"""The tokenizer's own Jinja chat template (``template: null``), split into prompt and reply pieces."""

from __future__ import annotations

from typing import Any

from finetune_kit.data.messages import Message
from finetune_kit.errors import TemplateError


def native_segments(tokenizer: Any, system: str | None, turns: list[Message]) -> list[tuple[str, bool]]:
    """Segments from the tokenizer's Jinja template, by rendering growing prefixes."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TemplateError("this tokenizer has no chat_template; pass template='chatml' (or another name)")
    head = [{"role": "system", "content": system}] if system is not None else []

    def render(msgs: list[Message], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(turns):
        if msg["role"] not in ("user", "assistant"):
            raise TemplateError("tool turns need a named template (e.g. template: qwen)")
        text = render(head + turns[: i + 1], gen=msg["role"] == "user")
        if not text.startswith(done):
            raise TemplateError(
                "the tokenizer's chat template does not render conversations incrementally (a later turn "
                "changes earlier text), so replies cannot be masked reliably; pass a named template instead"
            )
        pieces.append((text[len(done) :], msg["role"] == "assistant"))
        done = text
    return pieces
