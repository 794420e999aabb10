# ruff: noqa: PLC0415  (torch, transformers and the tools load inside the functions: the LLaMA-Factory child has its own)
"""Training speed and memory side by side: plain transformers + PEFT, LLaMA-Factory 0.9.5 and finetune_kit.

One run, one workload after the other, each contender in its own process on the same data, the same
order (seed 42 samplers over the same encoded rows) and the same hyperparameters:

* ``peft``: a plain ``transformers.Trainer`` over a ``peft`` LoRA model (r 8, alpha 16, every linear
  layer but the head), rows padded per batch (``DataCollatorForSeq2Seq``), no gradient checkpointing;
  the rows are finetune_kit's encoding, which is LLaMA-Factory's token for token;
* ``lf`` / ``lf_packed``: ``llamafactory-cli train x.yaml`` (0.9.5, run from ``--lf-site``, a target
  folder of its wheels, with ``DISABLE_VERSION_CHECK=1``), its defaults / with ``packing`` and
  ``neat_packing`` (no attention across examples);
* ``fk`` / ``fk_packed``: ``finetune-kit train x.yaml`` on the **same** YAML files (on a GPU its
  defaults make the batches padding-free);
* ``fk_padded``: the plain YAML plus ``padding_free: false`` (padded batches, as LLaMA-Factory's);
* ``fk_packed_liger`` (GPU only): the packed YAML plus ``enable_liger_kernel: true``;
  ``fk_packed_liger_gc`` also ``gradient_checkpointing: true`` (LLaMA-Factory's memory regime);
  ``fk_packed_liger_gc28`` checkpoints only the first 28 decoder layers
  (``gradient_checkpointing_layers: 28``); ``fk_packed_liger_compile`` adds ``torch_compile: true``;
* an ``_unfused`` suffix on a finetune_kit contender runs its YAML with LoRA's low-rank product added
  as PEFT adds it (no ``addmm``), to measure that choice alone.

Workloads: random-weight models of real shapes built from their configs (Qwen2.5-0.5B: batch 16,
cutoff 1024; Llama-3-8B: batch 4, cutoff 2048), LoRA bf16, on generated alpaca rows written as a
real ``dataset_info.json`` folder — ``mixed`` (long-tailed lengths, mean ~352 tokens, p95 ~949) and
``fixed`` (every example ~95% of the cutoff). ``--cpu``: the bundled SmolLM2-135M, cutoff 256,
batch 4, a few steps, float32 (about a minute per contender on two cores).

How it measures, the same in every process: a probe wraps ``transformers.Trainer`` (``__init__``
adds a callback, ``training_step`` counts the batch's real tokens on the device, no sync). Real
tokens are the non-padding ones (attention mask > 0; for finetune_kit's padding-free batches the
tokens before a row's trailing padding). The clock starts at the end of step ``--warmup`` and stops
at the last step (two CUDA syncs in all). Peak memory is ``torch.cuda.max_memory_allocated()`` and
the highest ``nvidia-smi`` reading while the process ran (minus the reading before it started).
MFU = tokens/s x (4N + 6P + 6·L·s·d) / peak FLOP/s (N matmul weights incl. the head, P LoRA weights,
L layers, d hidden size, s the token-weighted mean example length: attention never spans examples);
peak 989 TFLOP/s (H100/H200 dense bf16). ``--profile N`` runs ``torch.profiler`` over the last N
warm-up steps of each contender (never the timed ones) and writes where the GPU and the host spent
their time next to each contender's log (``<name>.probe.profile.txt``); profile in a separate run
from the one whose timings you report, as the profiler can slow the steps after it.

    python benchmarks/train_speed.py --cpu --lf-site /path/to/lf-target          # development, CPU
    python benchmarks/train_speed.py --lf-site /tmp/lf --workloads qwen05b --data mixed   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]  # train_methods' helpers; finetune_kit
RESULTS = REPO / "benchmarks" / "results"
CONTENDERS = ("peft", "lf", "fk", "fk_padded", "lf_packed", "fk_packed", "fk_packed_liger", "fk_packed_liger_gc")
# what each word of a contender's name adds to the shared YAML (LLaMA-Factory and finetune_kit read the same
# keys; the last three are finetune_kit's): fk_packed_liger_gc28 = packing + Liger + checkpointing in 28 layers
WORDS = {
    "padded": {"padding_free": False},  # finetune_kit's padded batches, as LLaMA-Factory batches
    "packed": {"packing": True, "neat_packing": True},
    "liger": {"enable_liger_kernel": True},
    "gc": {"gradient_checkpointing": True},
    "compile": {"torch_compile": True},
}


def variant(name: str) -> dict[str, Any]:
    """The YAML keys a contender's name adds (``gcN``: checkpointing in the first N decoder layers only)."""
    keys: dict[str, Any] = {}
    for word in name.split("_")[1:]:
        layers = re.fullmatch(r"gc(\d+)", word)
        if word not in WORDS and not layers:
            raise SystemExit(f"unknown contender word {word!r} in {name!r}; known: {', '.join(WORDS)}, gcN")
        keys.update(WORDS["gc"] if layers else WORDS[word])
        if layers:
            keys["gradient_checkpointing_layers"] = int(layers.group(1))
    return keys


