"""The Evaluator stage: batch prediction scored with ROUGE/BLEU, and MMLU/CMMLU/C-Eval benchmarks.

Example::

    from finetune_kit.evaluate import Evaluator

    report = Evaluator(model).predict(DatasetRegistry.demo().load("shop_test"), output_dir="saves/predict")
    print(report)  # EvalReport(30 samples, rouge-1=..., rouge-2=..., rouge-l=..., bleu-4=..., ...)
    result = Evaluator(model).benchmark("mmlu_test", task_dir="data/mmlu", n_shot=5)
    print(result.format())  # Average / STEM / Social Sciences / Humanities / Other, then each subject
"""

from finetune_kit.evaluate.benchmark import BenchmarkPrediction, BenchmarkResult
from finetune_kit.evaluate.compare import Comparison, ComparisonRow
from finetune_kit.evaluate.config import BenchmarkConfig, PredictConfig
from finetune_kit.evaluate.evaluator import EVAL_GENERATION, Evaluator
from finetune_kit.evaluate.metrics import SCORE_KEYS, example_scores, generation_scores, per_example_scores
from finetune_kit.evaluate.predict import read_predictions
from finetune_kit.evaluate.result import EvalReport

__all__ = [
    "EVAL_GENERATION",
    "BenchmarkConfig",
    "BenchmarkPrediction",
    "BenchmarkResult",
    "Comparison",
    "ComparisonRow",
    "SCORE_KEYS",
    "EvalReport",
    "Evaluator",
    "PredictConfig",
    "example_scores",
    "generation_scores",
    "per_example_scores",
    "read_predictions",
]
