"""Config dataclasses, and the YAML/CLI parser that maps LLaMA-Factory keys onto them."""

from finetune_kit.config.base import StageConfig, option

__all__ = ["StageConfig", "option"]