# an ablation suffix on a finetune_kit contender: the same YAML with one kernel choice undone in its process
ABLATIONS = {"_unfused": "fused_lora"}  # e.g. fk_packed_liger_unfused: LoRA's product added as PEFT adds it
ABLATE_ENV = "TRAIN_SPEED_ABLATE"
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
PROBE_ENV = "TRAIN_SPEED_PROBE"  # "<json path>:<warmup steps>"
PROFILE_ENV = "TRAIN_SPEED_PROFILE"  # profile the last N warm-up steps of each contender (torch.profiler)


# ----- the probe, inside each contender's process ---------------------------------------------------------
def install_probe(out: str, warmup: int) -> None:
    """Count real tokens per step and time steps warmup..last in any transformers Trainer of this process."""
    import atexit

    import torch
    from transformers import Trainer, TrainerCallback

    cuda = torch.cuda.is_available()
    rec: dict[str, Any] = {"warmup": warmup, "tokens": None, "examples": None, "rows": 0}

    def sync_time() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def count(inputs: dict[str, Any]) -> None:
        ids = inputs["input_ids"]
        mask, pos = inputs.get("attention_mask"), inputs.get("position_ids")
        if mask is not None and mask.dim() == 2:
            real = mask.ne(0)
        elif mask is not None and mask.dim() == 4:  # LLaMA-Factory's neat packing: a padding token sees nothing
            diag = mask[:, 0].diagonal(dim1=-2, dim2=-1)
            real = diag if diag.dtype == torch.bool else diag.eq(0)
        elif pos is not None:  # padding-free rows: real up to the last nonzero position
            idx = torch.arange(pos.shape[1], device=pos.device).expand_as(pos)
            last = torch.where(pos.ne(0), idx, torch.zeros_like(idx)).amax(1, keepdim=True)
            real = idx.le(last)
        else:
            real = torch.ones_like(ids, dtype=torch.bool)
        tokens = real.sum()
        examples = (pos.eq(0) & real).sum() if pos is not None else torch.tensor(ids.shape[0], device=ids.device)
        rec["tokens"] = tokens if rec["tokens"] is None else rec["tokens"] + tokens
        rec["examples"] = examples if rec["examples"] is None else rec["examples"] + examples
        rec["rows"] += ids.shape[0]

    profiled = int(os.environ.get(PROFILE_ENV) or 0)  # profile the last N warm-up steps (never timed ones)
    prof: dict[str, Any] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if profiled and cuda and state.global_step == warmup - profiled:
                prof["wall0"] = sync_time()
                prof["p"] = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                )
                prof["p"].__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if "p" in prof and state.global_step == warmup:
                wall = sync_time() - prof["wall0"]
                p = prof.pop("p")
                p.__exit__(None, None, None)
                rec["profile"] = profile_report(p, wall, profiled, out)
            if state.global_step == warmup:
                rec["t0"] = sync_time()
                rec["tokens0"] = int(rec["tokens"])
                rec["examples0"] = int(rec["examples"])
                rec["rows0"] = rec["rows"]
            if state.global_step == state.max_steps:
                rec["t1"] = sync_time()
                rec["steps"] = state.global_step
                if cuda:
                    rec["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
                model = kw.get("model")  # LLaMA-Factory switches checkpointing on in the model, not the arguments
                layers = model.modules() if model is not None else ()
                rec["gradient_checkpointing"] = any(getattr(m, "gradient_checkpointing", False) for m in layers)
                rec["tokens1"], rec["examples1"] = int(rec["tokens"]), int(rec["examples"])
                rec["rows1"] = rec["rows"]
                dump()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            rec["losses"] = [(e["step"], e["loss"]) for e in state.log_history if "loss" in e and "step" in e]
            dump()

    def dump() -> None:
        keep = {k: v for k, v in rec.items() if not hasattr(v, "device")}
        Path(out).write_text(json.dumps(keep))

    step, init = Trainer.training_step, Trainer.__init__

    def training_step(self: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        count(inputs)
        return step(self, model, inputs, *args, **kwargs)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.add_callback(Clock())

    Trainer.training_step, Trainer.__init__ = training_step, __init__
    atexit.register(lambda: None if "t1" in rec else dump())


def profile_report(p: Any, wall: float, steps: int, out: str) -> dict[str, Any]:
    """Where ``steps`` profiled steps spent their time: tables next to the probe file, a summary for the JSON."""
    events = p.key_averages()

    def device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))

    on_gpu = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")] or list(events)
    busy = sum(device_us(e) for e in on_gpu) / 1e6
    kernels = sorted(on_gpu, key=device_us, reverse=True)
    cpu_ops = sorted(events, key=lambda e: float(e.cpu_time_total), reverse=True)
    lines = [f"{steps} steps, {wall:.3f} s wall, GPU busy {busy:.3f} s ({busy / wall:.0%})", "", "by self GPU time:"]
    lines += [f"{device_us(e) / 1e3:10.1f} ms {e.count:7d}x  {e.key[:110]}" for e in kernels[:45]]
    lines += ["", "by CPU time (inclusive):"]
    lines += [f"{e.cpu_time_total / 1e3:10.1f} ms {e.count:7d}x  {e.key[:110]}" for e in cpu_ops[:45]]
    Path(out).with_suffix(".profile.txt").write_text("\n".join(lines) + "\n")
    top = [[e.key[:80], round(device_us(e) / 1e3 / steps, 2)] for e in kernels[:12]]
    return {"steps": steps, "wall_s_per_step": round(wall / steps, 4), "gpu_busy_fraction": round(busy / wall, 3),
            "top_gpu_ms_per_step": top}  # fmt: skip


