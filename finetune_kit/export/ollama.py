"""Ollama Modelfiles: a Go TEMPLATE written from a chat template's slots, stops, system prompt, context size.

Ollama renders chats with Go's ``text/template``, not Jinja, so the tokenizer's ``chat_template``
is not what it uses. :func:`go_template` writes the named template's slots as Go actions, the way
:func:`finetune_kit.data.jinja.template_jinja` writes them as Jinja: for a conversation of system,
user and assistant messages ending with a user message, Ollama's prompt is character for
character what ``apply_chat_template(..., add_generation_prompt=True)`` and
:meth:`ChatTemplate.prompt` give, BOS/EOS included as the fitted tokenizer's token strings.

How Ollama feeds the template (modern ``.Messages`` form): ``.Messages`` holds every message
(consecutive ones of a role merged), ``.System`` all system messages joined, and a chat request
without a system message first gets the Modelfile's ``SYSTEM`` put in front. The template uses
``.System`` and falls back to the template's default system prompt, as training did, so the
default holds with or without ``SYSTEM``. A conversation ending with an assistant message is a
reply to continue: that reply is left open (no end-of-turn after it), as Ollama's own templates do.

Limits: tool calls and tool results (Ollama's ``tool`` role) are not rendered and the template
declares no tools, so Ollama refuses tool requests; the tokenizer's own Jinja template
(``template=None``) cannot be converted. For reasoning templates (qwen3) the ``think: false``
request option writes the empty thought, as ``enable_thinking=False`` does in the Jinja template.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune_kit._fs import write_text
from finetune_kit.data.slots import Slot, Special
from finetune_kit.data.template import ChatTemplate
from finetune_kit.errors import ConfigError, ExportError, TemplateError

MODELFILE_NAME = "Modelfile"
"""The file name :func:`write_modelfile` writes and :func:`ollama_create` reads."""

ParameterValue = str | int | float | bool
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*(:[A-Za-z0-9_][A-Za-z0-9._-]*)?")
_GO_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


# ----- Go TEMPLATE -----------------------------------------------------------------------------------
def go_template(template: ChatTemplate, tokenizer: Any, *, runtime_adds_bos: bool = False) -> str:
    """The Ollama ``TEMPLATE`` (Go ``text/template``) that renders ``template`` as training did.

    ``tokenizer`` gives the BOS/EOS strings (fitted to the template in a copy when it is not yet).
    With ``runtime_adds_bos`` the BOS that would start the prompt is left out, because the runtime
    puts one there itself: set it when the GGUF's ``tokenizer.ggml.add_bos_token`` is true (Ollama
    reads a missing key as true), or prompts start with two BOS. Example::

        text = go_template(get_template("chatml"), tokenizer)
        assert text.startswith("{{- $system := .System }}")
    """
    _check_expressible(template)
    bos, eos = _special_strings(template, tokenizer)
    slots = _GoSlots(bos, eos)
    lines = ["{{- $system := .System }}"]
    if template.default_system:
        lines.append("{{- if not $system }}{{ $system = " + _go_string(template.default_system) + " }}{{ end }}")
    first_is_bos = runtime_adds_bos and not template.prefix
    lines.append(_line(slots.write(template.prefix, lead="true" if runtime_adds_bos else None)))
    if not template.system_in_user and template.system:
        system = slots.write(template.system, "{{ $system }}", lead="true" if first_is_bos else None)
        lines.append(_line(["{{ if $system }}", *system, "{{ end }}"]))
    lead = None
    if first_is_bos:  # a message slot's BOS starts the prompt when nothing was written before it
        lead = "$first" if template.system_in_user or not template.system else "(and $first (not $system))"
    content = "{{ $m.Content }}"
    if template.system_in_user:
        system = slots.write(template.system[:1], "{{ $system }}")
        content = "{{ if and $first $system }}" + "".join(system) + "{{ end }}" + content
    track_first = template.system_in_user or lead is not None
    user = slots.write(template.user, content, lead=lead)
    reply = slots.write(template.assistant, "{{ $m.Content }}", lead=lead)
    head, tail = _split_after(reply, "{{ $m.Content }}")
    lines += [
        "{{- $first := true }}" if track_first else "",
        "{{- range $i, $m := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{- if eq $m.Role "user" }}',
        _line(user),
        _thought(template),
        "{{- $first = false }}" if track_first else "",
        '{{- else if eq $m.Role "assistant" }}',
        _line([*head, *(["{{ if not $last }}", *tail, "{{ end }}"] if tail else [])]),
        "{{- $first = false }}" if track_first else "",
        "{{- end }}",
        "{{- end }}",
    ]
    return "\n".join(line for line in lines if line)


class _GoSlots:
    """Writes slots as Go actions, BOS/EOS as the tokenizer's token strings."""

    def __init__(self, bos: str, eos: str) -> None:
        self.bos, self.eos = bos, eos

    def write(self, slot: Slot, content: str = "", *, lead: str | None = None) -> list[str]:
        """Go actions for ``slot``; ``content`` writes ``{{content}}``; a first BOS is skipped while ``lead`` holds."""
        out = []
        for i, piece in enumerate(slot):
            if isinstance(piece, Special):
                text = piece.token if piece.kind == "token" else (self.bos if piece.kind == "bos" else self.eos)
                if i == 0 and piece.kind == "bos" and lead is not None:
                    out += (
                        []
                        if lead == "true" or not text
                        else ["{{ if not " + lead + " }}" + _literal(text) + "{{ end }}"]
                    )
                else:
                    out.append(_literal(text))
                continue
            before, hit, after = piece.partition("{{content}}")
            out += [_literal(before), content if hit else "", _literal(after)]
        return [action for action in out if action]


