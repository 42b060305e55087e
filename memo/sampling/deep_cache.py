"""Deep-feature cache: reuse the diffusion net's deep features across neighbouring denoising steps.

DeepCache (Ma et al., 2024, arXiv 2312.00858) observes that a UNet's deep features change little from one
denoising step to the next, while its outermost layers are cheap enough to rerun. A *full* step runs the
whole net and keeps what enters the outer layers of the last up block: the hidden state and, since MEMO's
audio tokens flow through every audio module of the net, the audio tokens at that point. A *shallow* step
then runs only the input convolution, the first ``outer_layers - 1`` layers of the first down block, the
last ``outer_layers`` layers of the last up block (whose skip connections those produce) and the output
layers, and takes everything deeper from the cache. ``outer_layers=2`` is DeepCache's own choice for
Stable Diffusion's UNet (skip branch 0 after the first layer).

The temporal memory is only read in shallow steps; a step that updates it is always a full step.
"""

from __future__ import annotations

from memo.models.diffusion_net import DeepFeatures


class DeepFeatureCache:
    """The deep features of the last whole step of a clip (one cache per clip).

    Args:
        outer_layers: layers of the last up block that shallow steps rerun, 1..3 for MEMO's net (3 layers
            per up block); the first down block reruns one layer fewer.

    Rows are laid out as the diffusion net's frames, (batch*frames, ...). Features kept from a batch of two
    (the unconditional and conditional halves of guidance) also serve a conditional-only step: the second
    half is taken. A shallow step whose batch the cache cannot serve raises ``RuntimeError``.
    """

    def __init__(self, outer_layers: int = 2):
        if not 1 <= outer_layers <= 3:
            raise ValueError(f"outer_layers must be 1, 2 or 3, got {outer_layers}.")
        self.outer_layers = outer_layers
        self.features: DeepFeatures | None = None
        self.batch = 0

    def can_serve(self, batch: int) -> bool:
        """Whether a shallow step with ``batch`` items (1 or 2) can run on the kept features."""
        return self.features is not None and (self.batch == batch or (self.batch == 2 and batch == 1))

    def store(self, features: DeepFeatures, batch: int) -> None:
        """Keep the deep features of a whole step of ``batch`` items."""
        self.features, self.batch = features, batch

    def load(self, batch: int) -> DeepFeatures:
        """The kept features for a shallow step of ``batch`` items."""
        if not self.can_serve(batch):
            raise RuntimeError(
                f"The deep-feature cache holds {'nothing' if self.features is None else f'a batch of {self.batch}'}; "
                f"a shallow step of batch {batch} needs a whole step of that batch (or of 2) before it."
            )
        if self.batch == batch:
            return self.features
        hidden, audio, outer_layers = self.features
        return DeepFeatures(hidden[hidden.shape[0] // 2 :], audio[audio.shape[0] // 2 :], outer_layers)
