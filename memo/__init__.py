"""MEMO: memory-guided diffusion for expressive talking video."""

from memo.environment import apply_library_defaults

__version__ = "0.1.0"

apply_library_defaults()  # before any module of the package imports torch._dynamo or onnxruntime
