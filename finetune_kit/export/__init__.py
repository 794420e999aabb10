"""Merging and exporting models."""
