# ruff: noqa: PLC0415  (torch, transformers and finetune_kit load inside the functions, after the CLI has set the env)
"""Training methods on one CUDA GPU: QLoRA vs LoRA at Llama-3-8B size, DPO and full fine-tuning at Qwen2.5-0.5B size.

Everything runs in one process, one workload after the other, on the same generated data:

* ``qlora_vs_lora_8b``: a random-weight model of Llama-3-8B's shape (built once from its config
  in bf16 and saved with safetensors under ``--work``; reused when present) trained with
  ``LoraTrainer(ModelSource.local(dir))`` LoRA r 8 / alpha 16 on every linear layer, bf16,
  gradient checkpointing, batch 4, cutoff 1024: once as bf16 LoRA, once as QLoRA
  (``with_quantization(quantization_bit=4)``: nf4, double quantization);
* ``dpo_0_5b``: LoRA DPO (``with_dpo(pref_beta=0.1)``) on a random-weight Qwen2.5-0.5B shape, batch 8 pairs;
* ``full_0_5b``: full fine-tuning (``with_full()``) SFT of the same shape, batch 8.

The random models use the bundled SmolLM2 tokenizer (49,152 ids, valid for both embeddings) and
the smollm2 template. The data are alpaca rows (and ranking pairs) written to a real
``dataset_info.json`` folder, built from the demo data's sentences repeated to long-tailed
lengths (encoded: mean ~350 tokens, p95 ~950), seeded.

How it measures: nothing in finetune_kit is patched. For each ``train()`` a probe wraps two
public transformers entry points: ``AutoModelForCausalLM.from_pretrained`` (load seconds, weights
on the GPU) and ``Trainer.train``, which gets a ``TrainerCallback`` timing every optimizer step
(CUDA-synchronised) and counts non-padding input tokens (``include_num_input_tokens_seen =
"non_padding"``: the attention mask's sum; for DPO chosen and rejected sequences both count).
Throughput is over the steps after the first ``--warmup`` ones. Peak memory is
``torch.cuda.max_memory_allocated()`` / ``max_memory_reserved()`` over load + train, reset (and the
previous model freed) before each run.

    python benchmarks/train_methods.py --out train_methods.json           # GPU, ~5 minutes on one H100
    python benchmarks/train_methods.py --only dpo_0_5b,full_0_5b --steps 30
    HF_HUB_OFFLINE=1 python benchmarks/train_methods.py --smoke --out /tmp/smoke.json   # tiny shapes, CPU ok
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

WORKLOADS = ("qlora_vs_lora_8b", "dpo_0_5b", "full_0_5b")
RUN_ORDER = ("dpo_0_5b", "full_0_5b", "qlora_vs_lora_8b")  # the small ones first: a cut-short run keeps them
REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "finetune_kit" / "data" / "demo"
SFT_DATASET, DPO_DATASET = "bench_sft", "bench_dpo"
TEMPLATE = "smollm2"


@dataclass(frozen=True)
class Shape:
    """A decoder's shape; the weights are random (built from the config, never downloaded)."""

    name: str
    arch: str  # llama | qwen2
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rms_norm_eps: float


LLAMA3_8B = Shape("llama3-8b-shape", "llama", 4096, 32, 32, 8, 14336, 128256, 500000.0, 8192, False, 1e-5)
QWEN25_05B = Shape("qwen2.5-0.5b-shape", "qwen2", 896, 24, 14, 2, 4864, 151936, 1000000.0, 32768, True, 1e-6)


def smoke_shape(shape: Shape) -> Shape:
    """The same architecture at test size: hidden 64, 2 layers, SmolLM2's vocabulary."""
    return replace(
        shape,
        name=shape.name.replace("shape", "smoke"),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=49152,
        max_position_embeddings=2048,
    )


@dataclass(frozen=True)
class Settings:
    steps: int
    steps_8b: int
    warmup: int
    cutoff_len: int
    batch_8b: int
    batch_0_5b: int
    rows: int
    lr_lora: float
    lr_dpo: float
    lr_full: float
    seed: int
    gradient_checkpointing: bool
    bf16: bool
    device: str
    smoke: bool


