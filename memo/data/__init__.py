"""Training data.

``scripts/prepare_data.py`` (with :mod:`memo.data.prepare` and :mod:`memo.data.store`) turns a folder of
videos into a data directory holding ``metadata.jsonl`` and, per video, safetensors files of the audio
windows, the face embedding, the per-frame emotion labels and the separated vocals.
:class:`~memo.data.dataset.TalkingVideoDataset` reads one or more such directories and serves random
training clips of them, with the frames before each clip and a reference frame.
"""

from memo.data.dataset import TalkingVideoDataset, load_metadata

__all__ = ["TalkingVideoDataset", "load_metadata"]
