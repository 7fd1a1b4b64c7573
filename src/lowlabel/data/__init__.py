"""Data in: sources, deterministic splits, the prepared store, augmentation recipes (CPU and device), datasets and samplers."""
