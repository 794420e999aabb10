"""Agreement of ``Evaluator.benchmark(scoring="loglikelihood")`` with lm-evaluation-harness, on the same files.

For each benchmark, lm-evaluation-harness (PyPI ``lm-eval``, imported from ``--lm-eval-site``, a
``pip install --target`` folder, so its pins stay out of this environment) scores the same local
CSV files with task configs equal to its own ``mmlu`` / ``cmmlu`` / ``ceval-valid`` ones (prompt,
description, first-n exemplars), through its ``HFLM`` wrapper around the same in-memory model.
Prints one JSON object: per benchmark, both accuracies, their difference and the questions whose
predicted letter differs.

    pip install --target /tmp/lmeval --no-deps lm-eval==0.4.13 evaluate pytablewriter DataProperty mbstrdecoder \
        pathvalidate tabledata tcolorpy typepy chardet rouge-score absl-py sacrebleu portalocker tabulate colorama \
        lxml scikit-learn scipy joblib threadpoolctl sqlitedict word2number more_itertools
    python benchmarks/benchmark_agreement.py --lm-eval-site /tmp/lmeval --task-dir tests/evaluate/benchmarks
    python benchmarks/benchmark_agreement.py --lm-eval-site /tmp/lmeval --model tiny   # 2-layer random Llama
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from finetune_kit import Evaluator, ModelSource
from finetune_kit.evaluate.benchmark_data import HARNESS_EN, find_subjects, locate, resolve_task


def tiny_model(work: Path):
    """A 2-layer, hidden-64 random Llama with the bundled model's tokenizer (the tests' tiny model)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    bundled = ModelSource.bundled().resolve()
    tok = AutoTokenizer.from_pretrained(bundled)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    out = work / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return ModelSource.local(out).load(template="chatml", infer_dtype="float32")


def harness_tasks(task: str, task_dir: Path, folder: Path) -> list[str]:
    """Write one lm-evaluation-harness task YAML per subject, reading the local CSV files."""
    import yaml

    spec, split = resolve_task(task, None)
    split_folder = spec.folders[split]
    root = locate(spec, task_dir, split_folder)
    names = []
    for subject in find_subjects(spec, root, split_folder, None):
        question, answer = ("Question", "Answer") if spec.name == "cmmlu" else ("question", "answer")
        kwargs: dict = {
            "data_files": {
                "eval": str(root / split_folder / spec.file_name(subject, split_folder)),
                "dev": str(root / "dev" / spec.file_name(subject, "dev")),
            },
            "keep_default_na": False,
        }
        if spec.columns is None:
            kwargs["column_names"] = ["question", "A", "B", "C", "D", "answer"]
        cue = "Answer:" if spec.language == "en" else "答案："
        description = (HARNESS_EN if spec.language == "en" else spec.harness_zh).format(
            subject=spec.subjects[subject][0]
        )
        name = f"local_{spec.name}_{subject}"
        config = {
            "task": name,
            "dataset_path": "csv",
            "dataset_kwargs": kwargs,
            "test_split": "eval",
            "fewshot_split": "dev",
            "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "doc_to_text": f"{{{{{question}.strip()}}}}\nA. {{{{A}}}}\nB. {{{{B}}}}\nC. {{{{C}}}}\nD. {{{{D}}}}\n{cue}",
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": f"{{{{['A', 'B', 'C', 'D'].index({answer}.strip())}}}}",
            "description": description,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-eval-site", required=True, help="folder with lm-eval installed (pip install --target)")
    parser.add_argument("--task-dir", default="tests/evaluate/benchmarks")
    parser.add_argument("--tasks", default="mmlu_test,cmmlu_test,ceval_validation")
    parser.add_argument("--model", choices=["bundled", "tiny"], default="bundled")
    parser.add_argument("--n-shot", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, args.lm_eval_site)
    import lm_eval  # noqa: PLC0415  (from --lm-eval-site, known only now)
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="agreement-"))
    lm = tiny_model(work) if args.model == "tiny" else ModelSource.bundled().load()
    harness_lm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=args.batch)
    report: dict = {"model": args.model, "n_shot": args.n_shot, "lm_eval": lm_eval.__version__, "tasks": {}}
    for task in args.tasks.split(","):
        ours = Evaluator(lm).benchmark(
            task, task_dir=args.task_dir, n_shot=args.n_shot, scoring="loglikelihood", batch_size=args.batch
        )
        folder = work / task
        folder.mkdir()
        names = harness_tasks(task, Path(args.task_dir), folder)
        out = lm_eval.simple_evaluate(
            model=harness_lm,
            tasks=names,
            num_fewshot=args.n_shot,
            task_manager=TaskManager(include_path=str(folder)),
            log_samples=True,
        )
        theirs: list[tuple[str, int, str]] = []
        their_scores: list[list[float]] = []
        for name in names:
            subject = name.removeprefix(f"local_{ours.task}_")
            for sample in sorted(out["samples"][name], key=lambda s: s["doc_id"]):
                scores = [float(r[0]) for r in sample["filtered_resps"]]
                their_scores.append(scores)
                theirs.append((subject, sample["doc_id"], "ABCD"[scores.index(max(scores))]))
        gap = max(
            abs(a - b)
            for p, t in zip(ours.predictions, their_scores, strict=True)
            for a, b in zip(p.scores, t, strict=True)
        )
        mine = [(p.subject, i, p.prediction) for i, p in _positions(ours.predictions)]
        correct = sum(p.correct for p in ours.predictions)
        gold = {(p.subject, i): p.answer for i, p in _positions(ours.predictions)}
        their_acc = 100 * sum(gold[(s, i)] == letter for s, i, letter in theirs) / len(theirs)
        report["tasks"][task] = {
            "questions": len(mine),
            "finetune_kit": round(100 * correct / len(mine), 2),
            "lm_eval": round(their_acc, 2),
            "difference": round(100 * correct / len(mine) - their_acc, 2),
            "different_predictions": [m for m, t in zip(mine, theirs, strict=True) if m != t],
            "max_loglikelihood_difference": gap,
        }
    print(json.dumps(report, indent=2, ensure_ascii=False))


def _positions(predictions):
    seen: dict[str, int] = {}
    for p in predictions:
        seen[p.subject] = seen.get(p.subject, -1) + 1
        yield seen[p.subject], p


if __name__ == "__main__":
    main()
