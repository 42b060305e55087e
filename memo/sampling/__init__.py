"""Sampling: the parts of the denoising loop (solvers, speed presets, guidance window, deep-feature cache)."""
