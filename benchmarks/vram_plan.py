# ruff: noqa: PLC0415  (torch, transformers and finetune_kit load inside the functions, after the CLI has set the env)
"""GPU memory planner vs. reality: measured peak GPU memory of our trainer next to ``plan_memory``'s estimate.

What it measures: for each configuration (Qwen2.5-0.5B and Llama-3-8B shapes; LoRA, QLoRA, freeze,
full; with and without gradient checkpointing), ``torch.cuda.max_memory_allocated()`` over model
loading + a few optimizer steps of ``LoraTrainer.train()``, and ``plan_memory(shape, inputs)`` for the
same settings (``MemoryPlan.allocated``, the figure comparable to ``max_memory_allocated``). The
error is ``(planned - measured) / measured`` in percent; a configuration that runs out of memory
records ``"oom"`` with the plan's number.

How: the models have random weights, built once per shape from its config directly on a GPU in bf16
and saved under ``--work`` (reused when present; ``benchmarks/train_methods.py``'s ``build_model``),
with the bundled SmolLM2 tokenizer. The data are alpaca rows (demo sentences) long enough that every
row is cut to exactly ``cutoff_len`` tokens, so the padded length equals the planner's ``seq_len``
(the encoded lengths are recorded to show it). Each configuration runs in its own subprocess
(``--one NAME``) so every peak starts clean; ``--gpus 0,1,2,3`` runs them in parallel, one per GPU
(``CUDA_VISIBLE_DEVICES`` per subprocess). Training: LoRA r 8 / alpha 16 on every linear layer,
bf16, AdamW, ``max_steps`` 4, no checkpoint saving.

    python benchmarks/vram_plan.py --gpus 0,1,2,3 --out vram_plan.json          # GPU, ~10 minutes on 4 H100s
    python benchmarks/vram_plan.py --only 0.5b_lora_bs16_s1024,8b_lora_bs2_s1024
    HF_HUB_OFFLINE=1 python benchmarks/vram_plan.py --smoke --out /tmp/vram_smoke.json   # tiny shapes, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import shutil
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import train_methods as tm  # noqa: E402  (its helpers: shapes, build_model, demo sentences, run_training)

DATASET = "vram_rows"
MARK = "VRAM_RESULT "


@dataclass(frozen=True)
class Config:
    """One measured run: a shape (``0_5b`` or ``8b``), a method and the batch that decide memory."""

    name: str
    shape: str
    method: str  # lora | qlora | full | freeze
    batch: int
    seq: int
    gradient_checkpointing: bool
    freeze_trainable_layers: int = 2


CONFIGS = (
    Config("0.5b_lora_bs16_s1024", "0_5b", "lora", 16, 1024, False),
    Config("0.5b_lora_bs16_s1024_gc", "0_5b", "lora", 16, 1024, True),
    Config("0.5b_lora_bs4_s512", "0_5b", "lora", 4, 512, False),
    Config("0.5b_full_bs4_s512", "0_5b", "full", 4, 512, False),
    Config("0.5b_freeze2_bs8_s1024", "0_5b", "freeze", 8, 1024, False),
    Config("0.5b_qlora_bs8_s1024", "0_5b", "qlora", 8, 1024, False),
    Config("8b_lora_bs4_s2048_gc", "8b", "lora", 4, 2048, True),
    Config("8b_lora_bs2_s1024", "8b", "lora", 2, 1024, False),
    Config("8b_lora_bs1_s2048", "8b", "lora", 1, 2048, False),
    Config("8b_qlora_bs4_s1024_gc", "8b", "qlora", 4, 1024, True),
    Config("8b_lora_bs4_s1024_gc", "8b", "lora", 4, 1024, True),
    Config("8b_lora_bs4_s2048", "8b", "lora", 4, 2048, False),  # ~91 GiB: "oom" on an 80 GB GPU
)
SMOKE = (
    Config("smoke_0.5b_lora_bs2_s128", "0_5b", "lora", 2, 128, False),
    Config("smoke_8b_full_bs2_s128_gc", "8b", "full", 2, 128, True),
)


def shapes(smoke: bool) -> dict[str, tm.Shape]:
    big, small = tm.LLAMA3_8B, tm.QWEN25_05B
    if smoke:
        big, small = tm.smoke_shape(big), tm.smoke_shape(small)
    return {"8b": big, "0_5b": small}


def model_dir(work: Path, shape: tm.Shape) -> Path:
    return work / "models" / shape.name


# ----- the planner's side (no GPU) ---------------------------------------------------------------------------
def memory_inputs(c: Config, *, bf16: bool) -> Any:
    from finetune_kit.train.vram import MemoryInputs

    return MemoryInputs(
        method=c.method,  # type: ignore[arg-type]
        lora_rank=8,
        freeze_trainable_layers=c.freeze_trainable_layers,
        quantization_bit=4,
        dtype="bfloat16" if bf16 else "float32",
        micro_batch=c.batch,
        seq_len=c.seq,
        gradient_checkpointing=c.gradient_checkpointing,
    )


def planned(c: Config, folder: Path, *, bf16: bool) -> dict[str, Any]:
    """``plan_memory`` for ``c``, from the saved ``config.json`` only."""
    from finetune_kit.train.vram import ModelShape, plan_memory

    shape = ModelShape.from_config(json.loads((folder / "config.json").read_text()))
    plan = plan_memory(shape, memory_inputs(c, bf16=bf16))
    return {"parameters": shape.parameters, **plan.to_dict()}


# ----- one configuration, in its own process ------------------------------------------------------------------
def run_one(c: Config, work: Path, steps: int, smoke: bool) -> dict[str, Any]:
    """Train ``c`` for ``steps`` optimizer steps and report its peak GPU memory."""
    import torch
    import transformers

    from finetune_kit import DatasetRegistry, LoraTrainer, ModelSource

    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {"name": c.name, "settings": asdict(c), "torch": torch.__version__}
    out["transformers"] = transformers.__version__
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out.update(device=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 2))
    folder = model_dir(work, shapes(smoke)[c.shape])
    source = ModelSource.local(folder).with_config(template=tm.TEMPLATE)
    if not cuda:
        source = source.with_config(device="cpu")
    runs = work / "runs" / c.name
    trainer = (
        LoraTrainer(source)
        .with_data(cutoff_len=c.seq)
        .with_training(
            output_dir=str(runs),
            learning_rate=1e-5 if c.method in ("full", "freeze") else 1e-4,
            max_steps=steps,
            per_device_train_batch_size=c.batch,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_steps=10**6,
            bf16=cuda,
            gradient_checkpointing=c.gradient_checkpointing,
            disable_tqdm=True,
            report_to=("none",),
            overwrite_output_dir=True,
            seed=0,
        )
    )
    if c.method in ("lora", "qlora"):
        trainer = trainer.with_lora(lora_rank=8, lora_alpha=16)
    if c.method == "qlora":
        trainer = trainer.with_quantization(quantization_bit=4)
    elif c.method == "full":
        trainer = trainer.with_full()
    elif c.method == "freeze":
        trainer = trainer.with_freeze(freeze_trainable_layers=c.freeze_trainable_layers)
    rows = DatasetRegistry.from_dir(work / "data").load(DATASET, max_samples=c.batch * steps)
    tokens = trainer.tokenize(rows)
    lengths = [len(ids) for ids in tokens.dataset["input_ids"]]
    out["encoded_lengths"] = {"min": min(lengths), "max": max(lengths), "rows": len(lengths)}
    if min(lengths) != c.seq or max(lengths) != c.seq:
        out["note"] = f"rows are not all exactly {c.seq} tokens: the padded length is the batch's longest"
    try:
        report = tm.run_training(trainer, tokens, batch=c.batch, warmup=1, out=runs)
    except Exception as exc:
        if not _is_oom(exc):
            raise
        out.update(status="oom", error=str(exc)[:500])
        if cuda:
            out["peak_allocated_at_oom_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return out
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    keep = ("peak_allocated_gib", "peak_reserved_gib", "weights_allocated_gib", "trainable_params")
    out.update(status="ok", **{k: report.get(k) for k in keep})
    out.update(param_gib_by_dtype=report.get("param_gib_by_dtype"), losses=report.get("losses"))
    out["step_s_median"] = report.get("step_s_median")
    return out


def _is_oom(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


# ----- preparation: data and models --------------------------------------------------------------------------
def write_rows(work: Path, tok_dir: Path, configs: list[Config], seed: int = 0) -> Path:
    """Alpaca rows whose prompt and reply are each ~60% of the longest ``seq``: every row is cut to
    exactly ``cutoff_len`` tokens (LLaMA-Factory's split keeps prompt + reply = cutoff when they exceed it)."""
    from transformers import AutoTokenizer

    sentences = tm.demo_sentences(AutoTokenizer.from_pretrained(tok_dir))
    longest = max(c.seq for c in configs)
    n = max(c.batch for c in configs) * 8
    rng = random.Random(seed)
    each = int(0.6 * longest) + 32
    rows = [
        {"instruction": tm.text_of(rng, sentences, each), "input": "", "output": tm.text_of(rng, sentences, each)}
        for _ in range(n)
    ]
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{DATASET}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({DATASET: {"file_name": f"{DATASET}.json"}}, indent=2))
    return folder