# ----- data ------------------------------------------------------------------------------------------
def demo_sentences(tokenizer: Any) -> list[tuple[str, int]]:
    """Every sentence of the demo data with its token count (the text the generated rows repeat)."""
    texts: set[str] = set()
    for file, keys in (("shop_alpaca.json", ("instruction", "output")), ("shop_dpo.json", ("chosen", "rejected"))):
        for row in json.loads((DEMO / file).read_text(encoding="utf-8")):
            for key in keys:
                texts.update(s.strip() for s in re.findall(r"[^。！？!?]+[。！？!?]?", row[key]) if s.strip())
    ordered = sorted(texts)
    counts = [len(ids) for ids in tokenizer(ordered, add_special_tokens=False)["input_ids"]]
    return list(zip(ordered, counts, strict=True))


def text_of(rng: random.Random, sentences: list[tuple[str, int]], tokens: int) -> str:
    """Demo sentences drawn at random and joined until they reach about ``tokens`` tokens."""
    out, n = [], 0
    while n < tokens:
        s, k = rng.choice(sentences)
        out.append(s)
        n += k
    return "".join(out)


def lognormal(rng: random.Random, mean: float, p95: float) -> float:
    """A lognormal draw with the given mean and 95th percentile (the long tail of real instruction data)."""
    # mean = exp(mu + s^2/2), p95 = exp(mu + 1.645 s)  =>  s^2/2 - 1.645 s + ln(p95/mean) = 0 (smaller root)
    z, gap = 1.6449, math.log(p95 / mean)
    s = z - math.sqrt(z * z - 2 * gap)
    return rng.lognormvariate(math.log(mean) - s * s / 2, s)


def make_sft_rows(sentences: list[tuple[str, int]], n: int, *, scale: float, seed: int) -> list[dict]:
    """Alpaca rows whose encoded length (template included) has mean ~350 and p95 ~950 tokens at cutoff 1024."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total = min(lognormal(rng, 340, 900), 1150) * scale
        prompt = max(6, int(total * rng.uniform(0.1, 0.4)))
        response = max(4, int(total) - prompt - 30)  # ~30 tokens of template and system prompt
        with_input = rng.random() < 0.3
        head = prompt // 3 if with_input else prompt
        rows.append(
            {
                "instruction": text_of(rng, sentences, head),
                "input": text_of(rng, sentences, prompt - head) if with_input else "",
                "output": text_of(rng, sentences, response),
            }
        )
    return rows


def make_dpo_rows(sentences: list[tuple[str, int]], n: int, *, scale: float, seed: int) -> list[dict]:
    """Preference pairs: prompt mean ~120 tokens, chosen and rejected mean ~210 (p95 ~520) each."""
    rng = random.Random(seed + 1)
    rows = []
    for _ in range(n):
        rows.append(
            {
                "instruction": text_of(rng, sentences, int(lognormal(rng, 120, 300) * scale)),
                "input": "",
                "chosen": text_of(rng, sentences, int(lognormal(rng, 210, 520) * scale)),
                "rejected": text_of(rng, sentences, int(lognormal(rng, 210, 520) * scale)),
            }
        )
    return rows


def write_data(folder: Path, sft: list[dict], dpo: list[dict]) -> Path:
    """A LLaMA-Factory dataset folder: the alpaca rows and an alpaca ranking dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{SFT_DATASET}.json").write_text(json.dumps(sft, ensure_ascii=False), encoding="utf-8")
    (folder / f"{DPO_DATASET}.json").write_text(json.dumps(dpo, ensure_ascii=False), encoding="utf-8")
    info = {
        SFT_DATASET: {"file_name": f"{SFT_DATASET}.json"},
        DPO_DATASET: {
            "file_name": f"{DPO_DATASET}.json",
            "ranking": True,
            "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
        },
    }
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder


