"""Flow-matching solvers: the published Euler scheduler, or diffusers' UniPC multistep solver on its sigmas.

MEMO's networks predict the flow-matching velocity and were published with diffusers'
``FlowMatchEulerDiscreteScheduler()`` (shift 1: sigmas evenly spaced from 1 down to 1/1000, then 0).
``unipc`` is diffusers' ``UniPCMultistepScheduler`` in its flow mode (``use_flow_sigmas``,
``prediction_type="flow_prediction"``, shift 1 as the Euler scheduler), a second-order predictor-corrector
multistep solver (Zhao et al., 2023, arXiv 2302.04867). Its N noise levels are those of N + 1 Euler steps
without the last one (from 1 down to 1/1000 evenly, then straight to 0): a multistep solver steps in
log-SNR, where Euler's last step, from 1/1000 to 0, would be a long and inaccurate one
(tests/test_speed.py measures both on a flow with a known solution).
"""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SOLVERS = ("euler", "unipc")
"""The ``solver`` setting's choices: the published Euler scheduler, or UniPC on its sigmas."""


def flow_scheduler(solver: str, euler: FlowMatchEulerDiscreteScheduler) -> SchedulerMixin:
    """The scheduler of ``solver`` ("euler": ``euler`` itself; "unipc") for a model run with ``euler``."""
    if solver == "euler":
        return euler
    if solver == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=euler.config.num_train_timesteps,
            solver_order=2,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=euler.config.shift,
        )
    raise ValueError(f"Unknown solver {solver!r}; known: euler, unipc.")