def _thought(template: ChatTemplate) -> str:
    """The empty thought a reasoning template writes after the last user message when thinking is off."""
    if not template.reasoning:
        return ""
    empty = _literal(template.thought_words[0] + template.thought_words[1])
    if template.enable_thinking is False:
        return "{{- if $last }}" + empty + "{{ end }}"
    return "{{- if and $last $.IsThinkSet (not $.Think) }}" + empty + "{{ end }}"


def _check_expressible(template: ChatTemplate) -> None:
    if template.is_native:
        raise TemplateError(
            "the tokenizer's own Jinja chat template (template: null) cannot be turned into an Ollama TEMPLATE. Fix: "
            "export with the named template the model was trained with (e.g. template: chatml)"
        )
    for name in ("prefix", "system", "user", "assistant"):
        for piece in getattr(template, name):
            if isinstance(piece, str) and re.search(r"\{\{(?!content\}\})\w+\}\}", piece):
                raise TemplateError(
                    f"template {template.name!r}: its {name} slot {piece!r} has a placeholder other than "
                    "{{content}}, which the Ollama TEMPLATE cannot fill. Fix: write the slot with {{content}} only"
                )
    if template.system_in_user and template.system and not isinstance(template.system[0], str):
        raise TemplateError(f"template {template.name!r}: a system text put in the user turn must start with text")


def _special_strings(template: ChatTemplate, tokenizer: Any) -> tuple[str, str]:
    """BOS and EOS as the template's fitted tokenizer writes them (fitting a copy if needed)."""
    if tokenizer is None:
        raise TemplateError(
            "an Ollama TEMPLATE needs the tokenizer (for its BOS/EOS tokens). Fix: pass model.tokenizer"
        )
    if not template.is_fitted(tokenizer):
        tokenizer = copy.deepcopy(tokenizer)
        template.fit_tokenizer(tokenizer)
    return tokenizer.bos_token or "", tokenizer.eos_token or ""


def _split_after(actions: list[str], marker: str) -> tuple[list[str], list[str]]:
    """``actions`` up to and including ``marker``, and the rest (what closes a reply)."""
    if marker not in actions:
        return actions, []
    cut = actions.index(marker) + 1
    return actions[:cut], actions[cut:]