def length_stats(tokens: Any) -> dict:
    """Encoded lengths of a TokenizedDataset (sft: input_ids; dpo: chosen and rejected sequences)."""
    ds = tokens.dataset
    cols = ["chosen_input_ids", "rejected_input_ids"] if "chosen_input_ids" in ds.column_names else ["input_ids"]
    out: dict[str, Any] = {"rows": len(ds), "truncated_rows": tokens.truncated}
    for col in cols:
        lengths = sorted(len(x) for x in ds[col])
        out[col.replace("_input_ids", "").replace("input_ids", "sequence")] = {
            "mean": round(statistics.fmean(lengths), 1),
            "p50": lengths[len(lengths) // 2],
            "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
            "max": lengths[-1],
            "min": lengths[0],
        }
    return out


# ----- models ----------------------------------------------------------------------------------------
def build_model(shape: Shape, folder: Path, tokenizer_dir: Path, device: str) -> dict:
    """Save a random-weight ``shape`` model (bf16 safetensors) and the tokenizer to ``folder``; reuse it if there."""
    marker = folder / "bench_shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == asdict(shape):
        return {"folder": str(folder), "reused": True}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tok) > shape.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} ids, more than the {shape.vocab_size} of {shape.name}")
    cfg = model_config(shape, tok)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it is fast (seconds for 8B on a GPU)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    t1 = time.perf_counter()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB", safe_serialization=True)
    tok.save_pretrained(tmp)
    del model
    free_memory()
    marker_tmp = tmp / marker.name
    marker_tmp.write_text(json.dumps(asdict(shape)))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {
        "folder": str(folder),
        "reused": False,
        "parameters": params,
        "safetensors_gib": round(size / 2**30, 2),
        "init_s": round(t1 - t0, 1),
        "save_s": round(time.perf_counter() - t1, 1),
    }


