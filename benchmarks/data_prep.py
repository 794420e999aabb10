# ruff: noqa: PLC0415  (each measured child imports only its own tool: they run in different interpreters)
"""Data preparation speed: finetune_kit against LLaMA-Factory 0.9.5 on the same alpaca-style data.

Generates N alpaca rows (deterministic, Chinese and English, alpaca-like lengths), writes them
with a ``dataset_info.json`` to a temporary folder, then measures, each tool in its own process:

* finetune_kit: reading (``DataSelection(DatasetRegistry.from_dir(...), names)``, or
  ``registry.load(...)`` with ``--fk-input conversations``) + ``tokenize_cached`` (template
  chatml, cutoff_len 1024, the bundled SmolLM2 tokenizer, ``num_workers``): rows/s, CPU time
  and peak memory (of the largest process, and summed over the process tree);
* finetune_kit again: the same call, answered by the tokenized cache;
* LLaMA-Factory: ``llamafactory.data.get_dataset`` as its trainer calls it (stage sft,
  do_train, ``preprocessing_num_workers``), run by its own interpreter (``--lf-python``), with
  a fresh ``HF_DATASETS_CACHE`` so its own cache does not make the first run free; its second
  run then uses that cache, for comparison with finetune_kit's.

Prints one JSON object: hardware, settings and both tools' numbers::

    python benchmarks/data_prep.py --lf-python $LF_VENV/bin/python
    python benchmarks/data_prep.py --rows 5000            # a quick run, finetune_kit only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DATASET = "bench_alpaca"
EN_WORDS = (
    "the of and to in is you that it for on are as with they at be this have from or one had by word but not "
    "what all were we when your can said there use an each which she do how their if will up other about out many "
    "then them these so some her would make like him into time has look two more write go see number no way could "
    "people my than first water been call who its now find long down day did get come made may part order refund "
    "shipping customer product price delivery return account password battery screen warranty model train data "
    "learning network function example value result question answer problem because however therefore explain "
    "describe summary important different between system service support please thank help information"
).split()
ZH_WORDS = (
    "我们 你 他 的 是 了 在 有 和 这个 那个 不 也 就 都 要 可以 没有 因为 所以 但是 如果 已经 现在 今天 明天 "
    "时间 问题 答案 订单 退款 快递 客服 产品 价格 质量 服务 用户 系统 数据 模型 学习 训练 方法 结果 重要 "
    "不同 之间 解释 描述 总结 帮助 信息 请 谢谢 您好 亲 发货 收到 地址 手机 电脑 屏幕 电池 保修 售后 退货 "
    "换货 优惠 活动 会员 积分 支付 账户 密码 中国 北京 上海 城市 文化 历史 经济 科技 发展 社会 教育 健康 "
    "环境 工作 生活 朋友 家庭 学生 老师 医生 公司 市场"
).split()
SYSTEMS = ("You are a helpful assistant.", "你是一个乐于助人的客服助手。", "")


def sentence(rng: random.Random, zh: bool, n: int) -> str:
    if zh:
        words = [rng.choice(ZH_WORDS) for _ in range(n)]
        out, i = [], 0
        while i < len(words):
            k = rng.randint(4, 12)
            out.append("".join(words[i : i + k]) + rng.choice("，。。？！"))
            i += k
        return "".join(out)
    words = [rng.choice(EN_WORDS) for _ in range(n)]
    out, i = [], 0
    while i < len(words):
        k = rng.randint(6, 18)
        chunk = " ".join(words[i : i + k])
        out.append(chunk[0].upper() + chunk[1:] + rng.choice("..?!,"))
        i += k
    return " ".join(out)


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows: half Chinese, half English; ~40% with an input, 10% with a system prompt, 5% with history."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        zh = rng.random() < 0.5
        scale = 0.6 if zh else 1.0  # a Chinese "word" here is ~2 characters, ~2-3 tokens for SmolLM2
        row = {
            "instruction": sentence(rng, zh, int(rng.randint(6, 40) * scale)),
            "input": sentence(rng, zh, int(rng.randint(10, 120) * scale)) if rng.random() < 0.4 else "",
            "output": sentence(rng, zh, int(min(rng.lognormvariate(4.8, 0.7), 900) * scale) + 1),
            "system": rng.choice(SYSTEMS) if rng.random() < 0.1 else "",
            "history": [],
        }
        if rng.random() < 0.05:
            row["history"] = [[sentence(rng, zh, rng.randint(5, 30)), sentence(rng, zh, rng.randint(20, 120))]]
        rows.append(row)
    return rows


def write_dataset(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{DATASET}.json", "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False)
    info = {
        DATASET: {
            "file_name": f"{DATASET}.json",
            "columns": {
                "prompt": "instruction",
                "query": "input",
                "response": "output",
                "system": "system",
                "history": "history",
            },
        }
    }
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


# ----- the measured runs (each in its own process) ------------------------------------------------
def child_finetune_kit(opts: argparse.Namespace) -> dict:
    """One finetune_kit run: read + tokenize through the cache; returns timings and output totals."""
    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    from finetune_kit.data.cache import DataSelection, tokenize_cached
    from finetune_kit.data.registry import DatasetRegistry
    from finetune_kit.data.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer)
    template = get_template(opts.template)
    t1 = time.perf_counter()
    registry = DatasetRegistry.from_dir(opts.data)
    data = DataSelection(registry, (DATASET,)) if opts.fk_input == "selection" else registry.load(DATASET)
    tokens = tokenize_cached(data, tokenizer, template, cutoff_len=opts.cutoff_len, num_workers=opts.workers)
    t2 = time.perf_counter()
    return {"startup_s": t1 - t0, "data_s": t2 - t1, **_totals(tokens.dataset.data.table, tokens.truncated)}


def child_llamafactory(opts: argparse.Namespace) -> dict:
    """One LLaMA-Factory run: ``get_dataset`` as ``llamafactory-cli train`` calls it (stage sft, do_train)."""
    t0 = time.perf_counter()
    import importlib.util
    import types

    if importlib.util.find_spec("torchaudio") is None:  # LF imports it; text-only runs never use it
        import transformers.utils.import_utils as iu

        iu.is_torchaudio_available()
        import peft  # noqa: F401

        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    import contextlib
    import io

    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    args = {
        "stage": "sft",
        "do_train": True,
        "model_name_or_path": opts.tokenizer,
        "finetuning_type": "lora",
        "dataset": DATASET,
        "dataset_dir": opts.data,
        "template": opts.template,
        "cutoff_len": opts.cutoff_len,
        "preprocessing_num_workers": opts.workers,
        "output_dir": str(Path(opts.scratch) / "lf_out"),
        "report_to": "none",
    }
    model_args, data_args, training_args, _, _ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    t1 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # LF prints a decoded example
        module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    t2 = time.perf_counter()
    ds = module["train_dataset"]
    return {"startup_s": t1 - t0, "data_s": t2 - t1, **_totals(ds.data.table, None)}


def _totals(table, truncated) -> dict:
    """Rows, tokens and trained tokens, from the Arrow offsets and values (no Python lists)."""
    import pyarrow.compute as pc

    labels = pc.list_flatten(table.column("labels"))
    return {
        "rows_out": table.num_rows,
        "tokens": int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0),
        "trained_tokens": int(pc.sum(pc.not_equal(labels, -100)).as_py() or 0),
        "truncated": truncated,
    }


def run_child(python: str, role: str, opts: argparse.Namespace, env: dict[str, str]) -> dict:
    """Run one measured child; add its wall time and peak memory (largest process, and the whole tree)."""
    out = Path(opts.scratch) / f"{role}-{time.monotonic_ns()}.json"
    cmd = [python, str(Path(__file__).resolve()), "--child", role, "--result", str(out)]
    cmd += ["--data", opts.data, "--tokenizer", opts.tokenizer, "--template", opts.template]
    cmd += ["--cutoff-len", str(opts.cutoff_len), "--workers", str(opts.workers), "--scratch", opts.scratch]
    cmd += ["--fk-input", opts.fk_input]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeMemory(proc.pid)
    sampler.start()
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{role} failed ({proc.returncode}):\n{output[-4000:]}")
    result = json.loads(out.read_text())
    result.update(
        wall_s=round(wall, 2),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
        peak_rss_largest_process_mib=round(usage.ru_maxrss / 1024),
        peak_rss_process_tree_mib=round(sampler.peak_rss / 2**20),
        peak_pss_process_tree_mib=round(sampler.peak_pss / 2**20),
    )
    return result


class TreeMemory(threading.Thread):
    """Samples the summed RSS and PSS (shared pages split between sharers) of a process and its children."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            rss = pss = 0
            for pid in self._tree():
                rss += _proc_kib(f"/proc/{pid}/status", "VmRSS:") * 1024
                pss += _proc_kib(f"/proc/{pid}/smaps_rollup", "Pss:") * 1024
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def _tree(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        tree, frontier = [self.pid], [self.pid]
        while frontier:
            frontier = [p for p, pp in parents.items() if pp in frontier]
            tree += frontier
        return tree


def _proc_kib(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def hardware() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    mem = _proc_kib("/proc/meminfo", "MemTotal:") / 2**20
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(mem, 1),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def bundled_tokenizer() -> str:
    from finetune_kit.models.source import ModelSource

    return str(ModelSource.bundled().resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="alpaca rows to generate (default 200000)")
    parser.add_argument("--workers", type=int, default=2, help="num_workers / preprocessing_num_workers")
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the bundled SmolLM2)")
    parser.add_argument("--lf-python", default=None, help="LLaMA-Factory's interpreter; LF is skipped without it")
    parser.add_argument("--fk-input", choices=("selection", "conversations"), default="selection")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--child", choices=("finetune_kit", "llamafactory"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)

    if opts.child:
        run = child_finetune_kit if opts.child == "finetune_kit" else child_llamafactory
        Path(opts.result).write_text(json.dumps(run(opts)))
        return 0

    report: dict = {"hardware": hardware()}
    scratch = Path(tempfile.mkdtemp(prefix="fk_data_prep_"))
    try:
        opts.scratch, opts.data = str(scratch), str(scratch / "data")
        opts.tokenizer = opts.tokenizer or bundled_tokenizer()
        t = time.perf_counter()
        write_dataset(Path(opts.data), make_rows(opts.rows))
        report["settings"] = {
            "rows": opts.rows,
            "data_file_mib": round((Path(opts.data) / f"{DATASET}.json").stat().st_size / 2**20, 1),
            "generate_s": round(time.perf_counter() - t, 1),
            "template": opts.template,
            "cutoff_len": opts.cutoff_len,
            "workers": opts.workers,
            "tokenizer": opts.tokenizer,
            "finetune_kit_input": opts.fk_input,
        }
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        fk_env = {**env, "FINETUNE_KIT_CACHE": str(scratch / "fk_cache")}
        first = run_child(sys.executable, "finetune_kit", opts, fk_env)
        second = run_child(sys.executable, "finetune_kit", opts, fk_env)
        report["finetune_kit"] = {"first_run": _rates(first, opts.rows), "cached_second_run": second}
        if opts.lf_python:
            lf_env = {
                **env,
                "DISABLE_VERSION_CHECK": "1",
                "HF_DATASETS_CACHE": str(scratch / "hf_datasets_cache"),
                "LLAMAFACTORY_VERBOSITY": "WARN",
                "WANDB_DISABLED": "true",
            }
            lf_first = run_child(opts.lf_python, "llamafactory", opts, lf_env)
            lf_second = run_child(opts.lf_python, "llamafactory", opts, lf_env)
            report["llamafactory"] = {"first_run": _rates(lf_first, opts.rows), "cached_second_run": lf_second}
            report["comparison"] = _compare(report["finetune_kit"], report["llamafactory"])
        else:
            report["llamafactory"] = "skipped: pass --lf-python /path/to/llamafactory/venv/bin/python"
    finally:
        if opts.keep:
            report["scratch"] = str(scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def _rates(run: dict, rows: int) -> dict:
    return {
        **run,
        "rows_per_s": round(rows / run["data_s"], 1),
        "rows_per_s_wall": round(rows / run["wall_s"], 1),
        "rows_per_cpu_s": round(rows / run["cpu_s"], 1),
    }


def _compare(fk: dict, lf: dict) -> dict:
    a, b = fk["first_run"], lf["first_run"]
    return {
        "speedup_rows_per_s": round(a["rows_per_s"] / b["rows_per_s"], 2),
        "speedup_wall": round(b["wall_s"] / a["wall_s"], 2),
        "speedup_rows_per_cpu_s": round(a["rows_per_cpu_s"] / b["rows_per_cpu_s"], 2),
        "peak_pss_tree_ratio": round(a["peak_pss_process_tree_mib"] / b["peak_pss_process_tree_mib"], 2),
        "peak_rss_largest_process_ratio": round(
            a["peak_rss_largest_process_mib"] / b["peak_rss_largest_process_mib"], 2
        ),
        "cached_second_run_data_s": round(fk["cached_second_run"]["data_s"], 2),
        "cached_second_run_wall_s": fk["cached_second_run"]["wall_s"],
        "same_output": all(a[k] == b[k] for k in ("rows_out", "tokens", "trained_tokens")),
        "goals": {
            "rows_per_s_at_least_2x": a["rows_per_s"] >= 2 * b["rows_per_s"],
            "peak_memory_not_above_lf": a["peak_pss_process_tree_mib"] <= b["peak_pss_process_tree_mib"],
            "cached_second_run_data_step_under_5s": fk["cached_second_run"]["data_s"] < 5,
            "cached_second_run_whole_process_under_5s": fk["cached_second_run"]["wall_s"] < 5,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
