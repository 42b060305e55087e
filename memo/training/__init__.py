"""Finetuning MEMO on prepared talking videos (the entry point is ``finetune.py``).

* :mod:`memo.settings.training` — defaults, loading, overrides and checks of the configuration;
* :mod:`memo.training.flow_matching` — timestep sampling, noising, the weighted x0 loss, robust filtering;
* :mod:`memo.training.conditioning` — image / audio / emotion dropout for classifier-free guidance;
* :mod:`memo.training.model` — the four networks as one module predicting a batch's velocity;
* :mod:`memo.training.trainable` — which networks or modules train;
* :mod:`memo.training.optim` — optimizer and learning-rate schedule;
* :mod:`memo.training.checkpointing` — checkpoint folders, rotation, resumption, published layout;
* :mod:`memo.training.validation` — preview videos rendered during training;
* :mod:`memo.training.loop` — the accelerate training loop tying them together.
"""