def model_config(shape: Shape, tok: Any) -> Any:
    """The transformers config of ``shape``, with ``tok``'s special token ids."""
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if shape.arch == "llama" else Qwen2Config
    return cls(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.rms_norm_eps,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _gib(n: float) -> float:
    return round(n / 2**30, 3)


def release(model: Any) -> None:
    """Drop a finished run's tensors now, even if some object still references the module."""
    import torch

    if model is None:
        return
    for t in [*model.parameters(), *model.buffers()]:
        t.data = torch.empty(0, dtype=t.dtype, device="cpu")
        t.grad = None


# ----- measuring one train() ---------------------------------------------------------------------------
class Probe:
    """Times one ``LoraTrainer.train()`` through public transformers entry points (see the module docstring)."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.load_s = 0.0
        self.weights_gib: float | None = None
        self.train_called: float | None = None
        self.train_returned: float | None = None
        self.marks: list[tuple[int, float, int]] = []  # (global_step, time, non-padding tokens seen)
        self._stack = contextlib.ExitStack()

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def mark(self, state: Any) -> None:
        self.marks.append((state.global_step, self.now(), int(state.num_input_tokens_seen or 0)))

    def __enter__(self) -> Probe:
        from unittest import mock

        from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

        probe, load, train = self, AutoModelForCausalLM.from_pretrained, Trainer.train

        class StepTimer(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                probe.mark(state)

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                probe.mark(state)

        def timed_load(*args: Any, **kwargs: Any) -> Any:
            t = probe.now()
            model = load(*args, **kwargs)
            probe.load_s += probe.now() - t
            if probe.cuda:
                import torch

                probe.weights_gib = _gib(torch.cuda.memory_allocated())
            return model

        def timed_train(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            trainer.args.include_num_input_tokens_seen = "non_padding"
            trainer.add_callback(StepTimer())
            probe.train_called = probe.now()
            try:
                return train(trainer, *args, **kwargs)
            finally:
                probe.train_returned = probe.now()

        self._stack.enter_context(mock.patch.object(AutoModelForCausalLM, "from_pretrained", timed_load))
        self._stack.enter_context(mock.patch.object(Trainer, "train", timed_train))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def throughput(self, warmup: int, batch: int) -> dict:
        """Rates over the steps after ``warmup``; step times of every step."""
        steps = self.marks[1:]
        durations = [b[1] - a[1] for a, b in zip(self.marks, steps, strict=False)]
        out: dict[str, Any] = {
            "steps_done": len(steps),
            "step_s_all": [round(d, 4) for d in durations],
            "first_step_s": round(durations[0], 3) if durations else None,
        }
        w = min(warmup, len(steps) - 1)
        if w < 0:
            return out
        start, end = self.marks[w], self.marks[-1]
        seconds, n = end[1] - start[1], len(steps) - w
        window = durations[w:]
        out.update(
            warmup_steps_excluded=w,
            measured_steps=n,
            measured_s=round(seconds, 3),
            tokens_per_s=round((end[2] - start[2]) / seconds, 1) if seconds > 0 else None,
            examples_per_s=round(batch * n / seconds, 3) if seconds > 0 else None,
            step_s_mean=round(statistics.fmean(window), 4) if window else None,
            step_s_median=round(statistics.median(window), 4) if window else None,
            tokens_measured=end[2] - start[2],
            tokens_per_step_mean=round((end[2] - start[2]) / n, 1) if n else None,
        )
        return out


def run_training(trainer: Any, data: Any, *, batch: int, warmup: int, out: Path) -> dict:
    """Train once under a :class:`Probe`; return timings, memory, losses and parameter counts."""
    import torch

    shutil.rmtree(out, ignore_errors=True)
    free_memory()
    cuda = torch.cuda.is_available()
    before = _gib(torch.cuda.memory_allocated()) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with Probe() as probe:
        result = trainer.train(data)
    total = time.perf_counter() - t0
    report: dict[str, Any] = {
        "allocated_before_gib": before,
        "load_s": round(probe.load_s, 2),
        "setup_s": round((probe.marks[0][1] if probe.marks else t0) - t0, 2),
        "train_loop_s": round((probe.train_returned or t0) - (probe.train_called or t0), 2),
        "finish_s": round(t0 + total - (probe.train_returned or t0), 2),
        "total_s": round(total, 2),
        **probe.throughput(warmup, batch),
    }
    if cuda:
        report.update(
            weights_allocated_gib=probe.weights_gib,
            peak_allocated_gib=_gib(torch.cuda.max_memory_allocated()),
            peak_reserved_gib=_gib(torch.cuda.max_memory_reserved()),
        )
    losses = [loss for _, loss in result.losses]
    report.update(
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        loss_last3_mean=round(statistics.fmean(losses[-3:]), 4) if losses else None,
        losses=[round(x, 4) for x in losses],
        train_metrics={k: v for k, v in result.metrics.items() if isinstance(v, int | float)},
    )
    last = next((e for e in reversed(result.log_history) if "rewards/margins" in e), None)
    if last is not None:
        report["rewards_last"] = {k: v for k, v in last.items() if k.startswith("rewards/")}
    model = result.model.model if result.model is not None else None
    if model is not None:
        report["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        by_dtype: dict[str, int] = {}
        for p in model.parameters():
            key = str(p.dtype).replace("torch.", "")
            by_dtype[key] = by_dtype.get(key, 0) + p.numel() * p.element_size()
        report["param_gib_by_dtype"] = {k: _gib(v) for k, v in sorted(by_dtype.items())}
    release(model)
    del result, model
    free_memory()
    return report


# ----- workloads ---------------------------------------------------------------------------------------
def base_trainer(model_dir: Path, s: Settings, out: Path, *, batch: int, lr: float) -> Any:
    from finetune_kit import LoraTrainer, ModelSource

    source = ModelSource.local(model_dir).with_config(template=TEMPLATE)
    if s.device == "cpu":
        source = source.with_config(device="cpu")
    return (
        LoraTrainer(source)
        .with_data(cutoff_len=s.cutoff_len)
        .with_training(
            output_dir=str(out),
            learning_rate=lr,
            max_steps=s.steps,
            per_device_train_batch_size=batch,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_steps=10**6,
            bf16=s.bf16,
            gradient_checkpointing=s.gradient_checkpointing,
            disable_tqdm=True,
            seed=s.seed,
            overwrite_output_dir=True,
        )
    )


def qlora_vs_lora(model_dir: Path, data: Any, s: Settings, work: Path, out: dict, save: Any, notes: list[str]) -> None:
    import torch

    lora = (
        base_trainer(model_dir, s, work / "runs" / "lora_8b", batch=s.batch_8b, lr=s.lr_lora)
        .with_lora(lora_rank=8, lora_alpha=16)
        .with_training(max_steps=s.steps_8b)
    )
    t = time.perf_counter()
    tokens = lora.tokenize(data)
    out.update(tokenize_s=round(time.perf_counter() - t, 2), data=length_stats(tokens))
    out["lora"] = attempt(
        lambda: run_training(lora, tokens, batch=s.batch_8b, warmup=s.warmup, out=work / "runs" / "lora_8b")
    )
    save()
    if not torch.cuda.is_available():
        out["qlora"] = {"skipped": "QLoRA needs a CUDA GPU and bitsandbytes"}
        notes.append("qlora_vs_lora_8b: the QLoRA variant was skipped (no CUDA GPU)")
        return
    qlora = lora.with_quantization(quantization_bit=4, quantization_type="nf4", double_quantization=True).with_training(
        output_dir=str(work / "runs" / "qlora_8b")
    )
    out["qlora"] = attempt(
        lambda: run_training(qlora, tokens, batch=s.batch_8b, warmup=s.warmup, out=work / "runs" / "qlora_8b")
    )
    a, b = out["lora"], out["qlora"]
    out["ratios"] = {
        "memory_qlora_over_lora_peak_allocated": _ratio(b.get("peak_allocated_gib"), a.get("peak_allocated_gib")),
        "memory_qlora_over_lora_peak_reserved": _ratio(b.get("peak_reserved_gib"), a.get("peak_reserved_gib")),
        "memory_qlora_over_lora_weights": _ratio(b.get("weights_allocated_gib"), a.get("weights_allocated_gib")),
        "speed_qlora_over_lora_tokens_per_s": _ratio(b.get("tokens_per_s"), a.get("tokens_per_s")),
        "load_qlora_over_lora": _ratio(b.get("load_s"), a.get("load_s")),
        "same_tokens_measured": a.get("tokens_measured") == b.get("tokens_measured"),
    }


def dpo(model_dir: Path, data: Any, s: Settings, work: Path, out: dict) -> None:
    trainer = (
        base_trainer(model_dir, s, work / "runs" / "dpo_0_5b", batch=s.batch_0_5b, lr=s.lr_dpo)
        .with_lora(lora_rank=8, lora_alpha=16)
        .with_dpo(pref_beta=0.1)
    )
    t = time.perf_counter()
    tokens = trainer.tokenize(data)
    out.update(tokenize_s=round(time.perf_counter() - t, 2), data=length_stats(tokens))
    run = run_training(trainer, tokens, batch=s.batch_0_5b, warmup=s.warmup, out=work / "runs" / "dpo_0_5b")
    run["pairs_per_s"] = run.pop("examples_per_s", None)
    out["lora_dpo"] = run


def full(model_dir: Path, data: Any, s: Settings, work: Path, out: dict) -> None:
    trainer = base_trainer(model_dir, s, work / "runs" / "full_0_5b", batch=s.batch_0_5b, lr=s.lr_full).with_full()
    t = time.perf_counter()
    tokens = trainer.tokenize(data)
    out.update(tokenize_s=round(time.perf_counter() - t, 2), data=length_stats(tokens))
    out["full_sft"] = run_training(
        trainer, tokens, batch=s.batch_0_5b, warmup=s.warmup, out=work / "runs" / "full_0_5b"
    )


def attempt(run: Any) -> dict:
    """``run()``, or its error as a dict (the other variant of a comparison still runs; memory freed either way)."""
    try:
        return run()
    except Exception as exc:
        if _interrupted(exc):
            raise
        failed = {"error": _error(exc)}
    free_memory()
    return failed


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# ----- environment ---------------------------------------------------------------------------------------
def hardware() -> dict:
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_name=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=_gib(props.total_memory),
            compute_capability=f"{props.major}.{props.minor}",
            torch_cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def versions() -> dict:
    import importlib.metadata

    out: dict[str, Any] = {}
    for dist in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    import finetune_kit

    out["finetune_kit"] = getattr(finetune_kit, "__version__", None) or _dist_version("finetune-kit")
    out["finetune_kit_path"] = str(Path(finetune_kit.__file__).parent)
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            out["git_commit"] = head.stdout.strip()
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _dist_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def tokenizer_folder(given: str | None) -> Path:
    """``--tokenizer``, else $FINETUNE_KIT_TEST_TOKENIZER, else the bundled SmolLM2 (converted once)."""
    if given or os.environ.get("FINETUNE_KIT_TEST_TOKENIZER"):
        return Path(given or os.environ["FINETUNE_KIT_TEST_TOKENIZER"])
    from finetune_kit.models.source import ModelSource

    return ModelSource.bundled().resolve()


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_report(report: dict, out: str | None) -> None:
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


# ----- main ----------------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--steps", type=int, default=None, help="max_steps of the 0.5B workloads (default 20)")
    parser.add_argument("--steps-8b", type=int, default=None, help="max_steps of each 8B variant (default 12)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out of the rates (default 3)")
    parser.add_argument("--work", default="/tmp/ftk-bench", help="models, data and runs (the 8B model is reused)")
    parser.add_argument("--out", default=None, help="also write the JSON here (rewritten after each workload)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the bundled SmolLM2's)")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu hides the GPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes (hidden 64, 2 layers), 3 steps: checks the script end to end"
    )
    parser.add_argument("--keep-runs", action="store_true", help="keep the training output folders under --work/runs")
    opts = parser.parse_args(argv)
    only = [w.strip() for w in opts.only.split(",") if w.strip()]
    unknown = [w for w in only if w not in WORKLOADS]
    if unknown or not only:
        parser.error(f"--only: unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    opts.only = only
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if opts.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    started, t_start = now_iso(), time.perf_counter()
    import torch

    cuda = torch.cuda.is_available()
    smoke = opts.smoke
    s = Settings(
        steps=opts.steps or (3 if smoke else 20),
        steps_8b=opts.steps_8b or (3 if smoke else 12),
        warmup=opts.warmup if opts.warmup is not None else (1 if smoke else 3),
        cutoff_len=256 if smoke else 1024,
        batch_8b=2 if smoke else 4,
        batch_0_5b=2 if smoke else 8,
        rows=32 if smoke else 256,
        lr_lora=1e-4,
        lr_dpo=5e-5,
        lr_full=1e-5,
        seed=opts.seed,
        gradient_checkpointing=True,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        device="cuda" if cuda else "cpu",
        smoke=smoke,
    )
    big, small = (smoke_shape(LLAMA3_8B), smoke_shape(QWEN25_05B)) if smoke else (LLAMA3_8B, QWEN25_05B)
    work = Path(opts.work).expanduser()
    notes: list[str] = []
    if not cuda:
        notes.append("no CUDA GPU: trained in float32 on the CPU; no GPU memory figures; QLoRA skipped")
    if smoke:
        notes.append("smoke run: tiny shapes, numbers say nothing about performance")
    notes.append(
        "random-weight models: SFT losses start near ln(vocab) (11.76 for 128256 ids, 11.93 for 151936) and DPO at "
        "ln 2; their change over a few steps shows that training moves the weights, not model quality"
    )
    report: dict[str, Any] = {
        "benchmark": "train_methods",
        "started_at": started,
        "hardware": hardware(),
        "versions": versions(),
        "settings": {
            **asdict(s),
            "workloads": opts.only,
            "work": str(work),
            "template": TEMPLATE,
            "lora": {"lora_rank": 8, "lora_alpha": 16, "lora_target": "all", "lora_dropout": 0.0},
            "qlora": {"quantization_bit": 4, "quantization_type": "nf4", "double_quantization": True},
            "dpo": {"pref_beta": 0.1, "pref_loss": "sigmoid", "reference": "base with the adapter off"},
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "shapes": {"8b": asdict(big), "0_5b": asdict(small)},
            "throughput": (
                "optimizer-step times from a TrainerCallback (CUDA-synchronised) added when Trainer.train starts; "
                "tokens = non-padding input tokens (attention-mask sum; DPO counts chosen and rejected); rates over "
                "the steps after the warm-up ones. load_s = AutoModelForCausalLM.from_pretrained (incl. quantizing); "
                "setup_s = train() call to the first step (load, LoRA/k-bit preparation, trainer construction); "
                "finish_s = saving the adapter/model, tokenizer, logs after the loop"
            ),
        },
        "models": {},
        "data": {},
        "results": {},
        "errors": {},
        "notes": notes,
    }
    try:
        from transformers import AutoTokenizer

        from finetune_kit import DatasetRegistry

        tok_dir = tokenizer_folder(opts.tokenizer)
        report["settings"]["tokenizer"] = str(tok_dir)
        sentences = demo_sentences(AutoTokenizer.from_pretrained(tok_dir))
        scale = s.cutoff_len / 1024
        data_dir = write_data(
            work / "data",
            make_sft_rows(sentences, s.rows, scale=scale, seed=s.seed),
            make_dpo_rows(sentences, s.rows, scale=scale, seed=s.seed),
        )
        registry = DatasetRegistry.from_dir(data_dir)
        report["data"] = {"dataset_dir": str(data_dir), "rows": s.rows, "sentences": len(sentences)}
    except Exception as exc:  # nothing can run without the data
        report["errors"]["setup"] = _error(exc)
        return _finish(report, opts, t_start, code=1)
    write_report(report, opts.out)

    def save() -> None:
        write_report(report, opts.out)

    try:
        for name in [w for w in RUN_ORDER if w in opts.only]:
            print(f"[train_methods] {name} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            result: dict[str, Any] = {}
            report["results"][name] = result  # filled as each variant finishes, and written out then
            try:
                shape = big if name == "qlora_vs_lora_8b" else small
                folder = work / "models" / shape.name
                if shape.name not in report["models"]:
                    report["models"][shape.name] = build_model(shape, folder, tok_dir, s.device)
                    save()
                if name == "qlora_vs_lora_8b":
                    qlora_vs_lora(folder, registry.load(SFT_DATASET), s, work, result, save, notes)
                elif name == "dpo_0_5b":
                    dpo(folder, registry.load(DPO_DATASET, stage="dpo"), s, work, result)
                else:
                    full(folder, registry.load(SFT_DATASET), s, work, result)
            except Exception as exc:  # one failing workload (an OOM, a library bug) must not lose the others
                report["errors"][name] = _error(exc)
                if _interrupted(exc):  # finetune_kit stops training at a signal (SIGINT from a timeout): stop too
                    raise KeyboardInterrupt from None
            free_memory()  # outside the except: its traceback no longer holds the failed run's tensors
            result["workload_s"] = round(time.perf_counter() - t, 1)
            print(f"[train_methods] {name} done in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
            save()
    except KeyboardInterrupt:  # the runner's timeout sends SIGINT: keep what finished
        report["errors"]["interrupted"] = {"type": "KeyboardInterrupt", "message": "stopped by SIGINT (a timeout?)"}
        return _finish(report, opts, t_start, code=130)
    if not opts.keep_runs:
        shutil.rmtree(work / "runs", ignore_errors=True)
    return _finish(report, opts, t_start, code=1 if report["errors"] else 0)


def _interrupted(exc: BaseException) -> bool:
    """True for finetune_kit's TrainingInterrupted: training stopped by SIGINT/SIGTERM (e.g. a timeout)."""
    return any(cls.__name__ == "TrainingInterrupted" for cls in type(exc).__mro__)


def _error(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc)[:4000], "traceback": traceback.format_exc()[-6000:]}


def _finish(report: dict, opts: argparse.Namespace, t_start: float, *, code: int) -> int:
    report["finished_at"] = now_iso()
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_report(report, opts.out)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return code


if __name__ == "__main__":
    sys.exit(main())