def _literal(text: str) -> str:
    return "{{ " + _go_string(text) + " }}" if text else ""


def _line(actions: Sequence[str]) -> str:
    """One template line; its leading ``{{-`` drops the line break before it, so only actions write text."""
    text = "".join(actions)
    return "{{- " + text[3:] if text else ""


def _go_string(text: str) -> str:
    """A Go string literal; characters a Modelfile would drop are written as escapes."""
    out = []
    for ch in text:
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


# ----- stops and the Modelfile -------------------------------------------------------------------------
def stop_strings(template: ChatTemplate, tokenizer: Any) -> list[str]:
    """One ``stop`` string per token that ends a reply: the fitted tokenizer's EOS, then the template's stop words."""
    eos = template.stop_words[0] if template.replace_eos and template.stop_words else tokenizer.eos_token
    out: list[str] = []
    for word in (eos, *template.stop_words):
        if word and word not in out:
            out.append(word)
    return out


def modelfile(
    gguf_file: str,
    template: ChatTemplate,
    tokenizer: Any,
    *,
    system: str | None = None,
    num_ctx: int,
    parameters: Mapping[str, ParameterValue | Sequence[ParameterValue]] | None = None,
    runtime_adds_bos: bool = False,
) -> str:
    """The text of a Modelfile running ``gguf_file`` (a file beside it) with ``template``.

    ``SYSTEM`` is ``system`` when given, else the template's default system prompt (none when
    both are empty); the TEMPLATE falls back to the same text. ``parameters`` adds ``PARAMETER``
    lines (a list gives one line per item; ``stop`` adds stops). ``runtime_adds_bos``: see
    :func:`go_template`. Example::

        text = modelfile("model-q4_K_M.gguf", get_template("qwen"), tokenizer, num_ctx=4096)
    """
    problems = []
    if isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or num_ctx < 1:
        problems.append(f"num_ctx: got {num_ctx!r}; expected a positive number of tokens")
    if not gguf_file or "\n" in gguf_file or "\r" in gguf_file:
        problems.append(f"gguf_file: got {gguf_file!r}; expected the GGUF file's name")
    extra = _parameter_lines(parameters or {}, problems)
    if problems:
        raise ConfigError(problems, header="Cannot write the Modelfile")
    template = template.with_default_system(system)
    source = gguf_file if os.path.isabs(gguf_file) or gguf_file.startswith(("./", "../")) else f"./{gguf_file}"
    lines = [
        f"# Ollama Modelfile written by finetune_kit (chat template {template.name!r}).",
        f"# Make the model with: ollama create NAME -f {MODELFILE_NAME}",
        "FROM " + _quote(source, "gguf_file", forms=("bare", "double")),
    ]
    if template.is_native:  # no slots to write Go from: Ollama picks a template from the GGUF's own
        lines.append("# No TEMPLATE: the model's own chat template is in the GGUF file (tokenizer.chat_template)")
    else:
        lines.append(
            "TEMPLATE " + _quote(go_template(template, tokenizer, runtime_adds_bos=runtime_adds_bos), "template")
        )
    if template.default_system:
        lines.append("SYSTEM " + _quote(template.default_system, "system"))
    stops = stop_strings(template, tokenizer) + [line for key, line in extra if key == "stop"]
    lines += [f"PARAMETER stop {_quote(s, 'stop', forms=('double', 'triple'))}" for s in dict.fromkeys(stops)]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    lines += [
        f"PARAMETER {key} {_quote(line, key, forms=('bare', 'double', 'triple'))}"
        for key, line in extra
        if key != "stop"
    ]
    return "\n".join(lines) + "\n"