def child(kind: str, arg: str) -> int:
    out, warmup = os.environ[PROBE_ENV].rsplit(":", 1)
    install_probe(out, int(warmup))
    if kind == "lf":
        from llamafactory.cli import main as lf_main

        sys.argv = ["llamafactory-cli", "train", arg]
        lf_main()
        return 0
    if kind == "fk":
        from finetune_kit.cli.main import main as fk_main
        from finetune_kit.train import run

        if os.environ.get(ABLATE_ENV) == "fused_lora":
            run.fused_lora = lambda model, enabled=True: contextlib.nullcontext(0)  # type: ignore[assignment]

        return fk_main(["train", arg])
    return train_peft(json.loads(Path(arg).read_text()))


def train_peft(spec: dict) -> int:
    """The plain baseline: transformers Trainer + peft LoRA on finetune_kit's (LLaMA-Factory's) encoding."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from finetune_kit import DatasetRegistry, LoraTrainer, ModelSource

    source = ModelSource.local(spec["model"]).with_config(template=spec["template"])
    data = DatasetRegistry.from_dir(spec["dataset_dir"]).load(spec["dataset"])
    tokens = LoraTrainer(source).with_data(cutoff_len=spec["cutoff_len"]).tokenize(data)
    tok = tokens.tokenizer
    tok.padding_side = "right"
    dtype = torch.bfloat16 if spec["bf16"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    args = TrainingArguments(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch"],
        learning_rate=spec["learning_rate"],
        max_steps=spec["steps"],
        lr_scheduler_type=spec["lr_scheduler_type"],
        warmup_steps=spec["warmup_ratio"],  # transformers 5 reads a value < 1 as a ratio
        logging_steps=spec["logging_steps"],
        save_strategy="no",
        report_to=[],
        bf16=spec["bf16"],
        seed=42,
        data_seed=42,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    Trainer(model=model, args=args, train_dataset=tokens.dataset, data_collator=collator).train()
    return 0


# ----- the parent: data, models, YAMLs, runs --------------------------------------------------------------
def yaml_text(values: dict[str, Any]) -> str:
    return "".join(
        f"{k}: {json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}\n"
        for k, v in values.items()
    )


def workload_settings(name: str, cpu: bool) -> dict[str, Any]:
    if cpu:
        return {"batch": 4, "cutoff_len": 256, "steps": 10, "scale": 0.25, "rows": 96, "lr": 1e-4}
    if name == "llama8b":
        return {"batch": 4, "cutoff_len": 2048, "steps": 30, "scale": 1.0, "rows": 1200, "lr": 1e-4}
    return {"batch": 16, "cutoff_len": 1024, "steps": 60, "scale": 1.0, "rows": 4000, "lr": 1e-4}


def make_rows(kind: str, sentences: list, n: int, scale: float, cutoff: int) -> list[dict]:
    import random

    import train_methods as tm

    if kind == "mixed":
        return tm.make_sft_rows(sentences, n, scale=scale, seed=0)
    rng = random.Random(1)  # fixed: every example ~95% of the cutoff (packing cannot help; kernels only)
    total = int(cutoff * 0.95)
    return [
        {
            "instruction": tm.text_of(rng, sentences, total // 5),
            "input": "",
            "output": tm.text_of(rng, sentences, total - total // 5 - 30),
        }
        for _ in range(n)
    ]


def data_stats(model_dir: Path, template: str, data_dir: Path, cutoff: int) -> dict:
    from finetune_kit import DatasetRegistry, LoraTrainer, ModelSource

    tokens = LoraTrainer(ModelSource.local(model_dir).with_config(template=template)).with_data(cutoff_len=cutoff)
    lengths = sorted(
        len(x) for x in tokens.tokenize(DatasetRegistry.from_dir(data_dir).load("bench_sft")).dataset["input_ids"]
    )
    return {
        "examples": len(lengths),
        "mean": round(statistics.fmean(lengths), 1),
        "p50": lengths[len(lengths) // 2],
        "p95": lengths[int(0.95 * (len(lengths) - 1))],
        "max": lengths[-1],
        "s_eff": round(sum(n * n for n in lengths) / sum(lengths), 1),  # token-weighted mean example length
    }


def flops_per_token(cfg: Any, s_eff: float, rank: int = 8) -> dict:
    d, L, i, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    layer = [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]  # q k v o gate up down (in, out)
    n = L * sum(a * b for a, b in layer) + V * d
    p = L * sum(rank * (a + b) for a, b in layer)
    return {"N": n, "P": p, "flops": 4 * n + 6 * p + 6 * L * s_eff * d, "formula": "4N + 6P + 6*L*s*d"}


class SmiPeak(threading.Thread):
    """Highest nvidia-smi memory.used (MiB) on GPU 0 while a contender runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    @staticmethod
    def read() -> int | None:
        try:
            r = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            return int(r.stdout.split()[0]) if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.peak = max(self.peak, self.read() or 0)


