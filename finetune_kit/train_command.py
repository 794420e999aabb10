"""What ``finetune-kit train`` reads: its config sections and its cross-section rules.

Shared by the command line and the board (``finetune-kit webui``), so a YAML the board accepts is
one the command runs, and the other way round.
"""

from __future__ import annotations

from finetune_kit.config.parse import Built
from finetune_kit.config.run import RunConfig
from finetune_kit.data.config import DataConfig, EncodingConfig
from finetune_kit.evaluate.config import PredictConfig
from finetune_kit.models.config import ModelConfig
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.train.config import LoraConfig, MethodConfig, PreferenceConfig, TrainingConfig

TRAIN_SECTIONS = (
    RunConfig,
    ModelConfig,
    DataConfig,
    EncodingConfig,
    MethodConfig,
    PreferenceConfig,
    LoraConfig,
    TrainingConfig,
    GenerationConfig,
    PredictConfig,
)


def train_checks(built: Built) -> list[str]:
    """Cross-section rules of ``finetune-kit train`` (reported with every other problem)."""
    run, data = built[RunConfig], built[DataConfig]
    problems = []
    if run.do_train and not data.dataset:
        problems.append("do_train needs a dataset. Fix: dataset: name (from dataset_dir/dataset_info.json)")
    if run.do_predict and not data.eval_dataset:
        problems.append("do_predict needs eval_dataset. Fix: eval_dataset: name")
    if data.eval_dataset and data.val_size:
        problems.append("val_size and eval_dataset cannot both be set (as in LLaMA-Factory); pick one")
    return problems
