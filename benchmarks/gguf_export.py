# ruff: noqa: PLC0415  (torch and finetune_kit load inside the functions)
"""GGUF export on the CPU: how long each type takes, how large it is, and how often llama.cpp answers exactly
like the transformers model (``Exporter.to_gguf``'s parity check), for the bundled model or a fine-tune of it.

Every type the Exporter writes is measured in one run, from one merge: f32, f16, bf16 and q8_0 through
llama.cpp's converter, q4_K_M, q5_K_M and q6_K through llama.cpp's quantizer (from the f32 file).
Parity: greedy replies (32 new tokens) to each probe, compared token by token; a reply whose
first different token was within 0.05 logits of the transformers pick counts as a near tie.

    HF_HUB_OFFLINE=1 python benchmarks/gguf_export.py --out gguf_base.json
    HF_HUB_OFFLINE=1 python benchmarks/gguf_export.py --adapter quickstart_output/run-X/lora --probes shop_test \\
        --out gguf_shop.json       # the quickstart's fine-tune, probed with the demo test questions
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_K_M", "q5_K_M", "q6_K")


def probes_of(name: str) -> list[str] | None:
    """``default``: the Exporter's own probes; else the first user message of each example of a demo dataset."""
    if name == "default":
        return None
    from finetune_kit import DatasetRegistry

    examples = DatasetRegistry.demo().load(name).examples
    return [next(m["content"] for m in e.messages if m["role"] == "user") for e in examples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", help="a LoRA folder trained on the bundled model (default: the base model)")
    parser.add_argument("--template", default="chatml", help="chat template (the quickstart trains with chatml)")
    parser.add_argument("--probes", default="default", help="default, or a demo dataset name such as shop_test")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from finetune_kit import Exporter, ModelSource, __version__

    probes = probes_of(args.probes)
    source = ModelSource.bundled()
    if args.adapter:
        source = source.with_config(adapter_name_or_path=(args.adapter,))
    start = time.perf_counter()
    model = source.load(template=args.template)
    load_s = time.perf_counter() - start
    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    try:
        start = time.perf_counter()
        gguf = Exporter(model).to_gguf(work / "model", args.types.split(","), probes=probes)
        total_s = time.perf_counter() - start
        data = json.loads((gguf.folder / "parity.json").read_text())
        rows: list[dict[str, Any]] = []
        for f in gguf.files:
            report = data["files"][f.path.name]
            rows.append(
                {
                    "outtype": f.outtype,
                    "size_mb": round(f.size_mb, 1),
                    "write_s": round(f.seconds, 1),
                    "identical": report["identical"],
                    "near_ties": report["near_ties"],
                    "different": report["different"],
                    "total": report["total"],
                    "rate": report["rate"],
                    "chat_stops": report["chat_stops"],
                    "template_identical": report["template_identical"],
                    "passed": report["passed"],
                    "check_s": report["seconds"],
                }
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "gguf_export",
        "model": "bundled:smollm2-135m-instruct" + (f" + LoRA {Path(args.adapter).name}" if args.adapter else ""),
        "probes": args.probes,
        "n_probes": len(data["probes"]),
        "max_new_tokens": data["max_new_tokens"],
        "reference": data["reference"],
        "load_s": round(load_s, 1),
        "total_s": round(total_s, 1),
        "files": rows,
        "host": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "finetune_kit": __version__,
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
