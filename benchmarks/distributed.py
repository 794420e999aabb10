# ruff: noqa: PLC0415  (torch and finetune_kit load inside the functions)
"""Several GPUs: DDP scaling and loss agreement, DeepSpeed ZeRO-3 LoRA and full fine-tuning, and the Python path.

Every run is the user's own command, ``finetune-kit train run.yaml key=value ...``, started with a
``CUDA_VISIBLE_DEVICES`` that shows it 1, 2 or 4 GPUs: with more than one it launches itself
through torchrun (nothing here launches it). The YAML is LLaMA-Factory's LoRA-SFT shape: LoRA
r 8 / alpha 16 on every linear layer, bf16, the data written by ``benchmarks/train_methods.py``
(alpaca rows, encoded mean ~350 tokens, p95 ~950, cutoff 1024), ``gradient_checkpointing: auto``.
Each comparison keeps the global batch fixed: per-device batch x GPUs x accumulation.

Read back from each run's ``output_dir``: the per-step losses (``trainer_log.jsonl``), the
throughput after the first ``--warmup`` steps (its cumulative ``train_runtime`` and
``num_input_tokens_seen``, gathered over all processes), and ``peak_gpu_memory_gib`` from
``train_results.json`` (``torch.cuda.max_memory_allocated`` over load and training, the most of
any GPU). The Python-path run starts ``LoraTrainer`` in a plain script under ``accelerate launch``
and records, per rank, how much memory it allocated on every GPU (rank 1 must leave GPU 0 alone).

    python benchmarks/distributed.py --phase prep                     # random-weight models + data
    python benchmarks/distributed.py --phase ddp --out ddp.json        # 1/2/4 GPUs, 0.5B and 8B shapes
    python benchmarks/distributed.py --phase zero3 --out zero3.json    # ZeRO-3 LoRA and full on 2 GPUs
    HF_HUB_OFFLINE=1 python benchmarks/distributed.py --smoke --phase all --out /tmp/d.json   # CPU, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_methods as tm  # the shared random-model, data and hardware helpers

REPO = tm.REPO


@dataclass(frozen=True)
class Run:
    name: str
    shape: str  # "0.5b" | "8b"
    gpus: int
    per_device: int
    accumulation: int
    steps: int
    finetuning: str = "lora"
    deepspeed: str | None = None
    lr: float = 1e-4
    python_path: bool = False

    @property
    def global_batch(self) -> int:
        return self.per_device * self.gpus * self.accumulation


def runs(phase: str, gpus: int, smoke: bool) -> list[Run]:
    s05, s8 = (6, 4) if smoke else (40, 16)
    ddp = [
        Run("ddp_0_5b_1gpu", "0.5b", 1, 4, 4, s05),
        Run("ddp_0_5b_2gpu", "0.5b", 2, 4, 2, s05),
        Run("ddp_0_5b_4gpu", "0.5b", 4, 4, 1, s05),
        Run("ddp_8b_1gpu", "8b", 1, 2, 4, s8),
        Run("ddp_8b_2gpu", "8b", 2, 2, 2, s8),
        Run("ddp_8b_4gpu", "8b", 4, 2, 1, s8),
        Run("python_0_5b_2gpu", "0.5b", 2, 4, 2, s05, python_path=True),
    ]
    zero3 = [
        Run("zero3_lora_8b_2gpu", "8b", 2, 2, 2, s8, deepspeed="ds_z3"),
        Run("zero3_full_8b_2gpu", "8b", 2, 2, 2, 4 if smoke else 8, finetuning="full", deepspeed="ds_z3", lr=1e-5),
        Run("zero3_full_8b_4gpu", "8b", 4, 2, 1, 4 if smoke else 8, finetuning="full", deepspeed="ds_z3", lr=1e-5),
    ]
    chosen = {"ddp": ddp, "zero3": zero3, "all": ddp + zero3, "prep": []}[phase]
    if smoke:  # CPU: gloo processes, no DeepSpeed
        chosen = [r for r in chosen if r.deepspeed is None]
    return [r for r in chosen if r.gpus <= gpus]


def yaml_text(run: Run, model: Path, data: Path, out: Path, cutoff: int, smoke: bool) -> str:
    lines = {
        "model_name_or_path": model,
        "template": tm.TEMPLATE,
        "stage": "sft",
        "do_train": "true",
        "finetuning_type": run.finetuning,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0,
        "lora_target": "all",
        "dataset": tm.SFT_DATASET,
        "dataset_dir": data,
        "cutoff_len": cutoff,
        "preprocessing_num_workers": 4,
        "output_dir": out,
        "overwrite_output_dir": "true",
        "logging_steps": 1,
        "save_strategy": '"no"',  # a full-FT 8B checkpoint with ZeRO optimizer states is ~130 GB
        "per_device_train_batch_size": run.per_device,
        "gradient_accumulation_steps": run.accumulation,
        "learning_rate": run.lr,
        "max_steps": run.steps,
        "lr_scheduler_type": "constant",
        "bf16": "false" if smoke else "true",
        "report_to": "none",
        "seed": 0,
        "disable_tqdm": "true",
    }
    if run.deepspeed:
        lines["deepspeed"] = run.deepspeed
    return "".join(f"{k}: {v}\n" for k, v in lines.items())


def read_run(out: Path, run: Run, warmup: int) -> dict:
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    steps = [e for e in log if "loss" in e and "train_runtime" in e]
    losses = [round(e["loss"], 5) for e in steps]
    result: dict[str, Any] = {"losses": losses}
    if len(steps) > warmup + 1:
        a, b = steps[warmup], steps[-1]
        seconds = b["train_runtime"] - a["train_runtime"]
        n = b["current_steps"] - a["current_steps"]
        result["examples_per_s"] = round(n * run.global_batch / seconds, 2)
        result["tokens_per_s"] = round((b["num_input_tokens_seen"] - a["num_input_tokens_seen"]) / seconds, 1)
        result["seconds_per_step"] = round(seconds / n, 3)
    metrics = json.loads((out / "train_results.json").read_text())
    result["peak_gpu_memory_gib"] = metrics.get("peak_gpu_memory_gib")
    record = json.loads((out / "finetune_kit_config.json").read_text())
    result["gradient_checkpointing"] = record.get("config", {}).get("training", {}).get("gradient_checkpointing")
    return result


def execute(run: Run, work: Path, model: Path, data: Path, cutoff: int, warmup: int, smoke: bool) -> dict:
    out = work / "runs" / run.name
    yaml = work / "runs" / f"{run.name}.yaml"
    yaml.parent.mkdir(parents=True, exist_ok=True)
    yaml.write_text(yaml_text(run, model, data, out, cutoff, smoke))
    env = dict(os.environ)
    if smoke:
        env.update(FORCE_TORCHRUN="1" if run.gpus > 1 else "0", NPROC_PER_NODE=str(run.gpus))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(run.gpus))
    if run.python_path:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(run.gpus)]
        launcher += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd = [*launcher, __file__, "--python-worker", str(yaml)]
    else:
        cmd = [sys.executable, "-m", "finetune_kit.cli.main", "train", str(yaml)]
    plan_cmd = [sys.executable, "-m", "finetune_kit.cli.main", "train", str(yaml), "--plan"]
    plan = subprocess.run(plan_cmd, env=env, capture_output=True, text=True)
    t0 = time.perf_counter()
    with (work / "runs" / f"{run.name}.log").open("w") as log:  # a hung run leaves its output here
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    report: dict[str, Any] = {"settings": run.__dict__ | {"global_batch": run.global_batch}, "wall_s": round(wall, 1)}
    report["plan"] = plan.stdout.strip().splitlines() or (plan.stderr.strip().splitlines()[-3:])
    if proc.returncode != 0:
        report["error"] = (work / "runs" / f"{run.name}.log").read_text()[-3000:]
        return report
    report.update(read_run(out, run, warmup))
    placement = out / "placement.json"
    if placement.is_file():
        report["placement"] = json.loads(placement.read_text())
    return report


def python_worker(yaml: Path) -> None:
    """Rank's side of the Python-path run: a plain script with LoraTrainer, started by ``accelerate launch``."""
    import torch

    from finetune_kit import DatasetRegistry, LoraTrainer, ModelSource

    cfg = dict(line.split(": ", 1) for line in yaml.read_text().splitlines())
    source = ModelSource.local(cfg["model_name_or_path"]).with_config(template=cfg["template"])
    trainer = (
        LoraTrainer(source)
        .with_lora(lora_rank=8, lora_alpha=16, lora_dropout=0.0, lora_target="all")
        .with_data(cutoff_len=int(cfg["cutoff_len"]))
        .with_training(
            output_dir=cfg["output_dir"],
            overwrite_output_dir=True,
            per_device_train_batch_size=int(cfg["per_device_train_batch_size"]),
            gradient_accumulation_steps=int(cfg["gradient_accumulation_steps"]),
            learning_rate=float(cfg["learning_rate"]),
            max_steps=int(cfg["max_steps"]),
            logging_steps=1,
            save_steps=100000,
            lr_scheduler_type="constant",
            bf16=cfg["bf16"] == "true",
            seed=0,
            disable_tqdm=True,
        )
    )
    data = DatasetRegistry.from_dir(cfg["dataset_dir"]).load(cfg["dataset"])
    trainer.train(data)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    mine = [
        torch.cuda.max_memory_allocated(d) / 2**30 if torch.cuda.is_available() else 0.0
        for d in range(torch.cuda.device_count())
    ]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(
        gathered,
        {
            "rank": rank,
            "device": torch.cuda.current_device() if torch.cuda.is_available() else "cpu",
            "peak_gib_per_gpu": [round(m, 2) for m in mine],
        },
    )
    if rank == 0:
        Path(cfg["output_dir"], "placement.json").write_text(json.dumps(gathered))


