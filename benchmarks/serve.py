"""Serving throughput: output tokens/s of finetune_kit's Server at 1, 8 and 32 concurrent streams, against
serial Hugging Face ``generate`` on the same model, prompts and settings, in the same run.

Each contender answers the same greedy chat requests (``max_tokens`` fixed). The baseline calls
``model.generate`` (transformers' ``generate``, one request at a time: what a server without
batching does). The server runs on loopback; ``c`` client threads keep ``c`` streaming
``/v1/chat/completions`` requests in flight from a separate process; tokens/s counts the completion tokens the server
reports, over the wall time from the first request to the last reply. The script also checks that
the served greedy answers equal the serial ones.

Models: ``bundled`` (SmolLM2-135M-Instruct, the offline model; runs anywhere), and on a GPU the
random-weight ``qwen0.5b`` (Qwen2.5-0.5B shape) and ``llama8b`` (Llama-3-8B shape) in bf16,
built in memory from their configs with the bundled tokenizer (random weights never stop early,
so every request generates ``max_tokens`` tokens). Prints one JSON object; ``--out`` also writes it.

    python benchmarks/serve.py                                   # CPU: bundled model
    python benchmarks/serve.py --models qwen0.5b,llama8b --out benchmarks/results/serve-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from finetune_kit import ModelSource, ServeConfig, Server
from finetune_kit.data.templates import get_template
from finetune_kit.models.generation import GREEDY
from finetune_kit.models.loaded import LoadedModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_methods as tm  # noqa: E402  (the shared random-model shapes and hardware helpers)

SHAPES = {"qwen0.5b": tm.QWEN25_05B, "llama8b": tm.LLAMA3_8B}
TOPICS = [
    "how to return a parcel",
    "the history of tea",
    "why the sky is blue",
    "training a small language model",
    "a weekend in Paris",
    "the rules of chess",
    "saving money every month",
    "how rainbows form",
    "learning to swim as an adult",
    "the life of honey bees",
    "how a bicycle gear works",
    "choosing a good laptop",
    "cooking rice without a cooker",
    "what a LoRA adapter is",
    "the planets of the solar system",
    "how to write a polite email",
]


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (note {i})."}]
        for i in range(n)
    ]


def load(name: str, device: str) -> Any:
    """The LoadedModel to serve: the bundled model, or a random-weight shape built in memory."""
    if name == "bundled":
        return ModelSource.bundled().load()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shape = SHAPES[name]
    tok_dir = tm.tokenizer_folder(None)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = tm.model_config(shape, tok)
    folder = Path(tempfile.mkdtemp(prefix=f"serve-{name}-"))
    cfg.save_pretrained(folder)  # the source folder: config and tokenizer only, the weights stay in memory
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    return LoadedModel(
        source=ModelSource.local(folder), model=model, tokenizer=tok, template=get_template(tm.TEMPLATE, tok)
    )


def serial(model: Any, convs: list[list[dict[str, str]]], max_tokens: int) -> dict:
    """One request at a time through transformers' generate."""
    gen = GREEDY.with_(max_new_tokens=max_tokens)
    model.generate(convs[:1], gen.with_(max_new_tokens=4))  # warm-up
    t0 = time.perf_counter()
    done = [model.generate([c], gen)[0] for c in convs]
    wall = time.perf_counter() - t0
    tokens = sum(c.completion_tokens for c in done)
    return {
        "requests": len(convs),
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "texts": [c.text for c in done],
    }