def run_contender(name: str, cmd: list[str], env: dict, probe: Path, log: Path, timeout: int, gpu: bool) -> dict:
    base = SmiPeak.read() if gpu else None
    smi = SmiPeak() if gpu and base is not None else None
    if smi:
        smi.start()
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    if smi:
        smi.stop.set()
        smi.join()
    rec = json.loads(probe.read_text()) if probe.is_file() else {}
    out: dict[str, Any] = {"rc": rc, "process_wall_s": round(wall, 1)}
    if "t1" not in rec or "t0" not in rec:
        out["error"] = log.read_text(errors="replace")[-3000:]
        return out
    secs = rec["t1"] - rec["t0"]
    steps = rec["steps"] - rec["warmup"]
    tokens, examples = rec["tokens1"] - rec["tokens0"], rec["examples1"] - rec["examples0"]
    out.update(
        steps_timed=steps,
        seconds=round(secs, 2),
        real_tokens_per_s=round(tokens / secs, 1),
        examples_per_s=round(examples / secs, 2),
        rows_per_s=round((rec["rows1"] - rec["rows0"]) / secs, 2),
        real_tokens_per_step=round(tokens / steps, 1),
        losses=rec.get("losses"),
        final_loss=rec["losses"][-1][1] if rec.get("losses") else None,
        gradient_checkpointing=rec.get("gradient_checkpointing"),
        profile=rec.get("profile"),
        peak_allocated_gib=rec.get("peak_allocated_gib"),
        peak_reserved_gib=rec.get("peak_reserved_gib"),
    )
    if smi:
        out["nvidia_smi_peak_gib"] = round((smi.peak - (base or 0)) / 1024, 2)
    return out


