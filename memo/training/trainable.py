"""Which parameters train: whole networks, or the modules of a network whose names match patterns.

As in the original release: the projections train whole or not at all; the reference and diffusion nets,
when trained, train whole unless ``patterns`` are given, in which case only their modules whose qualified
name contains one of the patterns (e.g. "motion_modules", "audio_modules") train.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

PATTERNED = ("reference_net", "diffusion_net")


def select_trainable(
    networks: Mapping[str, nn.Module], train: Mapping[str, bool], patterns: Sequence[str] | None = None
) -> dict[str, int]:
    """Set ``requires_grad`` on ``networks`` and return the number of trainable parameters per network.

    Args:
        networks: name -> network.
        train: name -> whether that network trains.
        patterns: module-name substrings restricting the trained parts of the reference and diffusion nets.

    Raises ValueError when a pattern matches no module of a trained network, or nothing would train.
    """
    patterns = [p for p in (patterns or []) if p]
    counts = {}
    for name, network in networks.items():
        network.requires_grad_(False)
        if not train.get(name, False):
            counts[name] = 0
            continue
        if name in PATTERNED and patterns:
            matched = set()
            for module_name, module in network.named_modules():
                hits = [p for p in patterns if p in module_name]
                if hits:
                    matched.update(hits)
                    module.requires_grad_(True)
            if not matched:
                raise ValueError(f"None of the trainable_modules {patterns} names a module of {name}.")
        else:
            network.requires_grad_(True)
        counts[name] = sum(p.numel() for p in network.parameters() if p.requires_grad)
    if not any(counts.values()):
        raise ValueError("No parameter would train: check train_* and trainable_modules.")
    return counts
