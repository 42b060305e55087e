"""Finetuning MEMO on prepared talking videos (the entry point is ``finetune.py``).

* :mod:`memo.settings.training` — the settings, in typed sections, loaded and checked once;
* :mod:`memo.training.networks` — the checkpoint and VAE found, loaded, and made ready to train;
* :mod:`memo.training.run` — the run's parts (accelerator, model, optimizer, data, EMA), built once;
* :mod:`memo.training.batches` — the dataset, its loader, and the batches of a (resumed) run;
* :mod:`memo.training.step` — one batch of training and the bookkeeping of an optimizer step;
* :mod:`memo.training.flow_matching` — timestep sampling, noising, the weighted x0 loss, robust filtering;
* :mod:`memo.training.conditioning` — image / audio / emotion dropout for classifier-free guidance;
* :mod:`memo.training.model` — the four networks as one module predicting a batch's velocity;
* :mod:`memo.training.trainable` — which networks or modules train;
* :mod:`memo.training.optim` — optimizer and learning-rate schedule;
* :mod:`memo.training.checkpointing` — checkpoint folders, rotation, resumption, published layout;
* :mod:`memo.training.saving` — writing checkpoints with accelerate;
* :mod:`memo.training.validation` — preview videos rendered during training;
* :mod:`memo.training.loop` — the loop tying them together.
"""
