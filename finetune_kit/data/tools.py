"""Tool (function-calling) formats: how tool schemas and tool calls are written into the prompt.

Each format matches the LLaMA-Factory ``tool_format`` of the same name, character for
character, because the trained model will see exactly this text: ``default`` (a ReAct-style
``Action:`` / ``Action Input:`` block), ``qwen`` (``<tool_call>`` JSON, Qwen2.5/Qwen3),
``llama3`` (Llama-3.1 JSON tool calling), ``glm4`` and ``mistral``.

A format turns the ``tools`` column (a JSON list of function schemas) into system-prompt text
(:meth:`ToolFormat.describe`), turns an assistant tool call into reply text (:meth:`ToolFormat.call`)
and reads calls back out of generated text (:meth:`ToolFormat.extract`).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from finetune_kit.errors import TemplateError, did_you_mean


class ToolCall(NamedTuple):
    """One call: the function's name and its arguments as a JSON string."""

    name: str
    arguments: str


def _dump(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, ensure_ascii=False, **kwargs)


def _as_function(tool: dict[str, Any]) -> dict[str, Any]:
    """The bare function schema of an OpenAI-style ``{"type": "function", "function": {...}}`` entry."""
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _wrapped(tool: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI-style wrapper around a bare function schema."""
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


@dataclass(frozen=True)
class ToolFormat:
    """Base class: subclasses write tools and calls in one model family's convention."""

    name: str

    def describe(self, tools: Sequence[dict[str, Any]]) -> str:
        raise NotImplementedError

    def call(self, calls: Sequence[ToolCall]) -> str:
        raise NotImplementedError

    def extract(self, text: str) -> str | list[ToolCall]:
        """The tool calls in generated ``text``, or ``text`` itself when it holds none."""
        raise NotImplementedError


_REACT_HEADER = "You have access to the following tools:\n"
_REACT_USAGE = (
    "Use the following format if using a tool:\n```\n"
    "Action: tool name (one of [{names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n```\n'
)


class ReactTools(ToolFormat):
    """``default``: a plain-text tool list and ``Action:`` / ``Action Input:`` calls."""

    def describe(self, tools: Sequence[dict[str, Any]]) -> str:
        text, names = "", []
        for raw in tools:
            tool = _as_function(raw)
            args = ""
            params = tool["parameters"]
            for pname, param in params["properties"].items():
                required = ", required" if pname in params.get("required", []) else ""
                enum = f", should be one of [{', '.join(param['enum'])}]" if param.get("enum") else ""
                items = f", where each item should be {param['items'].get('type', '')}" if param.get("items") else ""
                args += (
                    f"  - {pname} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
                )
            text += (
                f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{args}\n"
            )
            names.append(tool["name"])
        return _REACT_HEADER + text + _REACT_USAGE.format(names=", ".join(names))

    def call(self, calls: Sequence[ToolCall]) -> str:
        return "\n".join(f"Action: {c.name}\nAction Input: {c.arguments}" for c in calls)

    def extract(self, text: str) -> str | list[ToolCall]:
        found = re.findall(r"Action:\s*([a-zA-Z0-9_]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", text, re.DOTALL)
        calls = []
        for name, raw in found:
            try:
                args = json.loads(raw.strip().strip('"').strip("`"))
            except json.JSONDecodeError:
                return text
            calls.append(ToolCall(name.strip(), _dump(args)))
        return calls or text


_QWEN_TOOLS = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>'
)


class QwenTools(ToolFormat):
    """``qwen``: schemas inside ``<tools>``, each call a JSON object inside ``<tool_call>``."""

    def describe(self, tools: Sequence[dict[str, Any]]) -> str:
        return _QWEN_TOOLS.format(tools="".join("\n" + _dump(_wrapped(t)) for t in tools))

    def call(self, calls: Sequence[ToolCall]) -> str:
        return "\n".join(
            f"<tool_call>\n{_dump({'name': c.name, 'arguments': json.loads(c.arguments)})}\n</tool_call>" for c in calls
        )

    def extract(self, text: str) -> str | list[ToolCall]:
        calls = []
        for raw in re.findall(r"<tool_call>(.+?)</tool_call>(?=\s*<tool_call>|\s*$)", text, re.DOTALL):
            try:
                obj = json.loads(raw.strip())
            except json.JSONDecodeError:
                return text
            if "name" not in obj or "arguments" not in obj:
                return text
            calls.append(ToolCall(obj["name"], _dump(obj["arguments"])))
        return calls or text


