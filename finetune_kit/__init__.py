"""finetune_kit: LLM fine-tuning as a typed, fluent library."""
__version__ = "0.1.0"
