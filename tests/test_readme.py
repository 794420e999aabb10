"""The documentation is tested against the code, so it cannot drift.

* The README's main Python example (the code block starting with ``# example: chain``) runs as
  written, in a fresh folder, offline (slow: it trains the bundled model).
* Every relative link in the README, the changelog and ``docs/*.md`` points at a file (and
  heading) that exists; every repository path named in the README's commands exists.
* The key table of ``docs/cli.md`` names real fields of real config classes, covers every key
  the parser accepts, and lists every key that is refused as "not supported yet".
* Every ``finetune-kit`` command shown in the README or ``docs/`` goes through the real
  command-line parser (nothing heavy runs) without an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_ZH = ROOT / "README.zh-CN.md"
CLI_DOC = ROOT / "docs" / "cli.md"
DOC_FILES = [README, README_ZH, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE_MARKER = "# example: chain"
REPO_TOP_LEVEL = ("scripts/", ".ci/", "finetune_kit/", "docs/", "notebooks/", "tests/")


# ------------------------------------------------------------------ markdown helpers
def code_blocks(path: Path, language: str) -> list[str]:
    """The bodies of the fenced code blocks of ``language`` in ``path``."""
    text = path.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def example_code(path: Path) -> str:
    blocks = [b for b in code_blocks(path, "python") if b.startswith(EXAMPLE_MARKER)]
    assert len(blocks) == 1, f"{path.name} must hold exactly one python block starting with {EXAMPLE_MARKER!r}"
    return blocks[0]


def without_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = without_code(path.read_text(encoding="utf-8"))
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def shell_commands(path: Path) -> list[str]:
    """Commands of the ``bash`` blocks, with backslash continuations joined."""
    commands = []
    for block in code_blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


# ------------------------------------------------------------------ the README example
# Counts the weight loads of the example (conversions of the bundled GGUF file into the cache aside).
LOAD_COUNTER = """\
import atexit, json, transformers
_loads = []
_real = transformers.AutoModelForCausalLM.from_pretrained.__func__
def _counting(cls, path, *args, **kwargs):
    if "gguf_file" not in kwargs:
        _loads.append(str(path))
    return _real(cls, path, *args, **kwargs)
