"""Model sources and loaded models."""