def build(shape_key: str, work: Path, smoke: bool) -> dict[str, Any]:
    import torch

    shape = shapes(smoke)[shape_key]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return tm.build_model(shape, model_dir(work, shape), tm.tokenizer_folder(None), device)


# ----- the parent: schedule subprocesses over GPUs ----------------------------------------------------------------
def child(args: list[str], gpu: str | None, log: Path, timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run this script with ``args`` on ``gpu`` (None: CPU); its result line and the log's tail."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu if gpu is not None else ""}
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    with log.open("w") as f:
        try:
            done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True, timeout=timeout)
            stdout, code = done.stdout, done.returncode
        except subprocess.TimeoutExpired as exc:
            raw = exc.stdout or ""
            stdout, code = raw.decode(errors="replace") if isinstance(raw, bytes) else raw, -9
    tail = log.read_text(errors="replace")[-3000:]
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :]), tail
    return None, f"exit code {code}\n{tail}"


def in_parallel(jobs: list[tuple[str, list[str]]], gpus: list[str | None], work: Path, timeout: float) -> dict:
    """Run ``(name, args)`` jobs, one at a time per GPU, all GPUs at once; results by name."""
    todo: queue.Queue[tuple[str, list[str]]] = queue.Queue()
    for job in jobs:
        todo.put(job)
    results: dict[str, Any] = {}

    def worker(gpu: str | None) -> None:
        while True:
            try:
                name, args = todo.get_nowait()
            except queue.Empty:
                return
            t = time.perf_counter()
            print(
                f"[vram_plan] {name} on {'GPU ' + gpu if gpu is not None else 'CPU'} ...", file=sys.stderr, flush=True
            )
            result, tail = child(args, gpu, work / "logs" / f"{name}.log", timeout)
            results[name] = result or {"name": name, "status": "error", "log_tail": tail}
            results[name]["wall_s"] = round(time.perf_counter() - t, 1)
            status = results[name].get("status", "built")
            print(f"[vram_plan] {name}: {status} in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=worker, args=(g,)) for g in gpus]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def gpu_list(given: str | None, smoke: bool) -> list[str | None]:
    if smoke or given == "cpu":
        return [None]
    if given:
        return [g.strip() for g in given.split(",") if g.strip()]
    try:
        names = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        names = ""
    count = sum(1 for line in names.splitlines() if line.startswith("GPU "))
    return [str(i) for i in range(count)] or [None]


def hardware() -> dict[str, Any]:
    """The host, without starting CUDA in this process (the subprocesses report their GPU)."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    info["cpu_count"] = os.cpu_count()
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["nvidia_smi"] = smi.stdout.strip().splitlines() if smi.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--gpus", default=None, help="GPU indices to run on in parallel, e.g. 0,1,2,3 (default: all)")
    p.add_argument("--only", default=None, help="comma-separated configuration names (default: all)")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    p.add_argument("--work", default="/tmp/ftk-vram", help="models (reused), data, logs")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per configuration (default 4)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (hidden 64, 2 layers) on the CPU, 2 configs")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    p.add_argument("--build", default=None, help=argparse.SUPPRESS)  # internal: build one shape's model
    opts = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    work = Path(opts.work).expanduser()
    configs = {c.name: c for c in (SMOKE if opts.smoke else CONFIGS)}
    steps = opts.steps or (2 if opts.smoke else 4)
    if opts.build or opts.one:  # a subprocess: one line of JSON on stdout
        try:
            result = (
                build(opts.build, work, opts.smoke)
                if opts.build
                else run_one(configs[opts.one], work, steps, opts.smoke)
            )
        except Exception as exc:
            result = {"name": opts.one or opts.build, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
            result["traceback"] = traceback.format_exc()[-4000:]
        print(MARK + json.dumps(result), flush=True)
        return 0
    chosen = list(configs.values())
    if opts.only:
        names = [n.strip() for n in opts.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in configs]
        if unknown:
            p.error(f"--only: unknown {unknown}; choose from {', '.join(configs)}")
        chosen = [configs[n] for n in names]
    gpus = gpu_list(opts.gpus, opts.smoke)
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    write_rows(work, tm.tokenizer_folder(None), chosen)
    flags = ["--work", str(work), "--steps", str(steps)] + (["--smoke"] if opts.smoke else [])
    needed = sorted({c.shape for c in chosen})
    built = in_parallel([(f"build_{k}", ["--build", k, *flags]) for k in needed], gpus, work, opts.timeout)
    jobs = sorted(chosen, key=lambda c: (c.shape != "8b", -c.batch * c.seq))  # the long ones first
    measured = in_parallel([(c.name, ["--one", c.name, *flags]) for c in jobs], gpus, work, opts.timeout)
    bf16 = gpus != [None]
    results = []
    for c in chosen:
        r = {"name": c.name, "settings": asdict(c), **measured.get(c.name, {})}
        try:
            plan = planned(c, model_dir(work, shapes(opts.smoke)[c.shape]), bf16=bf16)
        except Exception as exc:  # e.g. the model could not be built
            plan = {"error": f"{type(exc).__name__}: {exc}"}
        r["planned"] = plan
        r["planned_gib"] = plan.get("allocated_gib")
        peak = r.get("peak_allocated_gib") if r.get("status") == "ok" else None
        r["measured_peak_gib"] = peak if peak is not None else ("oom" if r.get("status") == "oom" else None)
        r["error_pct"] = round(100 * (r["planned_gib"] - peak) / peak, 1) if peak and r["planned_gib"] else None
        results.append(r)
    errors = [abs(r["error_pct"]) for r in results if r["error_pct"] is not None]
    report = {
        "benchmark": "vram_plan",
        "started_at": started,
        "wall_s": round(time.perf_counter() - t0, 1),
        "hardware": {
            **hardware(),
            "gpus": sorted({r["device"] for r in results if r.get("device")}),
            "torch": next((r["torch"] for r in results if r.get("torch")), None),
            "transformers": next((r["transformers"] for r in results if r.get("transformers")), None),
        },
        "versions": tm.versions(),
        "settings": {
            "steps": steps,
            "gpus": gpus,
            "work": str(work),
            "smoke": opts.smoke,
            "lora": {"lora_rank": 8, "lora_alpha": 16, "lora_target": "all"},
            "precision": "bf16" if bf16 else "float32 (CPU)",
            "rows": "every row exactly seq tokens (prompt + reply cut to cutoff_len)",
            "measured": "torch.cuda.max_memory_allocated() over load + train, per subprocess",
            "planned": "finetune_kit.train.vram.plan_memory(...).allocated (overhead excluded)",
        },
        "models": built,
        "results": results,
        "summary": {
            "configs": len(results),
            "measured": len(errors),
            "oom": [r["name"] for r in results if r.get("status") == "oom"],
            "failed": [r["name"] for r in results if r.get("status") not in ("ok", "oom")],
            "mean_abs_error_pct": round(sum(errors) / len(errors), 1) if errors else None,
            "max_abs_error_pct": max(errors) if errors else None,
        },
    }
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if opts.out:
        Path(opts.out).write_text(text, encoding="utf-8")
    print(text)
    return 1 if report["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