transformers.AutoModelForCausalLM.from_pretrained = classmethod(_counting)
atexit.register(lambda: print("MODEL LOADS: " + json.dumps(_loads)))
"""


@pytest.mark.slow
def test_readme_chain_example_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "readme_example.py"
    script.write_text(LOAD_COUNTER + example_code(README), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    work = tmp_path / "runs" / "readme-example"
    assert (work / "lora" / "adapter_model.safetensors").is_file()
    assert (work / "lora" / "finetune_kit_config.json").is_file()
    predictions = (work / "predict" / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(predictions) == 5
    assert (work / "predict" / "predict_results.json").is_file()
    assert (work / "merged" / "finetune_kit_export.json").is_file()
    assert "rouge-1" in proc.stdout and "TrainResult(" in proc.stdout
    # the base model is read from disk once; the merged folder once, to check it loads on its own
    loads = json.loads(proc.stdout.split("MODEL LOADS: ", 1)[1].splitlines()[0])
    assert len(loads) == 2 and sum("merged" in p for p in loads) == 1, loads


def test_the_chinese_readme_runs_the_same_code() -> None:
    def code_only(source: str) -> list[str]:
        lines = [re.sub(r"\s+#.*$", "", line).rstrip() for line in source.splitlines()]
        return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]

    assert code_only(example_code(README_ZH)) == code_only(example_code(README))
    assert code_blocks(README_ZH, "yaml") == code_blocks(README, "yaml")

    def words(path: Path) -> list[list[str]]:
        return [shlex.split(c, comments=True) for c in shell_commands(path)]

    assert words(README_ZH) == words(README)


# ------------------------------------------------------------------ links and paths
def test_relative_links_point_at_existing_files_and_headings() -> None:
    broken = []
    for doc in DOC_FILES:
        text = without_code(doc.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path_part, _, fragment = target.partition("#")
            linked = (doc.parent / path_part).resolve() if path_part else doc
            if not linked.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_paths_in_the_readme_commands_exist() -> None:
    text = README.read_text(encoding="utf-8")
    words = set()
    for command in shell_commands(README) + re.findall(r"`([^`\n]+)`", without_code(text)):
        try:
            words.update(shlex.split(command, comments=True))
        except ValueError:  # unbalanced quotes in prose
            words.update(command.split())
    for yaml_block in code_blocks(README, "yaml"):
        words.update(re.findall(r"^dataset_dir: (\S+)", yaml_block, flags=re.M))
    paths = sorted(w.rstrip("/") for w in words if w.startswith(REPO_TOP_LEVEL) and "<" not in w)
    assert {"scripts/quickstart.sh", "scripts/test.sh", ".ci/run"} <= set(paths)
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the README names paths that do not exist: {missing}"


def test_readme_yaml_datasets_exist() -> None:
    import json

    for block in code_blocks(README, "yaml"):
        dataset_dir = ROOT / re.search(r"^dataset_dir: (\S+)", block, flags=re.M).group(1)
        names = re.search(r"^dataset: (\S+)", block, flags=re.M).group(1).split(",")
        info = json.loads((dataset_dir / "dataset_info.json").read_text(encoding="utf-8"))
        assert set(names) <= set(info)


# ------------------------------------------------------------------ docs/cli.md key table
def config_classes() -> dict[str, type]:
    """Every config section a LLaMA-Factory-style command parses (the quickstart's own keys aside)."""
    from finetune_kit.cli.commands import COMMANDS
    from finetune_kit.quickstart import QuickstartConfig

    classes = {cls for name, command in COMMANDS.items() for cls in command.sections if cls is not QuickstartConfig}
    assert len(classes) == 13, sorted(c.__name__ for c in classes)
    return {cls.__name__: cls for cls in classes}


def mapping_rows() -> list[tuple[str, str, str]]:
    """``(key, class name, field)`` for each row of the key tables in docs/cli.md."""
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)\.(\w+)` \|", CLI_DOC.read_text(encoding="utf-8"), flags=re.M)
    assert rows, "docs/cli.md has no key table rows"
    return rows


def test_cli_doc_key_table_names_real_config_fields() -> None:
    classes = config_classes()
    wrong = []
    for key, class_name, field in mapping_rows():
        cls = classes.get(class_name)
        if cls is None:
            wrong.append(f"{key}: {class_name} is not a config class of the parser")
        elif field not in {f.name for f in dataclasses.fields(cls)}:
            wrong.append(f"{key}: {class_name} has no field {field!r}")
        elif key != field:
            wrong.append(f"{key}: the key and the field name differ ({field})")
    assert not wrong, "\n".join(wrong)


def test_cli_doc_key_table_covers_every_accepted_key() -> None:
    documented = {(class_name, field) for _, class_name, field in mapping_rows()}
    missing = [
        f"{name}.{f.name}"
        for name, cls in config_classes().items()
        for f in dataclasses.fields(cls)
        if (name, f.name) not in documented
    ]
    assert not missing, f"docs/cli.md does not document these keys: {missing}"


def test_cli_doc_lists_every_unsupported_key() -> None:
    from finetune_kit.config.compat import UNSUPPORTED

    text = CLI_DOC.read_text(encoding="utf-8")
    section = text.split("## Keys that are not supported yet", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(\w+)`", section))
    missing = sorted(set(UNSUPPORTED) - listed)
    assert not missing, f"docs/cli.md does not list these unsupported keys: {missing}"
    stale = sorted(k for k in listed - set(UNSUPPORTED) if k.islower() and "_" in k)
    assert not stale, f"docs/cli.md lists keys as unsupported that the parser does not refuse: {stale}"


# ------------------------------------------------------------------ every documented command parses
class _Parsed(Exception):
    """Raised by the patched ``build`` once the configs are built, before any heavy work."""


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOC_FILES:
        for command in shell_commands(doc):
            words = shlex.split(command, comments=True)
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words = words[1:]  # API_PORT=8000 finetune-kit api ...
            if len(words) >= 2 and words[0] == "finetune-kit" and words[1] not in ("env", "version"):
                found.append((f"{doc.relative_to(ROOT)}: {command}", command))
    return found


@pytest.mark.parametrize(("where", "command"), documented_commands(), ids=lambda v: v[:90])
def test_documented_command_is_accepted_by_the_parser(
    where: str, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_kit.cli import commands, main
    from finetune_kit.config import parse

    def build_then_stop(values, sections, **kwargs):
        raise _Parsed(parse.build(values, sections, **kwargs))

    monkeypatch.setattr(commands, "build", build_then_stop)
    monkeypatch.setenv("FINETUNE_KIT_TRACEBACK", "1")  # a config error raises instead of printing
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    words = shlex.split(command, comments=True)
    while re.match(r"^[A-Z_]+=", words[0]):
        name, _, value = words.pop(0).partition("=")
        monkeypatch.setenv(name, value)
    for word in words:
        if word.endswith((".yaml", ".yml")):
            (tmp_path / word).write_text(code_blocks(README, "yaml")[0], encoding="utf-8")
    with pytest.raises(_Parsed):
        main.main(words[1:])