def _parameter_lines(parameters: Mapping[str, Any], problems: list[str]) -> list[tuple[str, str]]:
    out = []
    for key, value in parameters.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(key)):
            problems.append(f"parameters: {key!r} is not a parameter name (letters, digits and _ only)")
        elif key == "num_ctx":
            problems.append("parameters: num_ctx has its own argument. Fix: pass num_ctx=N")
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if not isinstance(item, (str, int, float, bool)):
                problems.append(f"parameters[{key!r}]: got {item!r}; expected a string, number or boolean")
            else:
                out.append((str(key), str(item).lower() if isinstance(item, bool) else str(item)))
    return out


def _quote(value: str, what: str, *, forms: Sequence[str] = ("triple", "double", "bare")) -> str:
    """``value`` in the first form Ollama's Modelfile parser reads back unchanged (it has no escapes)."""
    dropped = sorted({f"U+{ord(ch):04X}" for ch in value if not (ch.isprintable() or ch in "\t\r\n")})
    if dropped:
        raise ConfigError(
            f"{what}: {value[:60]!r} has characters a Modelfile drops ({', '.join(dropped)}). Fix: remove them",
            header="Cannot write the Modelfile",
        )
    for form in forms:
        quoted = {"triple": f'"""{value}"""', "double": f'"{value}"', "bare": value}[form]
        if _read_back(quoted) == value:
            return quoted
    raise ConfigError(
        f"{what}: {value[:60]!r} has a line that ends with a double quote, which ends a quoted Modelfile value early "
        "(the format has no escapes). Fix: change the text so no line but the last ends with '\"'",
        header="Cannot write the Modelfile",
    )


def _read_back(text: str) -> str | None:
    """The value Ollama's parser reads from ``text`` plus a line end; None when it stops before the end.

    The parser ends a value at the first line end where the text so far, stripped, is complete:
    bare, or ``"..."``/``\"\"\"...\"\"\"`` with its closing quotes there.
    """
    kept: list[str] = []
    for i, ch in enumerate(text + "\n"):
        if ch in "\r\n":
            value = _unquote("".join(kept).strip(" \t\r\n"))
            if value is not None:
                return value if i == len(text) else None
        if ch in " \t\r\n" or ch.isprintable():
            kept.append(ch)
    return None


def _unquote(text: str) -> str | None:
    if text.startswith('"""'):
        return text[3:-3] if len(text) >= 6 and text.endswith('"""') else None
    if text.startswith('"'):
        return text[1:-1] if len(text) >= 2 and text.endswith('"') else None
    return text


# ----- files and `ollama create` -------------------------------------------------------------------------
def write_modelfile(folder: Path, text: str) -> Path:
    """Write ``text`` to ``folder/Modelfile`` atomically (a temporary sibling renamed over it)."""
    path = Path(folder) / MODELFILE_NAME
    write_text(path, text)
    return path


def create_command(name: str, modelfile: Path) -> str:
    """The shell command that makes the Ollama model ``name`` from ``modelfile`` (for notes to the user)."""
    return f"ollama create {shlex.quote(name)} -f {shlex.quote(str(Path(modelfile).absolute()))}"


def ollama_create(name: str, modelfile: Path) -> str | None:
    """Run ``ollama create NAME -f Modelfile`` in the Modelfile's folder; None when no ``ollama`` is on PATH.

    Returns ``name`` once the model exists. Ollama's own message is in the error when it fails (its
    server not running, a GGUF it cannot load, ...).
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"export_ollama: got {name!r}; an Ollama model name is letters, digits, '.', '_' and '-', with an "
            "optional namespace/ and :tag. Fix: e.g. export_ollama: my-model:latest"
        )
    binary = shutil.which("ollama")
    if binary is None:
        return None
    modelfile = Path(modelfile).absolute()
    done = subprocess.run(
        [binary, "create", name, "-f", modelfile.name], cwd=modelfile.parent, capture_output=True, text=True
    )
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip())[-2000:]
        raise ExportError(
            f"`ollama create {name}` failed (exit {done.returncode}): {said or 'no output'}. Fix the cause above "
            f"(is the Ollama server running? `ollama serve`), then run: {create_command(name, modelfile)}"
        )
    return name
