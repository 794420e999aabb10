"""The named chat templates, each laid out as LLaMA-Factory 0.9.5 lays out the template of that name.

System-prompt defaults, stop words, EOS handling (``replace_eos``, ``efficient_eos``) and tool
formats are LLaMA-Factory's, so a YAML written for ``llamafactory-cli`` trains on the same tokens
here (tests/data/parity checks this against golden files LLaMA-Factory produced).
"""

from __future__ import annotations

from typing import Any

from finetune_kit.data.slots import BOS, EOS, Slot
from finetune_kit.data.template import ChatTemplate
from finetune_kit.errors import TemplateError, did_you_mean

_IM_USER = ("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",)
_IM_REPLY = ("{{content}}<|im_end|>\n",)
_IM_SYSTEM = ("<|im_start|>system\n{{content}}<|im_end|>\n",)
_QWEN_TOOL_RESULT = (
    "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
)


def _template(name: str, *, user: Slot = ("{{content}}",), assistant: Slot | None = None, **kw: Any) -> ChatTemplate:
    """A template with LLaMA-Factory's defaults: replies end with EOS unless ``efficient_eos``."""
    if assistant is None:
        assistant = ("{{content}}",) if kw.get("efficient_eos") else ("{{content}}", EOS)
    return ChatTemplate(name=name, user=user, assistant=assistant, **kw)


def _qwen(name: str, **kw: Any) -> ChatTemplate:
    return _template(
        name,
        user=_IM_USER,
        assistant=_IM_REPLY,
        system=_IM_SYSTEM,
        function=_IM_REPLY,
        observation=_QWEN_TOOL_RESULT,
        tool_format="qwen",
        stop_words=("<|im_end|>",),
        replace_eos=True,
        **kw,
    )


_ALL = [
    _template(
        "default",
        user=("Human: {{content}}", EOS, "\nAssistant:"),
        assistant=("{{content}}", EOS, "\n"),
        system=("System: {{content}}", EOS, "\n"),
    ),
    _template("empty", assistant=("{{content}}",)),
    _template(
        "alpaca",
        user=("### Instruction:\n{{content}}\n\n### Response:\n",),
        assistant=("{{content}}", EOS, "\n\n"),
        default_system="Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n",
    ),
    _template(
        "vicuna",
        user=("USER: {{content}} ASSISTANT:",),
        default_system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    ),
    _template("fewshot", assistant=("{{content}}\n\n",), efficient_eos=True),
    _template(
        "llama2",
        user=(BOS, "[INST] {{content}} [/INST]"),
        system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
        system_in_user=True,
    ),
    _template(
        "mistral",
        user=("[INST] {{content}}[/INST]",),
        assistant=(" {{content}}", EOS),
        system=("{{content}}\n\n",),
        function=("[TOOL_CALLS] {{content}}", EOS),
        observation=('[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]',),
        tool_format="mistral",
        prefix=(BOS,),
        system_in_user=True,
    ),
    _template(
        "llama3",
        user=(
            "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        assistant=("{{content}}<|eot_id|>",),
        system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
        function=("{{content}}<|eot_id|>",),
        observation=(
            "<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        tool_format="llama3",
        prefix=(BOS,),
        stop_words=("<|eot_id|>", "<|eom_id|>"),
        replace_eos=True,
    ),
    _template(
        "glm4",
        user=("<|user|>\n{{content}}<|assistant|>",),
        assistant=("\n{{content}}",),
        system=("<|system|>\n{{content}}",),
        function=("{{content}}",),
        observation=("<|observation|>\n{{content}}<|assistant|>",),
        tool_format="glm4",
        prefix=("[gMASK]<sop>",),
        stop_words=("<|user|>", "<|observation|>"),
        efficient_eos=True,
    ),
    _template(
        "gemma",
        user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
        assistant=("{{content}}<end_of_turn>\n",),
        system=("{{content}}\n\n",),
        observation=("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
        prefix=(BOS,),
        stop_words=("<end_of_turn>",),
        replace_eos=True,
        system_in_user=True,
    ),
    _template("deepseek3", user=("<｜User｜>{{content}}<｜Assistant｜>",), prefix=(BOS,)),
    _template(
        "phi4",
        user=("<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>",),
        assistant=("{{content}}<|im_end|>",),
        system=("<|im_start|>system<|im_sep|>{{content}}<|im_end|>",),
        stop_words=("<|im_end|>",),
        replace_eos=True,
    ),
    _template(
        "chatml",
        user=_IM_USER,
        assistant=_IM_REPLY,
        system=_IM_SYSTEM,
        observation=("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
        stop_words=("<|im_end|>", "<|im_start|>"),
        replace_eos=True,
    ),
    _template(
        "smollm2",
        user=_IM_USER,
        assistant=_IM_REPLY,
        system=_IM_SYSTEM,
        stop_words=("<|im_end|>",),
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
    ),
    _qwen("qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    _qwen("qwen3", reasoning=True),
    _qwen("qwen3_nothink"),
]

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in _ALL}
"""Every named template, by its LLaMA-Factory name."""


def get_template(name: str | None, tokenizer: Any = None, *, default_system: str | None = None) -> ChatTemplate:
    """Return the named template, or the tokenizer's own when ``name`` is None."""
    if name is None:
        jinja = getattr(tokenizer, "chat_template", None)
        if not jinja:
            raise TemplateError(
                "no template was given and the tokenizer has no chat_template. Fix: pass template='chatml' "
                f"(available: {', '.join(sorted(TEMPLATES))})"
            )
        native = ChatTemplate(name="tokenizer", user=(), assistant=(), native_jinja=jinja)
        return native.with_default_system(default_system) if default_system else native
    if name not in TEMPLATES:
        raise TemplateError(
            f"unknown template {name!r}.{did_you_mean(name, TEMPLATES)} Available: {', '.join(sorted(TEMPLATES))}"
        )
    return TEMPLATES[name].with_default_system(default_system)
