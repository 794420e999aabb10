"""Ollama export: the Go TEMPLATE renders what the Jinja template and ChatTemplate.prompt render; Modelfile text.

The Go side runs through tests/export/gotmpl (Go's text/template, fed the way Ollama's chat endpoint
feeds it). Those tests need the Go toolchain: `apt-get install -y golang-go`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from finetune_kit.data.templates import TEMPLATES, get_template
from finetune_kit.errors import ConfigError, ExportError, TemplateError
from finetune_kit.export.ollama import (
    MODELFILE_NAME,
    go_template,
    modelfile,
    ollama_create,
    stop_strings,
    write_modelfile,
)

GOTMPL = Path(__file__).parent / "gotmpl"
TRICKY = 'Say "hi" {{ .System }} {% raw %} \\ ünï ✓\nsecond line'
CONVERSATIONS = {
    "single": [{"role": "user", "content": TRICKY}],
    "multi": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!\nHow can I help?"},
        {"role": "user", "content": "2+2?"},
    ],
    "system": [{"role": "system", "content": 'Be "brief".'}, {"role": "user", "content": "Hi"}],
    "system_multi": [
        {"role": "system", "content": "Answer in French.\n\nAlways."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": TRICKY},
    ],
}
NAMED = {**TEMPLATES, "qwen3_thinking_off": TEMPLATES["qwen3"].with_options(enable_thinking=False)}


# ----- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def gotmpl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go renderer, built once per test session (skips without a Go toolchain)."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install -y golang-go): the Go TEMPLATE is not rendered")
    out = tmp_path_factory.mktemp("gotmpl")
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    env.setdefault("GOCACHE", str(out / "cache"))
    env.setdefault("GOPATH", str(out / "gopath"))
    subprocess.run(["go", "build", "-o", str(out / "gotmpl"), "."], cwd=GOTMPL, env=env, check=True)
    return out / "gotmpl"


@pytest.fixture(scope="module")
def base_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def fitted(base_tokenizer):
    """The tokenizer as an export saves it for a template: fitted to it, its Jinja as chat_template."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            template = NAMED[name]
            tok = copy.deepcopy(base_tokenizer)
            # SmolLM2's tokenizer, given the other families' end-of-turn tokens and a BOS of its own
            # (its BOS is <|im_start|>), so where a template writes BOS shows in the text
            missing = [w for w in template.stop_words if w not in tok.get_vocab()]
            tok.add_special_tokens({"bos_token": "<s>"})
            if missing:
                tok.add_special_tokens({"additional_special_tokens": missing})
            template.fit_tokenizer(tok)
            tok.chat_template = template.jinja()
            cache[name] = tok
        return cache[name]

    return get