def agreement(results: dict) -> dict:
    """Per comparison: the largest per-step loss difference to the 1-GPU run, and the speed-up."""
    out = {}
    pairs = [
        ("ddp_0_5b_2gpu", "ddp_0_5b_1gpu"),
        ("ddp_0_5b_4gpu", "ddp_0_5b_1gpu"),
        ("python_0_5b_2gpu", "ddp_0_5b_1gpu"),
        ("ddp_8b_2gpu", "ddp_8b_1gpu"),
        ("ddp_8b_4gpu", "ddp_8b_1gpu"),
        ("zero3_lora_8b_2gpu", "ddp_8b_2gpu"),
    ]
    for a, b in pairs:
        ra, rb = results.get(a, {}), results.get(b, {})
        if not ra.get("losses") or not rb.get("losses"):
            continue
        diffs = [abs(x - y) for x, y in zip(ra["losses"], rb["losses"], strict=False)]
        entry = {"max_abs_loss_diff": round(max(diffs), 5), "mean_abs_loss_diff": round(statistics.mean(diffs), 5)}
        if ra.get("examples_per_s") and rb.get("examples_per_s"):
            entry["speedup"] = round(ra["examples_per_s"] / rb["examples_per_s"], 3)
        out[f"{a} vs {b}"] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("prep", "ddp", "zero3", "all"), default="all")
    p.add_argument("--work", default="/tmp/ftk-dist")
    p.add_argument("--out")
    p.add_argument("--only", help="comma-separated run names")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (gloo processes)")
    p.add_argument("--tokenizer")
    p.add_argument("--python-worker", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.python_worker:
        python_worker(Path(opts.python_worker))
        return 0
    import torch

    work = Path(opts.work)
    shapes = {"0.5b": tm.QWEN25_05B, "8b": tm.LLAMA3_8B}
    if opts.smoke:
        shapes = {k: tm.smoke_shape(v) for k, v in shapes.items()}
    cutoff = 128 if opts.smoke else 1024
    tokenizer = tm.tokenizer_folder(opts.tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {k: work / "models" / v.name for k, v in shapes.items()}  # shared with benchmarks/vram_plan.py
    report: dict[str, Any] = {
        "benchmark": "distributed",
        "hardware": tm.hardware(),
        "versions": tm.versions(),
        "started": tm.now_iso(),
        "runs": {},
    }
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 2
    chosen = runs(opts.phase, gpus, opts.smoke)
    if opts.only:
        chosen = [r for r in chosen if r.name in opts.only.split(",")]
    needed = {r.shape for r in chosen} if opts.phase != "prep" else set(shapes)
    for key in sorted(needed):
        report.setdefault("models", {})[key] = tm.build_model(shapes[key], models[key], tokenizer, device)
    data = work / "dist-data"
    if not (data / "dataset_info.json").is_file():
        from transformers import AutoTokenizer

        sentences = tm.demo_sentences(AutoTokenizer.from_pretrained(tokenizer))
        scale = 0.1 if opts.smoke else 1.0
        tm.write_data(data, tm.make_sft_rows(sentences, opts.rows, scale=scale, seed=0), [])
    for run in chosen:
        print(f"== {run.name}", file=sys.stderr, flush=True)
        result = execute(run, work, models[run.shape], data, cutoff, opts.warmup, opts.smoke)
        report["runs"][run.name] = result
        print(
            json.dumps({run.name: {k: v for k, v in result.items() if k not in ("plan", "losses")}}),
            file=sys.stderr,
            flush=True,
        )
        report["agreement"] = agreement(report["runs"])
        tm.write_report(report, opts.out)
    report["finished"] = tm.now_iso()
    tm.write_report(report, opts.out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
