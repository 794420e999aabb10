"""The Evaluator stage: batch prediction on a dataset and LLaMA-Factory-compatible ROUGE/BLEU.

Example::

    from finetune_kit.evaluate import Evaluator

    report = Evaluator(model).predict(DatasetRegistry.demo().load("shop_test"), output_dir="saves/predict")
    print(report)  # EvalReport(30 samples, rouge-1=..., rouge-2=..., rouge-l=..., bleu-4=..., ...)
"""

from finetune_kit.evaluate.config import PredictConfig
from finetune_kit.evaluate.evaluator import EVAL_GENERATION, Evaluator
from finetune_kit.evaluate.metrics import SCORE_KEYS, example_scores, generation_scores, per_example_scores
from finetune_kit.evaluate.predict import read_predictions
from finetune_kit.evaluate.result import EvalReport

__all__ = [
    "EVAL_GENERATION",
    "SCORE_KEYS",
    "EvalReport",
    "Evaluator",
    "PredictConfig",
    "example_scores",
    "generation_scores",
    "per_example_scores",
    "read_predictions",
]