def run_workload(opts: argparse.Namespace, workload: str, data_kind: str, results: dict, save: Any) -> dict:
    import torch
    import train_methods as tm
    from transformers import AutoConfig, AutoTokenizer

    gpu = torch.cuda.is_available() and not opts.cpu
    st = workload_settings(workload, opts.cpu)
    st["steps"] = opts.steps or st["steps"]
    work = Path(opts.work)
    tok_dir = tm.tokenizer_folder(None)
    if opts.cpu:
        from finetune_kit.models.source import ModelSource

        model_dir = ModelSource.bundled().resolve()
    else:
        shape = tm.QWEN25_05B if workload == "qwen05b" else tm.LLAMA3_8B
        model_dir = work / "models" / shape.name
        tm.build_model(shape, model_dir, tok_dir, "cuda")
    cfg = AutoConfig.from_pretrained(model_dir)
    sentences = tm.demo_sentences(AutoTokenizer.from_pretrained(tok_dir))
    data_dir = work / "data" / f"{workload}-{data_kind}{'-cpu' if opts.cpu else ''}"
    tm.write_data(data_dir, make_rows(data_kind, sentences, st["rows"], st["scale"], st["cutoff_len"]), [])
    template = "chatml"
    stats = data_stats(model_dir, template, data_dir, st["cutoff_len"])
    fpt = flops_per_token(cfg, stats["s_eff"])
    base = {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0,
        "lora_target": "all",
        "dataset": "bench_sft",
        "dataset_dir": str(data_dir),
        "template": template,
        "cutoff_len": st["cutoff_len"],
        "overwrite_cache": True,
        # LLaMA-Factory packs each worker's shard on its own: one worker gives both tools the same packed rows
        "preprocessing_num_workers": 1,
        "logging_steps": max(1, st["steps"] // 10),
        "save_strategy": "no",
        "overwrite_output_dir": True,
        "per_device_train_batch_size": st["batch"],
        "gradient_accumulation_steps": 1,
        "learning_rate": st["lr"],
        "max_steps": st["steps"],
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "bf16": gpu,
        "report_to": "none",
        "seed": 42,
    }
    runs = work / "runs" / f"{workload}-{data_kind}"
    runs.mkdir(parents=True, exist_ok=True)
    warmup = opts.warmup if opts.warmup is not None else max(1, st["steps"] // 6)
    results.update(settings=dict(st), data=stats, flops_per_token=fpt, warmup_steps=warmup)
    env0 = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env0.update(DISABLE_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if not gpu:
        env0["CUDA_VISIBLE_DEVICES"] = ""
        # a fixed thread count per process: on a shared machine more threads than free cores thrash
        env0["OMP_NUM_THREADS"] = env0["MKL_NUM_THREADS"] = str(opts.threads)
    fk_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    for name in opts.contenders:
        if "liger" in name and not gpu:
            continue
        if name.startswith("lf") and not opts.lf_site:
            results[name] = {"skipped": "no --lf-site"}
            continue
        ablation = next((a for a in ABLATIONS if name.endswith(a) and name.startswith("fk")), "")
        values = {**base, **variant(name.removesuffix(ablation)), "output_dir": str(runs / name)}
        probe, log = runs / f"{name}.probe.json", runs / f"{name}.log"
        probe.unlink(missing_ok=True)
        env = dict(env0, **{PROBE_ENV: f"{probe}:{warmup}"})
        if ablation:
            env[ABLATE_ENV] = ABLATIONS[ablation]
        if opts.profile and gpu:
            env[PROFILE_ENV] = str(min(opts.profile, warmup - 1))
        if name == "peft":
            spec = {
                "model": str(model_dir),
                "template": template,
                "dataset_dir": str(data_dir),
                "dataset": "bench_sft",
                "cutoff_len": st["cutoff_len"],
                "bf16": gpu,
                "batch": st["batch"],
                "learning_rate": st["lr"],
                "steps": st["steps"],
                "lr_scheduler_type": "cosine",
                "warmup_ratio": 0.1,
                "logging_steps": base["logging_steps"],
                "output_dir": str(runs / name),
            }
            arg = runs / "peft.json"
            arg.write_text(json.dumps(spec))
            env["PYTHONPATH"] = fk_path
        else:
            arg = runs / f"{name}.yaml"
            arg.write_text(yaml_text(values))
            env["PYTHONPATH"] = opts.lf_site if name.startswith("lf") else fk_path
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name.split("_")[0], str(arg)]
        print(f"[{workload}/{data_kind}] {name} ...", file=sys.stderr, flush=True)
        res = run_contender(name, cmd, env, probe, log, opts.timeout, gpu)
        if "real_tokens_per_s" in res and gpu:
            res["mfu"] = round(res["real_tokens_per_s"] * fpt["flops"] / peak_flops(), 4)
        results[name] = res
        shown = ("real_tokens_per_s", "examples_per_s", "peak_allocated_gib", "final_loss", "rc")
        print(f"  -> {json.dumps({k: res.get(k) for k in shown})}", file=sys.stderr, flush=True)
        save()
    results["ratios"] = ratios(results)
    return results


def ratios(results: dict) -> dict:
    def rate(name: str) -> float | None:
        r = results.get(name) or {}
        return r.get("real_tokens_per_s")

    out = {}
    mine = [name for name in results if name.startswith("fk")]
    for a, b in (*[(name, "lf") for name in mine], ("fk_packed", "lf_packed"), ("fk", "peft")):
        if rate(a) and rate(b):
            out[f"{a}/{b}"] = round(rate(a) / rate(b), 2)
    return out


def peak_flops() -> float:
    import torch

    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 989e12)


def scrub(obj: Any, roots: list[str]) -> Any:
    """The report without absolute paths of this machine."""
    if isinstance(obj, dict):
        return {k: scrub(v, roots) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v, roots) for v in obj]
    if isinstance(obj, str):
        for root, name in roots:
            obj = obj.replace(root, name)
    return obj


