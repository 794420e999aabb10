"""Chat templates: how a conversation becomes tokens, which parts are trained, where to stop.

A named template (``chatml``, ``qwen3``, ``llama3``, ...) is a set of *slots*, one per message
kind, written the way LLaMA-Factory 0.9.5 writes its templates, and encoded the way it encodes
them: every text piece of a slot is tokenized on its own and ``BOS``/``EOS`` markers become the
tokenizer's ids. That is what makes finetune_kit's ``input_ids`` and ``labels`` equal LLaMA-Factory's
(tests/data/parity holds golden files produced by LLaMA-Factory itself).

``template=None`` wraps the tokenizer's own Jinja ``chat_template`` instead.

Everything else reads a template through a few methods: :meth:`ChatTemplate.encode_pairs`
(``(prompt_ids, reply_ids)`` per turn, for training), :meth:`ChatTemplate.encode_prompt`
(the ids that ask for the next reply, for generation), :meth:`ChatTemplate.prompt` (the same as
text), :meth:`ChatTemplate.stop_token_ids` and :meth:`ChatTemplate.jinja` (a Jinja template
rendering the same text, which exports write into the tokenizer so the chat format survives).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from finetune_kit.data.jinja import template_jinja
from finetune_kit.data.messages import Message, split_system
from finetune_kit.data.native import native_segments
from finetune_kit.data.slots import EOS, THOUGHT, TOOL_CALL, Slot, Special, fill
from finetune_kit.data.tools import ToolFormat, get_tool_format, parse_calls
from finetune_kit.errors import TemplateError

logger = logging.getLogger("finetune_kit.data")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format given by slots (see the module docs), with LLaMA-Factory's options.

    ``efficient_eos``: the reply slot has no EOS; one EOS ends the whole example instead.
    ``replace_eos``: the tokenizer's EOS becomes the first stop word (so replies end with it).
    ``system_in_user``: the system text is put in front of the first user message (llama2, mistral, gemma).
    ``reasoning``: replies may hold a ``<think>`` block (qwen3); ``enable_thinking`` decides
    whether an empty one is trained (True) or only put in the prompt (False), and False also
    removes every thought from replies.
    """

    name: str
    user: Slot
    assistant: Slot
    system: Slot = ("{{content}}",)
    function: Slot | None = None  # default: the assistant slot
    observation: Slot | None = None  # default: the user slot
    prefix: Slot = ()
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    efficient_eos: bool = False
    replace_eos: bool = False
    system_in_user: bool = False
    reasoning: bool = False
    enable_thinking: bool | None = True
    preserve_thinking: bool = False
    tool_format: str = "default"
    thought_words: tuple[str, str] = THOUGHT
    tool_call_words: tuple[str, str] = TOOL_CALL
    native_jinja: str | None = field(default=None, repr=False)

    # ----- options -----------------------------------------------------------------------------
    @property
    def is_native(self) -> bool:
        """True when this wraps the tokenizer's own Jinja template."""
        return self.native_jinja is not None

    def with_default_system(self, system: str | None) -> ChatTemplate:
        return self if system is None else replace(self, default_system=system)

    def with_options(
        self,
        *,
        tool_format: str | None = None,
        enable_thinking: bool | None = None,
        preserve_thinking: bool | None = None,
        default_system: str | None = None,
    ) -> ChatTemplate:
        """This template with LLaMA-Factory's data options applied.

        ``tool_format`` switches tool descriptions and calls to that format; like LLaMA-Factory,
        a call is then written as ``{{content}}`` + EOS (the template's own call slot is dropped).
        """
        out = self.with_default_system(default_system)
        if tool_format is not None:
            get_tool_format(tool_format)
            call: Slot = ("{{content}}",) if self.efficient_eos else ("{{content}}", EOS)
            out = replace(out, tool_format=tool_format, function=call)
        if enable_thinking is not None:
            out = replace(out, enable_thinking=enable_thinking)
        if preserve_thinking is not None:
            out = replace(out, preserve_thinking=preserve_thinking)
        return out

    @property
    def tools(self) -> ToolFormat:
        return get_tool_format(self.tool_format)

    # ----- layout ------------------------------------------------------------------------------
    def _elements(self, turns: Sequence[Message], system: str, tools: str) -> list[list[str | Special]]:
        """Each message's slot elements; the first carries the prefix and the system text."""
        out = []
        for i, msg in enumerate(turns):
            elements: list[str | Special] = []
            sys_text = ""
            if i == 0:
                elements += self.prefix
                if system or tools:
                    sys_text = system + (self._describe_tools(tools) if tools else "")
                    if not self.system_in_user:
                        elements += fill(self.system, content=sys_text)
                        sys_text = ""
                    else:
                        sys_text = str(fill(self.system, content=sys_text)[0])
            role, content = msg["role"], msg["content"]
            if role == "user":
                elements += fill(self.user, content=sys_text + content, idx=str(i // 2))
            elif role == "assistant":
                elements += fill(self.assistant, content=content)
            elif role == "observation":
                elements += fill(self.observation or self.user, content=content)
            elif role == "function":
                text = self.tools.call(parse_calls(content)) if self.system_in_user else self._write_calls(content)
                elements += fill(self.function or self.assistant, content=text)
            else:
                raise TemplateError(f"message {i} has role {role!r}; expected user, assistant, function or observation")
            out.append(elements)
        return out

    def _describe_tools(self, tools: str) -> str:
        try:
            parsed = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise TemplateError(f"the tools description is not valid JSON ({exc.msg}): {tools[:80]!r}") from exc
        return self.tools.describe(parsed) if parsed else ""

    def _write_calls(self, content: str) -> str:
        """A function turn's text: the calls in this template's tool format, any thought kept in front."""
        start, end = (re.escape(w) for w in self.tool_call_words)
        wrapped = re.search(f"{start}(.*?){end}", content, re.DOTALL)
        if wrapped is not None:
            return content.replace(wrapped.group(0), "") + self.tools.call(parse_calls(wrapped.group(1)))
        thought = re.search(
            f"{re.escape(self.thought_words[0])}(.*?){re.escape(self.thought_words[1])}", content, re.DOTALL
        )
        if thought is not None:
            return thought.group(0) + self.tools.call(parse_calls(content.replace(thought.group(0), "")))
        return self.tools.call(parse_calls(content))

    @staticmethod
    def _ids(tokenizer: Any, elements: Sequence[str | Special]) -> list[int]:
        ids: list[int] = []
        for el in elements:
            if isinstance(el, str):
                if el:
                    ids += tokenizer.encode(el, add_special_tokens=False)
            elif el.kind == "token":
                ids.append(tokenizer.convert_tokens_to_ids(el.token))
            else:
                tid = tokenizer.bos_token_id if el.kind == "bos" else tokenizer.eos_token_id
                if tid is not None:
                    ids.append(tid)
        return ids

    @staticmethod
    def _text(tokenizer: Any, elements: Sequence[str | Special]) -> str:
        parts = []
        for el in elements:
            if isinstance(el, str):
                parts.append(el)
            elif el.kind == "token":
                parts.append(el.token)
            else:
                parts.append((getattr(tokenizer, f"{el.kind}_token", None) or "") if tokenizer is not None else "")
        return "".join(parts)

    # ----- thoughts (reasoning templates) --------------------------------------------------------
    def remove_thought(self, content: str) -> str:
        start, end = (re.escape(w) for w in self.thought_words)
        return re.sub(f"{start}(.*?){end}", "", content, flags=re.DOTALL).lstrip("\n")

    def _has_thought(self, content: str) -> bool:
        return self.thought_words[0].strip() in content or self.thought_words[1].strip() in content

    def _empty_thought(self, tokenizer: Any) -> list[int]:
        return tokenizer.encode(self.thought_words[0] + self.thought_words[1], add_special_tokens=False)

    # ----- encoding ----------------------------------------------------------------------------
    def encode_pairs(
        self,
        tokenizer: Any,
        messages: Sequence[Message],
        *,
        tools: str = "",
        mask_history: bool = False,
    ) -> list[tuple[list[int], list[int]]]:
        """``(prompt_ids, reply_ids)`` for every turn of a conversation ending with a reply.

        ``messages`` may start with a system message, then alternate user/observation and
        assistant/function. With ``mask_history`` (and a reasoning template) the thoughts of
        earlier replies are dropped, as LLaMA-Factory does when only the last reply is trained.
        """
        if self.is_native:
            return self._native_pairs(tokenizer, messages, tools)
        system, turns = split_system(messages)
        turns = [dict(m) for m in turns]
        discard_history = mask_history and not self.preserve_thinking
        if self.reasoning:
            for i in range(1, len(turns), 2):
                if self.enable_thinking is False or (discard_history and i < len(turns) - 1):
                    turns[i]["content"] = self.remove_thought(turns[i]["content"])
        encoded = [self._ids(tokenizer, els) for els in self._elements(turns, system or self.default_system, tools)]
        if self.reasoning:
            for i in [len(turns) - 2] if discard_history else range(0, len(turns), 2):
                if not self._has_thought(turns[i + 1]["content"]):
                    if not self.enable_thinking:
                        encoded[i] = encoded[i] + self._empty_thought(tokenizer)
                    else:
                        encoded[i + 1] = self._empty_thought(tokenizer) + encoded[i + 1]
        return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded) - 1, 2)]

    def encode_oneturn(
        self, tokenizer: Any, messages: Sequence[Message], *, tools: str = ""
    ) -> tuple[list[int], list[int]]:
        """The whole conversation but its last reply as one prompt, and that reply (preference/KTO data)."""
        if self.is_native:
            pairs = self._native_pairs(tokenizer, messages, tools)
            prompt = [t for src, tgt in pairs[:-1] for t in src + tgt] + pairs[-1][0]
            return prompt, pairs[-1][1]
        system, turns = split_system(messages)
        turns = [dict(m) for m in turns]
        if self.reasoning:
            if not self.preserve_thinking:
                for i in range(1, len(turns) - 2, 2):
                    turns[i]["content"] = self.remove_thought(turns[i]["content"])
            if self.enable_thinking is False:
                turns[-1]["content"] = self.remove_thought(turns[-1]["content"])
        encoded = [self._ids(tokenizer, els) for els in self._elements(turns, system or self.default_system, tools)]
        prompt = [t for ids in encoded[:-1] for t in ids]
        reply = encoded[-1]
        if self.reasoning and not self._has_thought(turns[-1]["content"]):
            if not self.enable_thinking:
                prompt += self._empty_thought(tokenizer)
            else:
                reply = self._empty_thought(tokenizer) + reply
        return prompt, reply

    def encode_prompt(self, tokenizer: Any, messages: Sequence[Message], *, tools: str = "") -> list[int]:
        """The ids that ask for the next assistant reply (LLaMA-Factory's chat encoding)."""
        _check_prompt(messages)
        prompt, _ = self.encode_oneturn(tokenizer, [*messages, {"role": "assistant", "content": ""}], tools=tools)
        return prompt

    def prompt(self, messages: Sequence[Message], tokenizer: Any = None, *, tools: str = "") -> str:
        """The text that asks the model for the next assistant reply."""
        _check_prompt(messages)
        if self.is_native:
            system, turns = split_system(messages)
            return "".join(text for text, _ in native_segments(tokenizer, self._native_system(system), turns))
        system, turns = split_system(messages)
        elements = self._elements(turns, system or self.default_system, tools)
        text = "".join(self._text(tokenizer, els) for els in elements)
        if self.reasoning and not self.enable_thinking:
            text += self.thought_words[0] + self.thought_words[1]
        return text

    def segments(self, messages: Sequence[Message], tokenizer: Any = None) -> list[tuple[str, bool]]:
        """The conversation as ``(text, is_reply)`` pieces in order (for display and reports)."""
        system, turns = split_system(messages)
        if self.is_native:
            return native_segments(tokenizer, self._native_system(system), turns)
        elements = self._elements(turns, system or self.default_system, "")
        return [(self._text(tokenizer, els), i % 2 == 1) for i, els in enumerate(elements)]

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

    # ----- tokenizer -----------------------------------------------------------------------------
    def fit_tokenizer(self, tokenizer: Any) -> None:
        """Make ``tokenizer`` end replies the way this template does (LLaMA-Factory's fix-up).

        ``replace_eos`` makes the first stop word the EOS token; a missing EOS becomes
        ``<|endoftext|>``; a missing pad token becomes EOS; the other stop words become special
        tokens so they are never split. A stop word the vocabulary lacks would need new, untrained
        embeddings: that means the template belongs to another model family, so it is an error.
        """
        if self.is_native:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            return
        stops = list(self.stop_words)
        if self.replace_eos and stops:
            self._require_in_vocab(tokenizer, stops[0])
            if tokenizer.eos_token != stops[0]:
                tokenizer.add_special_tokens({"eos_token": stops[0]})
            stops = stops[1:]
        if tokenizer.eos_token_id is None:
            self._require_in_vocab(tokenizer, "<|endoftext|>")
            tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        for word in stops:
            self._require_in_vocab(tokenizer, word)
        if stops:
            try:
                tokenizer.add_special_tokens(
                    {"additional_special_tokens": stops}, replace_additional_special_tokens=False
                )
            except TypeError:  # transformers 5 keeps the existing extra special tokens anyway
                tokenizer.add_special_tokens({"additional_special_tokens": stops})

    def is_fitted(self, tokenizer: Any) -> bool:
        """True when :meth:`fit_tokenizer` would change nothing in ``tokenizer``."""
        if tokenizer.pad_token is None:
            return False
        stops = [] if self.is_native else list(self.stop_words)
        if self.replace_eos and stops:
            if tokenizer.eos_token != stops.pop(0):
                return False
        return tokenizer.eos_token_id is not None and all(w in tokenizer.all_special_tokens for w in stops)

    def _require_in_vocab(self, tokenizer: Any, token: str) -> None:
        if token not in tokenizer.get_vocab():
            raise TemplateError(
                f"template {self.name!r} ends replies with {token!r}, which this tokenizer does not have: the template "
                "is for another model family. Fix: pick the template that matches the model (or template: null to use "
                "the tokenizer's own chat template)"
            )

    def check_against(self, tokenizer: Any) -> str | None:
        """A warning when the tokenizer's own chat template looks like another family's, else None."""
        own = getattr(tokenizer, "chat_template", None)
        if self.is_native or not isinstance(own, str):
            return None
        probe = [{"role": "user", "content": "\x01"}, {"role": "assistant", "content": "\x02"}]
        try:
            theirs = tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # a template that needs extra variables: nothing to compare
            return None
        ours = self._text(tokenizer, fill(self.user, content="\x01", idx="0"))
        marker = ours.split("\x01")[0].strip() or ours.split("\x01")[-1].strip()
        if marker and marker not in theirs:
            return (
                f"template {self.name!r} writes user turns as {marker!r}, but the tokenizer's own chat template does "
                "not: the model was probably trained with another format. Pick the template of the model's family "
                "(template: null uses the tokenizer's own)"
            )
        return None

    # ----- Jinja ---------------------------------------------------------------------------------
    def jinja(self) -> str:
        """A Jinja chat template that renders exactly what :meth:`prompt` produces."""
        return self.native_jinja if self.native_jinja is not None else template_jinja(self)

    # ----- the tokenizer's own template ----------------------------------------------------------
    def _native_system(self, system: str | None) -> str | None:
        return system if system is not None else (self.default_system or None)

    def _native_pairs(
        self, tokenizer: Any, messages: Sequence[Message], tools: str
    ) -> list[tuple[list[int], list[int]]]:
        if tools:
            raise TemplateError(
                "tool data needs a named template (e.g. template: qwen); the tokenizer's own is not used for tools"
            )
        system, turns = split_system(messages)
        pieces = native_segments(tokenizer, self._native_system(system), turns)
        ids = [tokenizer.encode(text, add_special_tokens=False) for text, _ in pieces]
        return [(ids[i], ids[i + 1]) for i in range(0, len(ids) - 1, 2)]


def _check_prompt(messages: Sequence[Message]) -> None:
    if not messages or messages[-1]["role"] not in ("user", "observation"):
        raise TemplateError(
            f"a prompt must end with a user message; got {messages[-1]['role'] if messages else 'no messages'}"
        )
