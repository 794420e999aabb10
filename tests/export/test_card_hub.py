"""Model card and Hub push: the card of a real export, and pushes to a fake Hub on 127.0.0.1.

The fake implements the requests huggingface_hub makes for a folder upload: create the repo,
validate README.md's metadata, ask each file's upload mode (always "regular" here, so no LFS or
Xet storage is involved) and commit the files as base64 NDJSON lines.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from huggingface_hub import constants

from finetune_kit import DatasetRegistry, Exporter, LoraTrainer
from finetune_kit._artifacts import RUN_RECORD, TRAIN_RESULTS, provenance
from finetune_kit.errors import ConfigError, ExportError
from finetune_kit.export.card import MODEL_CARD, model_card
from finetune_kit.export.hub import HubError, push_to_hub

SECRET = "hf_NeverWriteMeAnywhere0123456789"


def front_matter(card: str) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    meta = yaml.safe_load(match.group(1))
    assert isinstance(meta, dict)
    return meta


# ----- the card of a real export -------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    rows = [{"instruction": f"question {i}", "input": "", "output": f"answer number {i}"} for i in range(4)]
    (tmp / "d").mkdir()
    (tmp / "d" / "t.json").write_text(json.dumps(rows))
    (tmp / "d" / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "t.json"}}))
    result = (
        LoraTrainer(tiny_llama)
        .with_lora(lora_rank=4)
        .with_data(cutoff_len=64)
        .with_training(
            output_dir=str(tmp / "lora"),
            learning_rate=5e-2,
            max_steps=2,
            per_device_train_batch_size=4,
            save_steps=1000,
            disable_tqdm=True,
        )
    ).train(DatasetRegistry.from_dir(tmp / "d").load("t"))
    return result, Exporter(result).merge(tmp / "merged")


def test_card_of_a_real_export_says_what_was_trained_and_how(export):
    result, exported = export
    assert MODEL_CARD in exported.files
    card = (exported.export_dir / MODEL_CARD).read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["finetune_kit", "lora", "sft"]
    # a local random-weight base: no Hub id, no license, no Hub datasets are claimed
    assert "base_model" not in meta and "license" not in meta and "datasets" not in meta
    assert "`lora`, trained on `t`" in card and "- **Datasets:** `t`" in card
    assert "finetune_kit's `chatml` template" in card
    for row in ("| LoRA rank | 4 |", "| LoRA alpha | 8 |", "| learning rate | 0.05 |", "| max steps | 2 |"):
        assert row in card
    assert "| cutoff length | 64 |" in card
    assert f"| train_loss | {result.metrics['train_loss']:.4g} |" in card
    assert str(exported.export_dir.parent) not in card  # folder names only, never the user's paths


def test_card_snippet_runs_with_plain_transformers(export, monkeypatch):
    _, exported = export
    card = (exported.export_dir / MODEL_CARD).read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S)
    assert code and 'model_id = "merged"' in code.group(1)
    monkeypatch.chdir(exported.export_dir.parent)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.group(1).replace("max_new_tokens=128", "max_new_tokens=4"), "README.md", "exec"), {})
    assert out.getvalue().endswith("\n")


# ----- the card from records ---------------------------------------------------------------------------


def adapter_folder(tmp_path: Path, name: str, datasets: list[str], **training: Any) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    record = provenance(
        "train",
        model="bundled:smollm2-135m-instruct",
        adapters=[str(folder)],
        template="smollm2",
        datasets=datasets,
        config={
            "model": {"model_name_or_path": "bundled:smollm2-135m-instruct", "hf_hub_token": SECRET},
            "method": {"stage": "dpo", "finetuning_type": "lora"},
            "lora": {"lora_rank": 16, "lora_alpha": None, "use_dora": True},
            "training": {"learning_rate": 1e-4, "max_steps": -1, "num_train_epochs": 3.0, "bf16": True, **training},
            "encoding": {"cutoff_len": 1024},
        },
        resolved={"lora_target": ["q_proj", "v_proj"], "lora_alpha": 32},
    )
    (folder / RUN_RECORD).write_text(json.dumps(record))
    (folder / TRAIN_RESULTS).write_text(json.dumps({"train_loss": 0.123456, "epoch": 3.0, "note": "text"}))
    return folder


def export_info(model: str, adapters: list[Path], **config: Any) -> dict[str, Any]:
    return provenance(
        "export",
        model=model,
        adapters=[str(a) for a in adapters],
        template="smollm2",
        config={"export": {"export_dir": "/somewhere/out", **config}, "model": {"hf_hub_token": SECRET}},
    )


def test_card_names_the_hub_base_its_license_and_only_hub_datasets(tmp_path):
    first = adapter_folder(tmp_path, "first", ["shop"])
    second = adapter_folder(tmp_path, "second", ["shop", "someone/hub-data"], warmup_ratio=0.1)
    card = model_card(export_info("bundled:smollm2-135m-instruct", [first, second], export_hub_model_id="me/bot"))
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["tags"] == ["finetune_kit", "lora", "dpo"]
    assert meta["datasets"] == ["someone/hub-data"]  # "shop" is a local name: listed in the body only
    assert "- **Datasets:** `shop`, `someone/hub-data`" in card
    assert "- **Adapters merged:** `first`, `second`" in card and "2 LoRA adapters merged" in card
    assert card.startswith("---\n") and "# me/bot" in card and 'model_id = "me/bot"' in card
    assert "| LoRA alpha | 32 |" in card and "| LoRA variant | DoRA |" in card and "| epochs | 3 |" in card
    assert "| warm-up ratio | 0.1 |" in card and "| mixed precision | bf16 |" in card
    assert "| train_loss | 0.1235 |" in card and "note" not in card
    assert SECRET not in card and "redacted" not in card and str(tmp_path) not in card


def test_metrics_given_in_memory_win_over_the_file(tmp_path):
    folder = adapter_folder(tmp_path, "lora", ["shop"])
    card = model_card(export_info("bundled:smollm2-135m-instruct", [folder]), metrics={"train_loss": 2.5})
    assert "| train_loss | 2.5 |" in card and "0.1235" not in card


def test_local_base_gives_its_license_but_its_card_is_not_copied(tmp_path):
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: acme\nlanguage: en\n---\n# Acme base model\n")
    meta = front_matter(card := model_card(export_info(str(base), [])))
    assert (meta["license"], meta["license_name"]) == ("other", "acme") and "language" not in meta
    assert "Acme base model" not in card and "- **Base model:** `my-base` (a local folder)" in card
    assert "lora" not in meta["tags"]


def test_a_hub_cache_snapshot_is_named_by_its_hub_id(tmp_path):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert front_matter(model_card(export_info(str(snapshot), [])))["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"


def test_a_hub_base_takes_its_license_from_the_cached_card(tmp_path):
    snapshot = tmp_path / "cache" / "models--acme--base-7b" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: llama3.1\n---\nAcme's own words\n")
    (tmp_path / "cache" / "models--acme--base-7b" / "refs").mkdir()
    (tmp_path / "cache" / "models--acme--base-7b" / "refs" / "main").write_text("a" * 40)
    info = export_info("acme/base-7b", [])
    info["config"]["model"]["cache_dir"] = str(tmp_path / "cache")
    meta = front_matter(card := model_card(info))
    assert (meta["base_model"], meta["license"]) == ("acme/base-7b", "llama3.1") and "Acme's own words" not in card
    info["config"]["model"]["cache_dir"] = str(tmp_path / "empty")  # not downloaded: no license is claimed
    assert "license" not in front_matter(model_card(info))


def test_unknown_provenance_still_gives_a_valid_card():
    card = model_card({})
    assert front_matter(card) == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["finetune_kit"],
    }
    assert "Training" not in card and "Chat template" not in card


# ----- a fake Hub on 127.0.0.1 -----------------------------------------------------------------------------


class FakeHub:
    """The Hub endpoints a folder upload uses; ``fail`` maps an endpoint name to the HTTP status to answer."""

    def __init__(self) -> None:
        self.url = ""
        self.repos: dict[str, dict[str, bytes]] = {}
        self.created: list[dict[str, Any]] = []
        self.validated: list[str] = []
        self.tokens: list[str | None] = []
        self.fail: dict[str, int] = {}
        self.app = FastAPI()
        self.app.middleware("http")(self._seen)
        self.app.post("/api/repos/create")(self.create)
        self.app.post("/api/validate-yaml")(self.validate_yaml)
        self.app.post("/api/models/{namespace}/{name}/preupload/{revision}")(self.preupload)
        self.app.post("/api/models/{namespace}/{name}/commit/{revision}")(self.commit)

    async def _seen(self, request: Request, call_next):
        self.tokens.append(request.headers.get("authorization"))
        return await call_next(request)

    def _refused(self, endpoint: str) -> JSONResponse | None:
        status = self.fail.get(endpoint)
        return JSONResponse({"error": f"{endpoint} refused by the fake Hub"}, status_code=status) if status else None

    async def create(self, request: Request):
        body = await request.json()
        if refused := self._refused("create"):
            return refused
        repo = f"{body['organization']}/{body['name']}"
        url = f"{self.url}/{repo}"
        if repo in self.repos:
            return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
        self.repos[repo] = {}
        self.created.append(body)
        return {"url": url}

    async def validate_yaml(self, request: Request):
        content = (await request.json())["content"]
        self.validated.append(content)
        meta = yaml.safe_load(content.split("---\n")[1])
        errors = [k for k in ("tags", "datasets") if k in meta and not all(isinstance(t, str) for t in meta[k])]
        errors += [
            k for k in ("base_model", "license", "library_name", "pipeline_tag") if not isinstance(meta.get(k, ""), str)
        ]
        return JSONResponse({"errors": [{"message": f"bad {e}"} for e in errors]}, status_code=400 if errors else 200)

    async def preupload(self, namespace: str, name: str, revision: str, request: Request):
        files = (await request.json())["files"]
        if refused := self._refused("preupload"):
            return refused
        if f"{namespace}/{name}" not in self.repos:
            return JSONResponse({"error": "Repository not found"}, status_code=404)
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    async def commit(self, namespace: str, name: str, revision: str, request: Request):
        lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
        if refused := self._refused("commit"):
            return refused
        assert request.headers["content-type"] == "application/x-ndjson" and lines[0]["key"] == "header"
        for line in lines[1:]:
            assert line["key"] == "file" and line["value"]["encoding"] == "base64", line["key"]
            self.repos[f"{namespace}/{name}"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = "0" * 40
        return {"commitUrl": f"{self.url}/{namespace}/{name}/commit/{oid}", "commitOid": oid}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def online(monkeypatch):
    """Network allowed (the test suite runs offline; these requests go to 127.0.0.1) and no token set."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(online):
    fake = FakeHub()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield fake
    server.should_exit = True
    thread.join(5)
    sock.close()


