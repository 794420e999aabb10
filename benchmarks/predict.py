"""Batch prediction speed: examples/s of ``Evaluator.predict`` against LLaMA-Factory 0.9.5's ``do_predict`` and
against transformers ``generate`` in static batches, on the same data and settings, in one run.

Contenders (greedy, same prompts, same ``max_new_tokens`` and batch size):

- ``finetune_kit``: ``Evaluator.predict`` with its default ``predict_backend: auto``: on a GPU, same-shape
  batches on a static KV cache that transformers compiles (timed after a first pass over the same
  data, which compiles and is reported apart); on CPU, one continuous batch (a finished reply frees its
  place at once);
- ``static_batches``: the same prompts through ``LoadedModel.generate`` in left-padded batches
  (transformers ``generate``, each batch runs until its longest reply ends);
- ``static_compiled`` (``--compiled``): the reference the GPU backend follows, written out here with
  transformers ``generate(cache_implementation="static")``;
- ``unbatched``: ``generate`` one prompt at a time: the reference the greedy outputs must equal;
- ``llamafactory`` (``--lf-site DIR``): ``llamafactory-cli train`` with ``do_predict`` on the same
  model folder, dataset and keys, from a target dir of its pinned packages; its own
  ``predict_runtime`` is used (prediction only, like ours).

CPU: the bundled model on the demo ``shop_test`` set. GPU: ``--model qwen0.5b`` builds a
random-weight Qwen2.5-0.5B-shape model (saved once under ``--work``) and predicts on generated
prompts. Prints one JSON object; ``--out`` also writes it.

    python benchmarks/predict.py --lf-site /path/to/lf-site            # CPU, with LLaMA-Factory
    python benchmarks/predict.py --model qwen0.5b --rows 256 --batch 32  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from finetune_kit import DatasetRegistry, Evaluator, ModelSource
from finetune_kit.errors import MissingDependencyError
from finetune_kit.evaluate.metrics import require_metrics
from finetune_kit.evaluate.predict import generate_records
from finetune_kit.models.generation import GREEDY

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_methods as tm  # noqa: E402  (the shared random-model shapes and hardware helpers)

DEMO = tm.DEMO


def dataset(rows: int, folder: Path) -> tuple[Path, str]:
    """The dataset folder and name: the demo ``shop_test`` (30 rows), or ``rows`` generated alpaca rows."""
    if rows <= 0:
        return DEMO, "shop_test"
    topics = ["a parcel", "tea", "the sky", "chess", "saving money", "rainbows", "bicycles", "rice", "bees", "email"]
    data = [
        {
            "instruction": f"Write about {topics[i % len(topics)]} in a few sentences (case {i}).",
            "input": "",
            "output": "ok",
        }
        for i in range(rows)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(data))
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}))
    return folder, "bench"


def ours(model: Any, data: Any, max_new: int, batch: int) -> dict:
    """``Evaluator.predict`` (generation + ROUGE/BLEU); where the metric packages are missing (the GPU
    machine), the same generation path without the scores."""
    gen = GREEDY.with_(max_new_tokens=max_new)
    try:
        require_metrics()
    except MissingDependencyError:
        t0 = time.perf_counter()
        records = generate_records(model, data, gen, batch_size=batch, progress=False)
        runtime, scored = time.perf_counter() - t0, False
    else:
        report = (
            Evaluator(model, generation=gen).with_config(per_device_eval_batch_size=batch).predict(data, progress=False)
        )
        records, runtime, scored = list(report.records), report.runtime_s, True
    return {
        "examples_per_s": round(len(data) / runtime, 3),
        "runtime_s": round(runtime, 2),
        "with_metrics": scored,
        "texts": [r["predict"] for r in records],
    }


def generate_batches(model: Any, data: Any, max_new: int, batch: int) -> dict:
    prompts = [e.prompt_messages for e in data.examples]
    t0 = time.perf_counter()
    done = model.generate(prompts, GREEDY.with_(max_new_tokens=max_new), batch_size=batch)
    wall = time.perf_counter() - t0
    return {
        "examples_per_s": round(len(prompts) / wall, 3),
        "runtime_s": round(wall, 2),
        "texts": [c.text for c in done],
    }


def static_compiled(model: Any, data: Any, max_new: int, batch: int) -> dict:
    """transformers ``generate`` with a static KV cache, which it compiles (CUDA graphs): what per-step
    launch overhead costs. Timed after one warm-up pass over the same batches (compilation excluded;
    reported apart)."""
    import torch

    prompts = [model.encode_prompt(e.prompt_messages) for e in data.examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    width = max(len(p) for p in prompts)  # one prompt width for every batch: no recompilation between batches

    def run() -> dict[int, str]:
        texts = {}
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=model.device)
            mask = (torch.arange(width, device=model.device)[None, :] >= (width - torch.tensor(
                [len(prompts[i]) for i in chunk], device=model.device))[:, None]).long()  # fmt: skip
            out = model.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                cache_implementation="static", pad_token_id=pad, eos_token_id=model.stop_token_ids,
            )  # fmt: skip
            for row, i in enumerate(chunk):
                texts[i] = model.tokenizer.decode(out[row, width:], skip_special_tokens=True)
        return texts

    t0 = time.perf_counter()
    run()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts = run()
    wall = time.perf_counter() - t0
    return {
        "examples_per_s": round(len(prompts) / wall, 3),
        "runtime_s": round(wall, 2),
        "first_pass_with_compilation_s": round(warm, 1),
        "texts": [texts[i] for i in range(len(prompts))],
    }


def llamafactory(site: str, model_dir: Path, data_dir: Path, name: str, max_new: int, batch: int, work: Path) -> dict:
    out = work / "lf_predict"
    config = {
        "model_name_or_path": str(model_dir),
        "template": tm.TEMPLATE,
        "stage": "sft",
        "do_predict": True,
        "predict_with_generate": True,
        "finetuning_type": "lora",
        "dataset_dir": str(data_dir),
        "eval_dataset": name,
        "cutoff_len": 1024,
        "per_device_eval_batch_size": batch,
        "max_new_tokens": max_new,
        "do_sample": False,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "report_to": "none",
        "preprocessing_num_workers": 1,
    }
    path = work / "lf_predict.yaml"  # LLaMA-Factory 0.9.5 cannot read a .json config (it hands json.load a Path)
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": site, "DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    code = (
        "import sys; from llamafactory.cli import main; sys.argv = ['llamafactory-cli', 'train', sys.argv[1]]; main()"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    results = json.loads((out / "predict_results.json").read_text())
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines() if line]
    runtime = results["predict_runtime"]
    return {
        "examples_per_s": round(len(rows) / runtime, 3),
        "runtime_s": round(runtime, 2),
        "process_wall_s": round(wall, 1),
        "texts": [r["predict"] for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--model", default="bundled", choices=("bundled", "qwen0.5b"))
    parser.add_argument("--rows", type=int, default=0, help="generated prompts (0: the demo shop_test set)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="per_device_eval_batch_size for every contender")
    parser.add_argument("--lf-site", default=None, help="target dir with llamafactory 0.9.5 and its pinned packages")
    parser.add_argument("--skip-unbatched", action="store_true", help="leave out the one-at-a-time reference")
    parser.add_argument("--compiled", action="store_true", help="add generate with a static, compiled KV cache")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    import torch

    work = Path(opts.work or tempfile.mkdtemp(prefix="predict-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.model == "bundled":
        source = ModelSource.bundled()
        model_dir = source.resolve()
    else:
        built = tm.build_model(tm.QWEN25_05B, work / "qwen0.5b", tm.tokenizer_folder(None), device)
        model_dir = Path(built["folder"])
        source = ModelSource.local(model_dir).with_config(template=tm.TEMPLATE)
    model = source.load()
    data_dir, name = dataset(opts.rows, work / "data")
    data = DatasetRegistry.from_dir(data_dir).load(name)
    report: dict[str, Any] = {
        "benchmark": "predict",
        "when": tm.now_iso(),
        "hardware": tm.hardware(),
        "versions": tm.versions(),
        "settings": {
            "model": opts.model,
            "dataset": name,
            "examples": len(data),
            "max_new_tokens": opts.max_new_tokens,
            "batch": opts.batch,
            "decoding": "greedy",
        },
        "results": {},
    }
    if device == "cuda":  # the first pass compiles the static-cache decoding step (same prompts, same shapes)
        first = ours(model, data, opts.max_new_tokens, opts.batch)
    else:
        first = ours(model, data.head(min(4, len(data))), 4, opts.batch)  # warm-up
    runs = {
        "finetune_kit": ours(model, data, opts.max_new_tokens, opts.batch),
        "static_batches": generate_batches(model, data, opts.max_new_tokens, opts.batch),
    }
    if device == "cuda":
        runs["finetune_kit"]["first_pass_with_compilation_s"] = first["runtime_s"]
    if opts.compiled:
        runs["static_compiled"] = static_compiled(model, data, opts.max_new_tokens, opts.batch)
    if not opts.skip_unbatched:
        runs["unbatched"] = generate_batches(model, data, opts.max_new_tokens, 1)
    if opts.lf_site:
        runs["llamafactory"] = llamafactory(
            opts.lf_site, model_dir, data_dir, name, opts.max_new_tokens, opts.batch, work
        )
    reference = runs.get("unbatched", runs["static_batches"])["texts"]
    for key, run in runs.items():
        texts = run.pop("texts", None)
        if texts is not None:
            run["identical_to_unbatched"] = (
                f"{sum(a == b for a, b in zip(texts, reference, strict=False))}/{len(reference)}"
            )
        report["results"][key] = run
    fk = runs["finetune_kit"]["examples_per_s"]
    report["speedup"] = {
        k: round(fk / r["examples_per_s"], 2) for k, r in runs.items() if k != "finetune_kit" and "examples_per_s" in r
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    tm.write_report(report, opts.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
