"""Chat templates: how a conversation becomes text, which parts are trained, where to stop.

A :class:`ChatTemplate` is either one of the named, LLaMA-Factory-compatible templates
(``chatml``, ``qwen``, ``llama3``, ...) defined by text slots, or the tokenizer's own Jinja
``chat_template`` (``template=None``). Both give the same thing to the rest of the library:
:meth:`ChatTemplate.segments` splits a conversation into ``(text, trained)`` pieces, and
:meth:`ChatTemplate.jinja` is a Jinja template that renders exactly the same text, which
the exporter writes into the tokenizer so the chat format survives merge and serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from finetune_kit.data.messages import Message, check_turns
from finetune_kit.errors import TemplateError, did_you_mean


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format given by text slots; ``{content}`` marks where the message goes.

    ``prefix`` starts every conversation (``{bos_token}`` is replaced by the tokenizer's BOS).
    A prompt is ``user`` followed by ``assistant_prefix``; a reply is the content followed by
    ``assistant_suffix``; only replies are trained by default.
    """

    name: str
    system: str
    user: str
    assistant_prefix: str
    assistant_suffix: str
    prefix: str = ""
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    native_jinja: str | None = field(default=None, repr=False)

    @property
    def is_native(self) -> bool:
        """True when this wraps the tokenizer's own Jinja template."""
        return self.native_jinja is not None

    def with_default_system(self, system: str | None) -> ChatTemplate:
        if system is None:
            return self
        return replace(self, default_system=system)

    def segments(self, messages: Sequence[Message], tokenizer: Any = None) -> list[tuple[str, bool]]:
        """Split a conversation into ``(text, is_assistant_reply)`` pieces, in order.

        ``messages`` may start with a system message and then alternates user/assistant.
        Concatenating the texts gives the full rendered conversation.
        """
        system, turns = split_system(messages)
        if self.is_native:
            return _native_segments(tokenizer, system if system is not None else (self.default_system or None), turns)
        bos = getattr(tokenizer, "bos_token", None) or ""
        system = system or self.default_system
        head = self.prefix.replace("{bos_token}", bos)
        if system:
            head += self.system.replace("{content}", system)
        pieces: list[tuple[str, bool]] = []
        for i, msg in enumerate(turns):
            if msg["role"] == "user":
                text = self.user.replace("{content}", msg["content"]) + self.assistant_prefix
                pieces.append(((head if i == 0 else "") + text, False))
            else:
                pieces.append((msg["content"] + self.assistant_suffix, True))
        return pieces

    def prompt(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        """The text that asks the model for the next assistant reply."""
        if not messages or messages[-1]["role"] != "user":
            raise TemplateError(
                f"a prompt must end with a user message; got {messages[-1]['role'] if messages else 'no messages'}"
            )
        return "".join(text for text, _ in self.segments(messages, tokenizer))

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """EOS plus every stop word that is a single token in ``tokenizer``."""
        ids: list[int] = []
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        for word in self.stop_words:
            tid = tokenizer.convert_tokens_to_ids(word)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
        return ids

    def jinja(self) -> str:
        """A Jinja chat template that renders exactly what :meth:`segments` produces."""
        if self.native_jinja is not None:
            return self.native_jinja

        def lit(text: str) -> str:
            return "{{ " + repr(text) + " }}" if text else ""

        def slot(fmt: str, expr: str) -> str:
            before, _, after = fmt.partition("{content}")
            return lit(before) + "{{ " + expr + " }}" + lit(after)

        prefix = self.prefix.replace("{bos_token}", "\x00")
        pre_a, _, pre_b = prefix.partition("\x00")
        prefix_j = lit(pre_a) + ("{{ bos_token }}" if "\x00" in prefix else "") + lit(pre_b)
        return (
            "{% if messages and messages[0]['role'] == 'system' %}"
            "{% set system_message = messages[0]['content'] or " + repr(self.default_system) + " %}"
            "{% set loop_messages = messages[1:] %}"
            "{% else %}{% set system_message = " + repr(self.default_system) + " %}"
            "{% set loop_messages = messages %}{% endif %}"
            + prefix_j
            + "{% if system_message %}"
            + slot(self.system, "system_message")
            + "{% endif %}"
            "{% for message in loop_messages %}"
            "{% if message['role'] == 'user' %}"
            + slot(self.user, "message['content']")
            + "{% elif message['role'] == 'assistant' %}"
            + lit(self.assistant_prefix)
            + slot("{content}" + self.assistant_suffix, "message['content']")
            + "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + lit(self.assistant_prefix) + "{% endif %}"
        )


def split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    """Separate a leading system message from the turns, checking roles alternate."""
    system = None
    turns = list(messages)
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    problem = check_turns([msg.get("role") for msg in messages])
    if problem is not None:
        raise TemplateError(
            f"message {problem.turn} has role {problem.role!r} but {problem.expected!r} was expected: after an "
            "optional system message, turns must alternate user, assistant, user, ..."
        )
    return system, turns


def _native_segments(tokenizer: Any, system: str | None, turns: list[Message]) -> list[tuple[str, bool]]:
    """Segments from the tokenizer's Jinja template, by rendering growing prefixes."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TemplateError("this tokenizer has no chat_template; pass template='chatml' (or another name)")
    head = [{"role": "system", "content": system}] if system is not None else []

    def render(msgs: list[Message], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(turns):
        text = render(head + turns[: i + 1], gen=msg["role"] == "user")
        if not text.startswith(done):
            raise TemplateError(
                "the tokenizer's chat template does not render conversations incrementally (a later turn "
                "changes earlier text), so replies cannot be masked reliably; pass a named template instead"
            )
        pieces.append((text[len(done) :], msg["role"] == "assistant"))
        done = text
    return pieces


def _chatml(name: str, default_system: str = "", stop: tuple[str, ...] = ("<|im_end|>",)) -> ChatTemplate:
    return ChatTemplate(
        name=name,
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>\n",
        default_system=default_system,
        stop_words=stop,
    )


TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": _chatml("chatml", stop=("<|im_end|>", "<|im_start|>")),
    "qwen": _chatml("qwen", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen3_nothink": _chatml("qwen3_nothink"),
    "smollm2": _chatml("smollm2", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    "llama3": ChatTemplate(
        name="llama3",
        prefix="{bos_token}",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_suffix="<|eot_id|>",
        stop_words=("<|eot_id|>", "<|eom_id|>"),
    ),
}


def get_template(name: str | None, tokenizer: Any = None, *, default_system: str | None = None) -> ChatTemplate:
    """Return the named template, or the tokenizer's own when ``name`` is None."""
    if name is None:
        jinja = getattr(tokenizer, "chat_template", None)
        if not jinja:
            raise TemplateError(
                "no template was given and the tokenizer has no chat_template. Fix: pass template='chatml' "
                f"(available: {', '.join(sorted(TEMPLATES))})"
            )
        native = ChatTemplate(
            name="tokenizer", system="", user="", assistant_prefix="", assistant_suffix="", native_jinja=jinja
        )
        return native.with_default_system(default_system) if default_system else native
    if name not in TEMPLATES:
        raise TemplateError(
            f"unknown template {name!r}.{did_you_mean(name, TEMPLATES)} Available: {', '.join(sorted(TEMPLATES))}"
        )
    return TEMPLATES[name].with_default_system(default_system)
