"""Jinja chat templates written from a named template's slots.

Exports and the server put this Jinja text into the tokenizer (``chat_template``), so any tool
that renders chats with it — transformers, llama.cpp, Ollama's converter — produces exactly the
text finetune_kit trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from finetune_kit.data.slots import Special

if TYPE_CHECKING:
    from finetune_kit.data.template import ChatTemplate


def slot_expr(slot: Sequence[str | Special], var: str = "content") -> str:
    """A Jinja expression joining a slot's pieces; ``{{content}}`` becomes ``var``."""
    items = []
    for piece in slot:
        if isinstance(piece, Special):
            items.append(repr(piece.token) if piece.kind == "token" else f"{piece.kind}_token")
            continue
        before, hit, after = piece.partition("{{content}}")
        items += [repr(before)] if before else []
        items += [var] if hit else []
        items += [repr(after)] if after else []
    return " + ".join(items)


def _out(expr: str) -> str:
    return "{{ " + expr + " }}" if expr else ""


def template_jinja(t: ChatTemplate) -> str:
    """The Jinja template rendering ``t`` (system, user and assistant turns; a generation prompt)."""
    if t.system_in_user:
        content = (
            "{% if loop.first and system_message %}{% set content = "
            + slot_expr(t.system[:1], "system_message")
            + " + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
        )
        system = ""
    else:
        content = "{% set content = message['content'] %}"
        system = "{% if system_message %}" + _out(slot_expr(t.system, "system_message")) + "{% endif %}"
    think = ""
    if t.reasoning:
        empty = repr(t.thought_words[0] + t.thought_words[1])
        think = (
            "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
            + _out(empty)
            + "{% endif %}"
        )
        if t.enable_thinking is False:
            think = "{% if add_generation_prompt %}" + _out(empty) + "{% endif %}"
    return (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system_message = " + repr(t.default_system) + " %}"
        "{% set loop_messages = messages %}{% endif %}"
        + _out(slot_expr(t.prefix))
        + system
        + "{% for message in loop_messages %}"
        + content
        + "{% if message['role'] == 'user' %}"
        + _out(slot_expr(t.user))
        + "{% elif message['role'] == 'assistant' %}"
        + _out(slot_expr(t.assistant))
        + "{% endif %}{% endfor %}"
        + think
    )