def write(report: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--child", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    p.add_argument("--cpu", action="store_true", help="CPU-sized: the bundled model, cutoff 256, batch 4, 10 steps")
    p.add_argument("--workloads", default="qwen05b,llama8b", help="qwen05b, llama8b (comma separated)")
    p.add_argument("--data", default="mixed,fixed", help="mixed (long-tailed lengths), fixed (~95%% of the cutoff)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"subset of {','.join(CONTENDERS)}")
    p.add_argument("--lf-site", default=None, help="target folder of LLaMA-Factory 0.9.5 and its pinned wheels")
    p.add_argument("--steps", type=int, default=None, help="max_steps (default: 60 for 0.5B, 30 for 8B, 10 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="steps before the clock starts (default steps/6)")
    p.add_argument("--work", default="/tmp/ftk-train-speed", help="models, data and run folders")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/train_speed_{cpu,gpu}.json)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per contender")
    p.add_argument("--threads", type=int, default=1, help="CPU mode: torch threads per contender process")
    p.add_argument("--profile", type=int, default=0, help="GPU: torch.profiler over the last N warm-up steps")
    opts = p.parse_args(argv)
    if opts.child:
        return child(*opts.child)
    opts.contenders = [c for c in opts.contenders.split(",") if c]
    opts.out = opts.out or str(RESULTS / f"train_speed_{'cpu' if opts.cpu else 'gpu'}.json")
    if opts.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import train_methods as tm

    report: dict[str, Any] = {
        "command": "python benchmarks/train_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_at": tm.now_iso(),
        "hardware": tm.hardware(),
        "versions": {k: v for k, v in tm.versions().items() if k != "finetune_kit_path"},
        "load_average_start": list(os.getloadavg()),
        "results": {},
    }
    roots = [(opts.out, "<out>"), (opts.work, "<work>"), (str(REPO), "<repo>")]
    roots += [(opts.lf_site, "<lf-site>")] if opts.lf_site else []
    for workload in ["bundled-smollm2"] if opts.cpu else opts.workloads.split(","):
        for data_kind in opts.data.split(","):
            key = f"{workload}/{data_kind}"
            results = report["results"].setdefault(key, {})
            try:
                run_workload(opts, workload, data_kind, results, lambda: write(scrub(report, roots), opts.out))
            except Exception as exc:  # one broken workload must not lose the others
                results["error"] = f"{type(exc).__name__}: {exc}"
            write(scrub(report, roots), opts.out)
    report["load_average_end"] = list(os.getloadavg())
    report["finished_at"] = tm.now_iso()
    report = scrub(report, roots)
    write(report, opts.out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