_LLAMA3_TOOLS = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    'Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. '
    "Do not use variables.\n\n{tools}"
)


def today() -> str:
    """Today's date as Llama-3.1's tool prompt writes it (``26 Jul 2024``)."""
    return _dt.datetime.now().strftime("%d %b %Y")


@dataclass(frozen=True)
class Llama3Tools(ToolFormat):
    """``llama3``: JSON schemas in the system prompt, calls as ``{"name", "parameters"}`` JSON.

    The prompt carries a date, today's unless ``date`` is set (set it for reproducible tokens).
    """

    date: str | None = None

    def describe(self, tools: Sequence[dict[str, Any]]) -> str:
        body = "".join(_dump(_wrapped(t), indent=4) + "\n\n" for t in tools)
        return _LLAMA3_TOOLS.format(date=self.date or today(), tools=body)

    def call(self, calls: Sequence[ToolCall]) -> str:
        objs = [{"name": c.name, "parameters": json.loads(c.arguments)} for c in calls]
        return _dump(objs[0] if len(objs) == 1 else objs)

    def extract(self, text: str) -> str | list[ToolCall]:
        return _json_calls(text, "parameters")


_GLM4_TOOLS = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tools}"
)


class Glm4Tools(ToolFormat):
    """``glm4``: each schema as indented JSON under a heading; a call is ``name\\n{arguments}``."""

    def describe(self, tools: Sequence[dict[str, Any]]) -> str:
        body = ""
        for raw in tools:
            tool = _as_function(raw)
            body += (
                f"\n\n## {tool['name']}\n\n{_dump(tool, indent=4)}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
            )
        return _GLM4_TOOLS.format(tools=body)

    def call(self, calls: Sequence[ToolCall]) -> str:
        if len(calls) > 1:
            raise TemplateError("the glm4 tool format has no parallel calls: give one call per assistant turn")
        return f"{calls[0].name}\n{calls[0].arguments}"

    def extract(self, text: str) -> str | list[ToolCall]:
        if "\n" not in text:
            return text
        name, raw = text.split("\n", maxsplit=1)
        try:
            return [ToolCall(name, _dump(json.loads(raw.strip())))]
        except json.JSONDecodeError:
            return text


class MistralTools(ToolFormat):
    """``mistral`` (v0.3): ``[AVAILABLE_TOOLS]`` JSON, calls as a JSON list of ``{"name", "arguments"}``."""

    def describe(self, tools: Sequence[dict[str, Any]]) -> str:
        return "[AVAILABLE_TOOLS] " + _dump([_wrapped(t) for t in tools]) + "[/AVAILABLE_TOOLS]"

    def call(self, calls: Sequence[ToolCall]) -> str:
        return _dump([{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls])

    def extract(self, text: str) -> str | list[ToolCall]:
        return _json_calls(text, "arguments")


def _json_calls(text: str, key: str) -> str | list[ToolCall]:
    try:
        found = json.loads(text.strip())
    except json.JSONDecodeError:
        return text
    found = found if isinstance(found, list) else [found]
    try:
        return [ToolCall(t["name"], _dump(t[key])) for t in found]
    except (KeyError, TypeError):
        return text


TOOL_FORMATS: dict[str, ToolFormat] = {
    "default": ReactTools("default"),
    "qwen": QwenTools("qwen"),
    "llama3": Llama3Tools("llama3"),
    "glm4": Glm4Tools("glm4"),
    "mistral": MistralTools("mistral"),
}


def get_tool_format(name: str) -> ToolFormat:
    """The tool format called ``name`` (a LLaMA-Factory ``tool_format`` value)."""
    if name not in TOOL_FORMATS:
        raise TemplateError(
            f"unknown tool_format {name!r}.{did_you_mean(name, TOOL_FORMATS)} Available: {', '.join(TOOL_FORMATS)}"
        )
    return TOOL_FORMATS[name]


def parse_calls(content: str) -> list[ToolCall]:
    """Read a function turn's content: a JSON object ``{"name", "arguments"}`` or a list of them."""
    try:
        found = json.loads(content)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"a tool call is not valid JSON ({exc.msg}): {content[:80]!r}") from exc
    found = found if isinstance(found, list) else [found]
    try:
        return [ToolCall(c["name"], _dump(c["arguments"])) for c in found]
    except (KeyError, TypeError) as exc:
        raise TemplateError(
            f'a tool call must be {{"name": ..., "arguments": {{...}}}} (or a list of them); got {content[:80]!r}'
        ) from exc
