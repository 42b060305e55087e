"""A torch Dataset of random clips from prepared talking videos.

Each item of the dataset is one video; reading it draws a random clip of ``n_sample_frames`` consecutive
frames, the ``num_past_frames`` frames before the clip (what the model conditions on as its motion
history), a random reference frame of the same video, and the clip's slice of the prepared features.
Frames are decoded with decord, only the ones needed, then resized to cover the training size and
centre-cropped to it, in [-1, 1].

Augmentations of the original MEMO training data, each with its own probability:

* ``past_first_frame_ratio``: the past frames are all replaced by the clip's first frame;
* ``past_zero_ratio``: the past frames are all set to 0 (mid grey), as at the start of a video;
* ``audio_start_ratio``: the audio windows of the clip's first frames are padded with their centre frame,
  as the audio windows at the very start of a recording are.

With ``dynamic_past_frames`` the clip may start anywhere, and the number of real past frames is drawn
from 0 up to ``num_past_frames`` (and up to the frames available); the missing oldest ones are filled
with the reference frame, as the pipeline fills the history before the first generated frames.

A sample that cannot be read (missing or unreadable file, a video too short for a clip, features whose
shape or length does not match the video) is replaced by another random video and counted: see
``num_replaced`` (this process) and each sample's ``replaced`` field (so that a training loop can add up
the replacements made in its dataloader workers). After ``max_attempts`` failures in a row the dataset
raises an error listing them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from memo.settings.training import DataSettings

from memo.constants import NUM_EMOTIONS
from memo.sampling.conditioning import clip_emotion

logger = logging.getLogger(__name__)

FEATURE_KEYS = {"audio_emb": "audio_emb", "face_emb": "face_emb", "audio_emotion": "emotion"}
"""Metadata field -> the tensor name inside its safetensors file."""


def load_metadata(sources: Iterable[str | os.PathLike]) -> list[dict]:
    """Read the videos listed by each source: a data directory holding ``metadata.jsonl`` or the file itself.

    Relative paths in an entry are resolved against the directory of its metadata file. Each returned
    entry is the JSON object with the paths made absolute. A line that is not a JSON object (such as a
    last line cut short by a crash of the preparation) is skipped with a warning.
    """
    entries = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / "metadata.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"No prepared data at {source}: expected a directory with metadata.jsonl or the file itself."
            )
        root = path.parent.resolve()
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                entry = err
            if not isinstance(entry, dict):
                logger.warning("Skipping %s:%d, which is not a JSON object: %s", path, number, line[:200])
                continue
            for key in ("video", "vocals", *FEATURE_KEYS):
                if isinstance(entry.get(key), str):
                    entry[key] = str(root / entry[key])
            entry.setdefault("id", f"{path}:{number}")
            entries.append(entry)
    if not entries:
        raise ValueError(f"The prepared data {list(map(str, sources))} lists no videos.")
    return entries


def resize_and_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, H0, W0, 3) uint8 frames -> (N, 3, height, width) in [-1, 1], scaled to cover and centre-cropped."""
    frames = frames.permute(0, 3, 1, 2).float()
    h0, w0 = frames.shape[-2:]
    scale = max(height / h0, width / w0)
    size = (max(height, round(h0 * scale)), max(width, round(w0 * scale)))
    if size != (h0, w0):
        frames = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    frames = frames[:, :, top : top + height, left : left + width]
    return (frames / 127.5 - 1).clamp(-1, 1)


def _randint(low: int, high: int) -> int:
    """A uniform integer in [low, high] from torch's generator (seeded per dataloader worker)."""
    return int(torch.randint(low, high + 1, ()).item())


def _chance(p: float) -> bool:
    return p > 0 and float(torch.rand(())) < p