def render_go(binary: Path, template: str, messages, *, system: str = "", think: bool | None = None) -> str:
    """Ollama's chat rendering of ``messages``; ``system`` is the Modelfile's SYSTEM."""
    payload = {"template": template, "system": system, "messages": messages, "think": think}
    done = subprocess.run([str(binary)], input=json.dumps(payload).encode(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode("utf-8")


def render_hf(tok, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


# ----- the Go TEMPLATE renders like the Jinja template ------------------------------------------------------
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(NAMED))
def test_go_template_renders_exactly_like_the_jinja_template(gotmpl, fitted, name, conv):
    template, tok, messages = NAMED[name], fitted(name), CONVERSATIONS[conv]
    expected = render_hf(tok, messages)
    assert expected == template.prompt(messages, tok)
    text = go_template(template, tok)
    # Ollama puts the Modelfile's SYSTEM (the default system prompt) in front when a chat has no system
    # message; the template falls back to the default itself when SYSTEM is unset.
    for modelfile_system in {template.default_system, ""}:
        assert render_go(gotmpl, text, messages, system=modelfile_system) == expected, modelfile_system


@pytest.mark.parametrize("name", ["llama2", "mistral", "llama3", "gemma", "deepseek3", "chatml"])
def test_runtime_bos_leaves_only_the_leading_bos_to_the_runtime(gotmpl, fitted, name):
    template, tok = NAMED[name], fitted(name)
    for messages in CONVERSATIONS.values():
        expected = render_hf(tok, messages)
        rendered = render_go(gotmpl, go_template(template, tok, runtime_adds_bos=True), messages)
        if expected.startswith("<s>"):
            assert tok.bos_token + rendered == expected
        else:
            assert rendered == expected
    multi = render_go(gotmpl, go_template(template, tok, runtime_adds_bos=True), CONVERSATIONS["system_multi"])
    assert multi.count("<s>") == (1 if name == "llama2" else 0)  # llama2 opens each later turn with BOS


def test_think_false_writes_the_empty_thought_as_enable_thinking_false_does(gotmpl, fitted):
    tok, messages = fitted("qwen3"), CONVERSATIONS["system_multi"]
    text = go_template(TEMPLATES["qwen3"], tok)
    off = render_hf(tok, messages, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert off == NAMED["qwen3_thinking_off"].prompt(messages, tok)
    assert render_go(gotmpl, text, messages, think=False) == off
    assert (
        render_go(gotmpl, text, messages, think=True)
        == render_hf(tok, messages)
        == TEMPLATES["qwen3"].prompt(messages, tok)
    )


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral"])
def test_a_last_assistant_message_is_left_open_to_be_continued(gotmpl, fitted, name):
    tok = fitted(name)
    messages = [*CONVERSATIONS["multi"], {"role": "assistant", "content": "It is"}]
    rendered = render_go(gotmpl, go_template(NAMED[name], tok), messages)
    assert (
        rendered == render_hf(tok, CONVERSATIONS["multi"]) + NAMED[name].assistant[0].split("{{content}}")[0] + "It is"
    )


def test_the_template_uses_the_messages_form_and_declares_no_tools(fitted):
    text = go_template(TEMPLATES["llama3"], fitted("llama3"))
    assert text.startswith("{{- ") and "range $i, $m := .Messages" in text  # Ollama then passes .Messages
    assert ".Tools" not in text and ".Thinking" not in text  # so Ollama refuses tools and does not parse thoughts


def test_the_tokenizers_own_template_cannot_become_a_go_template(base_tokenizer):
    with pytest.raises(TemplateError, match="named template"):
        go_template(get_template(None, base_tokenizer), base_tokenizer)


def test_a_slot_placeholder_other_than_content_is_refused(fitted):
    template = replace(TEMPLATES["chatml"], name="numbered", user=("Q{{idx}}: {{content}}\nA: ",))
    with pytest.raises(TemplateError, match="placeholder other than"):
        go_template(template, fitted("chatml"))


def test_an_unfitted_tokenizer_is_fitted_in_a_copy(base_tokenizer, fitted):
    before = base_tokenizer.eos_token
    assert go_template(TEMPLATES["phi4"], base_tokenizer) == go_template(TEMPLATES["phi4"], fitted("phi4"))
    assert base_tokenizer.eos_token == before


# ----- stops and the Modelfile --------------------------------------------------------------------------
def read_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs: a quoted value runs to the first line end where its closing quotes stand."""
    commands, lines = [], iter(text.split("\n"))
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        for quote in ('"""', '"'):
            if value.startswith(quote):
                while not (len(value.rstrip()) >= 2 * len(quote) and value.rstrip().endswith(quote)):
                    value += "\n" + next(lines)
                value = value.rstrip()[len(quote) : -len(quote)]
                break
        else:
            value = value.strip()
        if name == "PARAMETER":
            name, _, value = value.partition(" ")
            value = value[1:-1] if value.startswith('"') else value
        commands.append((name, value))
    return commands


def test_stop_strings_are_the_tokens_that_end_a_reply(fitted, base_tokenizer):
    assert stop_strings(TEMPLATES["chatml"], fitted("chatml")) == ["<|im_end|>", "<|im_start|>"]
    assert stop_strings(TEMPLATES["llama3"], base_tokenizer) == ["<|eot_id|>", "<|eom_id|>"]
    assert stop_strings(TEMPLATES["default"], base_tokenizer) == [base_tokenizer.eos_token]
    assert stop_strings(TEMPLATES["glm4"], fitted("glm4")) == [fitted("glm4").eos_token, "<|user|>", "<|observation|>"]


def test_modelfile_has_from_template_system_stops_and_num_ctx(fitted):
    tok = fitted("chatml")
    text = modelfile("model-q4_K_M.gguf", TEMPLATES["chatml"], tok, system="Be brief.", num_ctx=4096)
    assert read_modelfile(text) == [
        ("FROM", "./model-q4_K_M.gguf"),
        ("TEMPLATE", go_template(TEMPLATES["chatml"].with_default_system("Be brief."), tok)),
        ("SYSTEM", "Be brief."),
        ("stop", "<|im_end|>"),
        ("stop", "<|im_start|>"),
        ("num_ctx", "4096"),
    ]
    assert 'if not $system }}{{ $system = "Be brief." }}' in text  # the template falls back to the same text


def test_modelfile_system_defaults_to_the_templates_and_can_be_turned_off(fitted):
    tok = fitted("qwen")
    commands = dict(read_modelfile(modelfile("m.gguf", TEMPLATES["qwen"], tok, num_ctx=512)))
    assert commands["SYSTEM"] == TEMPLATES["qwen"].default_system
    off = modelfile("m.gguf", TEMPLATES["qwen"], tok, system="", num_ctx=512)
    assert "SYSTEM" not in dict(read_modelfile(off)) and "Alibaba" not in off
    assert "SYSTEM" not in dict(
        read_modelfile(modelfile("/abs/m.gguf", TEMPLATES["llama3"], fitted("llama3"), num_ctx=8))
    )


SYSTEMS = [
    'He said "hi"',
    "Use \"\"\" for docstrings, ''' too.",
    'Line one\nline "two"\n\n  indented """ line\nlast ends with """',
    "  padded with spaces and a tab\t",
    '"quoted at both ends"',
    "ends with a newline\n",
]


@pytest.mark.parametrize("system", SYSTEMS)
def test_modelfile_keeps_a_system_prompt_with_quotes_and_newlines(fitted, system):
    text = modelfile("m.gguf", TEMPLATES["chatml"], fitted("chatml"), system=system, num_ctx=64)
    assert dict(read_modelfile(text))["SYSTEM"] == system


def test_the_modelfile_template_renders_its_system_prompt(fitted, gotmpl):
    tok = fitted("chatml")
    for system in SYSTEMS:
        template = dict(read_modelfile(modelfile("m.gguf", TEMPLATES["chatml"], tok, system=system, num_ctx=64)))
        expected = render_hf(tok, [{"role": "system", "content": system}, *CONVERSATIONS["multi"]])
        assert render_go(gotmpl, template["TEMPLATE"], CONVERSATIONS["multi"], system=system) == expected
        assert render_go(gotmpl, template["TEMPLATE"], CONVERSATIONS["multi"]) == expected  # the fallback


@pytest.mark.parametrize(
    ("system", "match"), [('say """\nthen stop', "ends with a double quote"), ("no\u00a0break", "U\\+00A0")]
)
def test_modelfile_refuses_a_system_prompt_it_cannot_write(fitted, system, match):
    with pytest.raises(ConfigError, match=match):
        modelfile("m.gguf", TEMPLATES["chatml"], fitted("chatml"), system=system, num_ctx=64)


def test_modelfile_parameters_and_all_problems_at_once(fitted):
    tok = fitted("chatml")
    text = modelfile(
        "m.gguf", TEMPLATES["chatml"], tok, num_ctx=64, parameters={"temperature": 0.2, "stop": ["END"], "seed": 3}
    )
    commands = read_modelfile(text)
    assert [v for k, v in commands if k == "stop"] == ["<|im_end|>", "<|im_start|>", "END"]
    assert ("temperature", "0.2") in commands and ("seed", "3") in commands
    with pytest.raises(ConfigError) as err:
        modelfile("m\n.gguf", TEMPLATES["chatml"], tok, num_ctx=0, parameters={"num_ctx": 8, "bad key": 1})
    assert len(err.value.problems) == 4


def test_write_modelfile_replaces_the_file_atomically(tmp_path):
    path = write_modelfile(tmp_path / "out", "FROM ./a.gguf\n")
    assert path == tmp_path / "out" / MODELFILE_NAME and path.read_text() == "FROM ./a.gguf\n"
    write_modelfile(tmp_path / "out", "FROM ./b.gguf\n")
    assert path.read_text() == "FROM ./b.gguf\n" and sorted(p.name for p in path.parent.iterdir()) == [MODELFILE_NAME]


# ----- ollama create ---------------------------------------------------------------------------------------
def fake_ollama(bin_dir: Path, *, exit_code: int) -> Path:
    """An `ollama` on PATH that records its arguments and folder, then exits with ``exit_code``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    record = bin_dir / "calls.json"
    script = bin_dir / "ollama"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}))\n"
        f"print('Error: could not connect to ollama server', file=sys.stderr)\n"
        f"sys.exit({exit_code})\n"
    )
    script.chmod(0o755)
    return record


def test_ollama_create_without_an_ollama_binary_returns_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert ollama_create("my-model", write_modelfile(tmp_path, "FROM ./m.gguf\n")) is None


def test_ollama_create_runs_ollama_in_the_modelfiles_folder(tmp_path, monkeypatch):
    record = fake_ollama(tmp_path / "bin", exit_code=0)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    path = write_modelfile(tmp_path / "export", "FROM ./m.gguf\n")
    assert ollama_create("me/my-model:q4", path) == "me/my-model:q4"
    call = json.loads(record.read_text())
    assert call == {"argv": ["create", "me/my-model:q4", "-f", MODELFILE_NAME], "cwd": str(path.parent.resolve())}


def test_ollama_create_failure_says_what_ollama_said(tmp_path, monkeypatch):
    fake_ollama(tmp_path / "bin", exit_code=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    path = write_modelfile(tmp_path / "export", "FROM ./m.gguf\n")
    with pytest.raises(ExportError, match="could not connect to ollama server") as err:
        ollama_create("my-model", path)
    assert "ollama create my-model -f" in str(err.value)
    with pytest.raises(ConfigError, match="export_ollama"):
        ollama_create("bad name", path)


def test_a_model_with_its_own_chat_template_gets_no_template_line(base_tokenizer):
    native = get_template(None, base_tokenizer)
    text = modelfile("m-f16.gguf", native, base_tokenizer, num_ctx=2048)
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "")
    assert f'PARAMETER stop "{base_tokenizer.eos_token}"' in text and "PARAMETER num_ctx 2048" in text