def served(model: Any, convs: list[list[dict[str, str]]], concurrency: int, max_tokens: int) -> dict:
    """One Server on loopback; ``concurrency`` client threads in a separate process keep requests in flight
    (clients in the server's own process would compete with it for the interpreter lock)."""
    config = ServeConfig(
        api_host="127.0.0.1", api_port=0, api_key=None, api_model_name=None, max_concurrent=32, api_verbose=False
    )
    with Server(model, config).start() as handle:
        runner = handle_runner(handle)
        job = {"url": handle.base_url, "convs": convs, "concurrency": concurrency, "max_tokens": max_tokens}
        proc = subprocess.run(
            [sys.executable, __file__, "--client"], input=json.dumps(job), capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the client process failed:\n{proc.stderr[-3000:]}")
        run = json.loads(proc.stdout)
    tokens, wall = run["completion_tokens"], run["wall_s"]
    return {
        "concurrency": concurrency,
        "requests": len(convs),
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "peak_batch": runner.peak_batch if runner is not None else None,
        "texts": run["texts"],
    }


def client(job: dict) -> dict:
    """The client side of :func:`served`: streaming chat requests, ``concurrency`` in flight at a time."""
    convs, max_tokens = job["convs"], job["max_tokens"]
    texts: dict[int, str] = {}
    tokens = [0]
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=job["concurrency"] + 1)
    with httpx.Client(base_url=job["url"], timeout=600, limits=limits) as http:

        def ask(i: int) -> None:
            body = {
                "model": "m",
                "messages": convs[i],
                "temperature": 0,
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            text, used = "", 0
            with http.stream("POST", "/chat/completions", json=body) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        used = chunk["usage"]["completion_tokens"]
                    for choice in chunk["choices"]:
                        text += choice["delta"].get("content") or ""
            with lock:
                texts[i] = text
                tokens[0] += used

        ask(0)  # warm-up (not timed)
        texts.clear()
        tokens[0] = 0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(job["concurrency"]) as pool:
            list(pool.map(ask, range(len(convs))))
        wall = time.perf_counter() - t0
    return {"completion_tokens": tokens[0], "wall_s": wall, "texts": [texts[i] for i in range(len(convs))]}


def handle_runner(handle: Any) -> Any:
    """The scheduler behind a running server (for its peak batch size), if it has one."""
    app = handle._server.config.app
    runner = getattr(getattr(app, "state", None), "runner", None)
    return getattr(runner, "_scheduler", None)


def bench_model(name: str, levels: list[int], max_tokens: int, device: str) -> dict:
    import torch

    model = load(name, device)
    out: dict[str, Any] = {"model": name, "device": str(model.device), "max_tokens": max_tokens}
    n_serial = 8 if name != "llama8b" else 6
    base = serial(model, prompts(n_serial), max_tokens)
    out["serial_hf_generate"] = {k: v for k, v in base.items() if k != "texts"}
    out["served"] = []
    for c in levels:
        n = max(n_serial, 2 * c)
        run = served(model, prompts(n), c, max_tokens)
        same = sum(a == b for a, b in zip(run["texts"][:n_serial], base["texts"], strict=True))
        run = {k: v for k, v in run.items() if k != "texts"}
        run["greedy_equal_to_serial"] = f"{same}/{n_serial}"
        run["speedup_vs_serial"] = round(run["tokens_per_s"] / base["tokens_per_s"], 2)
        out["served"].append(run)
        print(json.dumps({"model": name, **run}), file=sys.stderr, flush=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--models", default="bundled", help="comma-separated: bundled, qwen0.5b, llama8b")
    parser.add_argument("--concurrency", default="1,8,32", help="client streams in flight, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)  # the client process
    opts = parser.parse_args(argv)
    if opts.client:
        print(json.dumps(client(json.loads(sys.stdin.read()))))
        return 0
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    levels = [int(c) for c in opts.concurrency.split(",")]
    report: dict[str, Any] = {
        "benchmark": "serve",
        "when": tm.now_iso(),
        "hardware": tm.hardware(),
        "versions": tm.versions(),
        "settings": {"concurrency": levels, "max_tokens": opts.max_tokens, "decoding": "greedy", "max_concurrent": 32},
        "results": [],
    }
    for name in [m.strip() for m in opts.models.split(",") if m.strip()]:
        report["results"].append(bench_model(name, levels, opts.max_tokens, device))
        tm.write_report(report, opts.out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