@pytest.mark.parametrize("xet", [True, False], ids=["hf_xet-pipeline", "single-commit"])
def test_push_uploads_every_file_of_an_export(export, hub, monkeypatch, xet):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)  # huggingface_hub takes another path without it
    folder = export[1].export_dir
    url = push_to_hub(folder, "me/shop-bot", token="hf_test", private=True, endpoint=hub.url)
    assert url == f"{hub.url}/me/shop-bot"
    assert hub.created == [{"name": "shop-bot", "organization": "me", "visibility": "private", "type": "model"}]
    local = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert hub.repos["me/shop-bot"] == local and MODEL_CARD in local
    assert set(hub.validated) == {local[MODEL_CARD].decode()}  # the card's metadata passed the Hub's check
    assert set(hub.tokens) == {"Bearer hf_test"}
    # again: the repository exists (409) and is reused
    assert push_to_hub(folder, "me/shop-bot", token="hf_test", endpoint=hub.url) == url and len(hub.created) == 1


def test_push_uses_the_logged_in_token(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_login")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    push_to_hub(tmp_path / "out", "me/m", token=None, endpoint=hub.url)
    assert hub.repos["me/m"] == {"config.json": b"{}"} and set(hub.tokens) == {"Bearer hf_from_login"}


def test_push_without_any_token_says_how_to_log_in(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ConfigError, match=r"me/m needs a token.*hf_hub_token.*hf auth login"):
        push_to_hub(tmp_path, "me/m", token=None, endpoint=hub.url)
    assert hub.tokens == []


def test_push_offline_names_the_variable(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match=r"me/m: HF_HUB_OFFLINE=1 is set.*Fix: unset HF_HUB_OFFLINE"):
        push_to_hub(tmp_path, "me/m", token="hf_test", endpoint=hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # set when huggingface_hub was imported, unset since
    with pytest.raises(HubError, match=r"me/m: HF_HUB_OFFLINE was set at start-up"):
        push_to_hub(tmp_path, "me/m", token="hf_test", endpoint=hub.url)
    assert hub.tokens == []


@pytest.mark.parametrize(("endpoint", "status", "fix"), [("create", 403, "write access"), ("commit", 401, "valid")])
def test_http_errors_name_the_repository_and_the_status(hub, tmp_path, endpoint, status, fix):
    (tmp_path / "a.txt").write_text("a")
    hub.fail[endpoint] = status
    with pytest.raises(HubError, match=rf"me/m at {re.escape(hub.url)} failed with HTTP {status} .*{fix}") as err:
        push_to_hub(tmp_path, "me/m", token="hf_test", endpoint=hub.url)
    assert f"{endpoint} refused by the fake Hub" in str(err.value)
    assert isinstance(err.value, ExportError) and isinstance(err.value, ConnectionError)
    assert "hf_test" not in str(err.value)


def test_unreachable_endpoint_is_a_hub_error(online, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HubError, match=rf"cannot reach the Hub repository me/m at {re.escape(endpoint)}"):
        push_to_hub(tmp_path, "me/m", token="hf_test", endpoint=endpoint)


def test_bad_inputs_fail_before_any_request(tmp_path):
    with pytest.raises(ConfigError, match=r"export_hub_model_id: got 'me//m'"):
        push_to_hub(tmp_path, "me//m", token="hf_test")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        push_to_hub(tmp_path / "missing", "me/m", token="hf_test")
