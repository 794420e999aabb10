"""LoRA training."""