class TalkingVideoDataset(Dataset):
    """Random training clips from prepared talking videos (see the module docstring).

    Args:
        sources: data directories (each with a ``metadata.jsonl``) or metadata files.
        width, height: the training resolution.
        n_sample_frames: frames per clip.
        num_past_frames: past frames given with each clip (the maximum with ``dynamic_past_frames``).
        dynamic_past_frames: draw how many of them are real frames, the rest being the reference frame.
        past_first_frame_ratio, past_zero_ratio, audio_start_ratio: augmentation probabilities.
        audio_window_shape: the expected (window, layers, dim) of an audio window; checked when given.
        face_dim: the expected face-embedding size; checked when given.
        max_attempts: samples tried in a row before giving up with an error.
        length_tolerance: frames by which the video and its features may differ in length (decoders do not
            always agree on the last frame); the clip is drawn from the frames all of them have.
        entries: the metadata of ``sources`` when the caller has read it already (:func:`load_metadata`).
    """

    def __init__(
        self,
        sources: Sequence[str | os.PathLike],
        width: int,
        height: int,
        n_sample_frames: int = 16,
        num_past_frames: int = 16,
        dynamic_past_frames: bool = False,
        past_first_frame_ratio: float = 0.0,
        past_zero_ratio: float = 0.0,
        audio_start_ratio: float = 0.0,
        audio_window_shape: Sequence[int] | None = None,
        face_dim: int | None = 512,
        max_attempts: int = 20,
        length_tolerance: int = 2,
        entries: list[dict] | None = None,
    ):
        super().__init__()
        if n_sample_frames < 1 or num_past_frames < 0:
            raise ValueError("n_sample_frames must be positive and num_past_frames non-negative.")
        self.entries = entries if entries is not None else load_metadata(sources)
        self.width, self.height = int(width), int(height)
        self.n_sample_frames = int(n_sample_frames)
        self.num_past_frames = int(num_past_frames)
        self.dynamic_past_frames = bool(dynamic_past_frames)
        self.past_first_frame_ratio = float(past_first_frame_ratio)
        self.past_zero_ratio = float(past_zero_ratio)
        self.audio_start_ratio = float(audio_start_ratio)
        self.audio_window_shape = tuple(audio_window_shape) if audio_window_shape is not None else None
        self.face_dim = face_dim
        self.max_attempts = int(max_attempts)
        self.length_tolerance = int(length_tolerance)
        self.num_replaced = 0
        self.bad_entries: dict[int, str] = {}

    @classmethod
    def from_settings(
        cls,
        settings: DataSettings,
        entries: list[dict],
        audio_window_shape: Sequence[int] | None,
        face_dim: int | None,
    ) -> TalkingVideoDataset:
        """The dataset of the finetuning ``data`` section over ``entries`` (:func:`load_metadata` of its
        ``data_dirs``, read once by the caller)."""
        return cls(
            settings.data_dirs,
            width=settings.width,
            height=settings.height,
            n_sample_frames=settings.num_generated_frames_per_clip,
            num_past_frames=settings.num_past_frames,
            dynamic_past_frames=settings.dynamic_past_frames,
            past_first_frame_ratio=settings.past_first_frame_ratio,
            past_zero_ratio=settings.past_zero_ratio,
            audio_start_ratio=settings.audio_start_ratio,
            audio_window_shape=audio_window_shape,
            face_dim=face_dim,
            max_attempts=settings.max_attempts,
            length_tolerance=settings.length_tolerance,
            entries=entries,
        )

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        errors = []
        for _ in range(self.max_attempts):
            try:
                sample = self.load(index)
            except Exception as err:  # noqa: BLE001 - any unreadable sample is replaced, whatever the library raised
                entry_id = self.entries[index].get("id", index)
                errors.append(f"{entry_id}: {type(err).__name__}: {err}")
                if index not in self.bad_entries:
                    logger.warning("Replacing sample %s, which cannot be used: %s", entry_id, errors[-1])
                self.bad_entries[index] = errors[-1]
                self.num_replaced += 1
                index = self._replacement()
                continue
            sample["replaced"] = len(errors)
            return sample
        raise RuntimeError(
            f"{self.max_attempts} samples in a row could not be loaded; check the prepared data. Errors:\n  "
            + "\n  ".join(errors)
        )

    def _replacement(self) -> int:
        """A random index, avoiding the entries already found unusable while others remain."""
        usable = len(self.entries) - len(self.bad_entries)
        if usable <= 0:
            return _randint(0, len(self.entries) - 1)
        pick = _randint(0, usable - 1)
        for index in range(len(self.entries)):
            if index not in self.bad_entries:
                if pick == 0:
                    return index
                pick -= 1
        return 0

    # -- reading one sample --------------------------------------------------------------------------

    def _feature(self, entry: dict, key: str) -> torch.Tensor:
        if key not in entry:
            raise KeyError(f"the metadata has no {key!r} path")
        tensors = load_file(entry[key])
        name = FEATURE_KEYS[key]
        if name not in tensors:
            raise KeyError(f"{entry[key]} holds no tensor {name!r} (has {sorted(tensors)})")
        return tensors[name]

    def load(self, index: int) -> dict:
        """Read one random sample of video ``index``; raises on any problem with its files."""
        import decord  # imported here so that the dataset module loads without it

        entry = self.entries[index]
        audio = self._feature(entry, "audio_emb").float()
        emotion = self._feature(entry, "audio_emotion").long()
        face = self._feature(entry, "face_emb").float().reshape(-1)
        if audio.dim() != 4 or (self.audio_window_shape and tuple(audio.shape[1:]) != self.audio_window_shape):
            expected = (
                ("frames", *self.audio_window_shape) if self.audio_window_shape else "(frames, window, layers, dim)"
            )
            raise ValueError(f"audio_emb has shape {tuple(audio.shape)}, expected {expected}")
        if emotion.dim() != 1 or (emotion.numel() and (emotion.min() < 0 or emotion.max() >= NUM_EMOTIONS)):
            raise ValueError(
                f"emotion must be (frames,) labels in 0..{NUM_EMOTIONS - 1}, got shape {tuple(emotion.shape)}"
            )
        if self.face_dim is not None and face.numel() != self.face_dim:
            raise ValueError(f"face_emb has {face.numel()} values, expected {self.face_dim}")

        if "video" not in entry:
            raise KeyError("the metadata has no 'video' path")
        if not Path(entry["video"]).is_file():
            raise FileNotFoundError(f"no video at {entry['video']}")
        reader = decord.VideoReader(entry["video"], num_threads=1)
        lengths = {"video": len(reader), "audio_emb": audio.shape[0], "audio_emotion": emotion.shape[0]}
        if max(lengths.values()) - min(lengths.values()) > self.length_tolerance:
            raise ValueError(f"frame counts disagree: {lengths}")
        length = min(lengths.values())

        clip, past = self.n_sample_frames, self.num_past_frames
        if self.dynamic_past_frames:
            if length < clip:
                raise ValueError(f"the video has {length} frames, fewer than the {clip} of a clip")
            start = _randint(0, length - clip)
            real_past = _randint(0, min(past, start))
        else:
            if length < clip + past:
                raise ValueError(f"the video has {length} frames, fewer than a clip and its past ({clip} + {past})")
            start = _randint(past, length - clip)
            real_past = past
        reference_index = _randint(0, length - 1)

        clip_indices = list(range(start, start + clip))
        past_indices = list(range(start - real_past, start))
        wanted = sorted({reference_index, *clip_indices, *past_indices})
        decoded = torch.from_numpy(reader.get_batch(wanted).asnumpy())
        del reader
        if decoded.dim() != 4 or decoded.shape[0] != len(wanted) or decoded.shape[-1] != 3:
            raise ValueError(f"decoding gave frames of shape {tuple(decoded.shape)}")
        frames = resize_and_crop(decoded, self.height, self.width)
        row = {frame: i for i, frame in enumerate(wanted)}

        pixel_values = frames[[row[i] for i in clip_indices]]
        reference = frames[row[reference_index]][None]
        history = frames[[row[i] for i in past_indices]]
        if real_past < past:
            history = torch.cat([reference.expand(past - real_past, -1, -1, -1), history])
        if _chance(self.past_first_frame_ratio):
            history = pixel_values[:1].expand(past, -1, -1, -1)
        if _chance(self.past_zero_ratio):
            history = torch.zeros_like(history)

        audio_emb = audio[start : start + clip].clone()
        if _chance(self.audio_start_ratio):
            margin = audio_emb.shape[1] // 2
            for i in range(min(margin, clip)):
                audio_emb[i, : margin - i] = audio_emb[i, margin - i]
        emotion_frames = emotion[start : start + clip]

        return {
            "pixel_values": pixel_values.contiguous(),
            "reference_values": torch.cat([reference, history]).contiguous(),
            "face_emb": face,
            "audio_emb": audio_emb,
            "emotion": torch.tensor(clip_emotion(emotion_frames), dtype=torch.long),
            "emotion_frames": emotion_frames.clone(),
            "num_past": real_past,
            "id": str(entry.get("id", index)),
        }
