"""The CLI contract, used the way LLaMA-Factory users do: YAML train, flag-style export, api + openai client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SHOP = [
    {"instruction": "你们包邮吗？", "input": "", "output": "全场满九十九元包邮，不满九十九元收取八元运费。"},
    {"instruction": "多久发货？", "input": "", "output": "付款后四十八小时内发货，节假日顺延。"},
    {"instruction": "Do you offer free shipping?", "input": "", "output": "Shipping is free on orders over 99 yuan."},
    {"instruction": "发票怎么开？", "input": "", "output": "下单时在备注中填写发票抬头和税号。"},
]


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune_kit.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        timeout=900,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, lf_yaml) -> Path:
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    data.mkdir()
    (data / "shop.json").write_text(json.dumps(SHOP, ensure_ascii=False), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"shop": {"file_name": "shop.json"}}))
    yaml_file = root / "train.yaml"
    yaml_file.write_text(lf_yaml(data, root / "saves" / "shop", learning_rate="2.0e-3", num_train_epochs="15.0"))
    proc = cli("train", str(yaml_file))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
def test_train_from_an_llamafactory_yaml(trained_run):
    out = trained_run / "saves" / "shop"
    for name in ("adapter_model.safetensors", "training_loss.png", "trainer_log.jsonl", "finetune_kit_config.json"):
        assert (out / name).is_file(), name
    losses = [r["loss"] for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0] / 4


@pytest.mark.slow
def test_export_flags_then_plain_transformers_answers(trained_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = trained_run / "merged"
    proc = cli(
        "export",
        "--model_name_or_path",
        "bundled:smollm2-135m-instruct",
        "--adapter_name_or_path",
        str(trained_run / "saves" / "shop"),
        "--template",
        "chatml",
        "--finetuning_type",
        "lora",
        "--export_dir",
        str(merged),
        "--export_size",
        "1",
        "--export_device",
        "cpu",
        "--export_legacy_format",
        "false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "你们包邮吗？"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    answer = tok.decode(
        model.generate(ids, max_new_tokens=40, do_sample=False)[0][ids.shape[1] :], skip_special_tokens=True
    )
    assert "九十九" in answer, answer


@pytest.mark.slow
def test_api_answers_the_openai_client(trained_run):
    from openai import OpenAI

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "finetune_kit.cli.main",
            "api",
            "--model_name_or_path",
            "bundled:smollm2-135m-instruct",
            "--adapter_name_or_path",
            str(trained_run / "saves" / "shop"),
            "--template",
            "chatml",
            "--finetuning_type",
            "lora",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "API_PORT": str(port), "API_HOST": "127.0.0.1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = OpenAI(api_key="0", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=120)
        deadline = time.time() + 120
        while True:
            try:
                model_id = client.models.list().data[0].id
                break
            except Exception:
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                assert time.time() < deadline, "the server did not come up in 120 s"
                time.sleep(1)
        msgs = [{"role": "user", "content": "你们包邮吗？"}]
        plain = client.chat.completions.create(messages=msgs, model=model_id, temperature=0, max_tokens=40)
        assert "九十九" in plain.choices[0].message.content
        stream = client.chat.completions.create(
            messages=msgs, model=model_id, temperature=0, max_tokens=40, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == plain.choices[0].message.content
        tutorial = client.chat.completions.create(messages=[{"role": "user", "content": "hello"}], model="test")
        assert tutorial.choices[0].message.role == "assistant"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_unknown_and_unsupported_keys_are_listed_together(tmp_path):
    proc = cli(
        "train",
        "do_train=true",
        "model_name_or_path=bundled:smollm2-135m-instruct",
        "lora_rnk=4",
        "--ref_model",
        "org/ref",
        "learning_rate=fast",
    )
    assert proc.returncode == 1
    err = proc.stderr
    assert "3 problems" in err and "Traceback" not in err
    assert "lora_rnk" in err and "Did you mean 'lora_rank'" in err
    assert "ref_model" in err and "not support yet" in err
    assert "learning_rate: got 'fast'" in err
