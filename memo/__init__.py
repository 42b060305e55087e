"""MEMO: memory-guided diffusion for expressive talking video."""

__version__ = "0.1.0"
