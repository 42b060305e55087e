"""Evaluation of generated talking videos in the paper's terms: FID, FVD, Sync-C / Sync-D / offset, CSIM, motion.

``scripts/evaluate.py`` is the command; :mod:`memo.evaluation.models` finds the metric networks,
:mod:`memo.evaluation.metrics` computes features and distances, :mod:`memo.evaluation.run` pairs, caches and
reports. docs/evaluation.md describes the protocol.
"""
