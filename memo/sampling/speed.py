"""Speed settings: fewer diffusion-net evaluations per clip, opt-in, with the exact path as the default.

Three training-free savings, each a setting of its own, and the ``speed`` preset that combines them:

- ``solver`` and ``solver_steps``: a second-order multistep flow-matching solver (``unipc``, diffusers'
  UniPCMultistepScheduler in its flow mode, see ``solvers.py``) needs fewer steps than Euler;
- ``guidance_start`` / ``guidance_end``: classifier-free guidance only on the steps in that fraction of the
  schedule, the conditional pass alone on the others (see ``guidance.py``);
- ``deep_cache_interval``: the whole diffusion net every N steps, only its outer layers in between, reusing
  the deep features (see ``deep_cache.py``).

``speed: exact`` (the default) resolves to Euler, every step guided and whole: today's computation, bit for
bit. ``speed: fast`` resolves to :data:`PRESETS` ``["fast"]``; a setting given explicitly wins over the
preset's value. :func:`resolve_speed` is the one place where this happens; ``guidance.plan_steps`` turns the
result into what each step of a clip computes.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from memo.sampling.guidance import ClassifierFreeGuidance
from memo.sampling.solvers import SOLVERS, flow_scheduler

SPEEDS = ("exact", "fast")

PRESETS: dict[str, dict] = {
    "exact": dict(solver="euler", step_fraction=1.0, guidance_start=0.0, guidance_end=1.0, deep_cache_interval=1),
    "fast": dict(solver="unipc", step_fraction=0.4, guidance_start=0.0, guidance_end=0.25, deep_cache_interval=2),
}
"""Each preset's value of every speed setting; its ``solver_steps`` is ``step_fraction`` of
``inference_steps``, rounded (at least 1): fast runs 8 steps for the default 20. The fast values were
chosen by counted FLOPs (``scripts/benchmark.py --flops``: 23 % of exact's at 512x512) and measured
fidelity (``scripts/measure_fidelity.py``); see README "Speed settings"."""


@dataclass(frozen=True)
class SpeedSettings:
    """What a clip's denoising computes.

    Attributes:
        solver: "euler" or "unipc".
        steps: denoising steps per clip (>= 1).
        guidance_window: (start, end), fractions 0..1 of the steps; step i is guided when
            ``start * steps <= i < end * steps``.
        deep_cache_interval: the whole net runs on steps 0, N, 2N...; 1 turns the cache off.
    """

    solver: str = "euler"
    steps: int = 20
    guidance_window: tuple[float, float] = (0.0, 1.0)
    deep_cache_interval: int = 1

    def pipeline_kwargs(self, guidance_scale: float) -> dict:
        """The keyword arguments of ``MemoPipeline.__call__`` that carry these settings, with classifier-free
        guidance of ``guidance_scale``; the solver is the pipeline's scheduler (:meth:`scheduler`)."""
        return dict(
            num_inference_steps=self.steps,
            guider=ClassifierFreeGuidance(guidance_scale, *self.guidance_window),
            deep_cache_interval=self.deep_cache_interval,
        )

    def scheduler(self, euler: FlowMatchEulerDiscreteScheduler) -> SchedulerMixin:
        """The scheduler of ``solver`` for a pipeline published with the ``euler`` scheduler."""
        return flow_scheduler(self.solver, euler)

    def describe(self) -> str:
        """One line for the log, e.g. "unipc, guided steps 0-25%, deep cache every 2"."""
        start, end = self.guidance_window
        cache = f"deep cache every {self.deep_cache_interval}" if self.deep_cache_interval > 1 else "no deep cache"
        return f"{self.solver}, guided steps {start:.0%}-{end:.0%}, {cache}"


def speed_problems(settings: dict) -> list[str]:
    """What is wrong with the speed settings in ``settings`` (a mapping of setting name to value; None =
    from the preset), as sentences for a :class:`~memo.settings.inference.ConfigError`."""
    problems = []
    if settings["speed"] not in SPEEDS:
        problems.append(f"speed must be one of {', '.join(SPEEDS)}, got {settings['speed']!r}")
    if settings["solver"] is not None and settings["solver"] not in SOLVERS:
        problems.append(f"solver must be one of {', '.join(SOLVERS)}, got {settings['solver']!r}")
    if settings["solver_steps"] is not None and settings["solver_steps"] <= 0:
        problems.append(f"solver_steps must be positive, got {settings['solver_steps']}")
    for name in ("guidance_start", "guidance_end"):
        if settings[name] is not None and not 0.0 <= settings[name] <= 1.0:
            problems.append(f"{name} must be a fraction of the steps in 0..1, got {settings[name]}")
    if settings["deep_cache_interval"] is not None and settings["deep_cache_interval"] <= 0:
        problems.append(f"deep_cache_interval must be 1 (off) or more, got {settings['deep_cache_interval']}")
    if not problems:
        start, end = _pick(settings, "guidance_start"), _pick(settings, "guidance_end")
        if start > end:
            problems.append(f"guidance_start ({start}) must not exceed guidance_end ({end})")
    return problems


def _pick(settings: dict, name: str):
    """The explicit value of ``name`` in ``settings``, else its preset's."""
    value = settings[name]
    return PRESETS[settings["speed"]][name] if value is None else value


def resolve_speed(settings: dict, inference_steps: int) -> SpeedSettings:
    """The :class:`SpeedSettings` of a validated mapping holding ``speed``, ``solver``, ``solver_steps``,
    ``guidance_start``, ``guidance_end`` and ``deep_cache_interval`` (None: the preset's value)."""
    steps = settings["solver_steps"]
    return SpeedSettings(
        solver=_pick(settings, "solver"),
        steps=preset_steps(settings["speed"], inference_steps) if steps is None else steps,
        guidance_window=(_pick(settings, "guidance_start"), _pick(settings, "guidance_end")),
        deep_cache_interval=_pick(settings, "deep_cache_interval"),
    )


def preset_steps(name: str, inference_steps: int) -> int:
    """The solver steps of preset ``name`` for ``inference_steps``."""
    return max(1, round(inference_steps * PRESETS[name]["step_fraction"]))


def preset(name: str, inference_steps: int = 20) -> SpeedSettings:
    """The :class:`SpeedSettings` of preset ``name`` ("exact" or "fast") with nothing overridden."""
    if name not in PRESETS:
        raise ValueError(f"speed must be one of {', '.join(SPEEDS)}, got {name!r}.")
    return resolve_speed({"speed": name, "solver_steps": None, **dict.fromkeys(PRESETS[name])}, inference_steps)


def variants(inference_steps: int = 20) -> dict[str, SpeedSettings]:
    """``exact``, each setting of the ``fast`` preset alone (the solver with and without its step count),
    and ``fast``: what the benchmark and the fidelity measurement compare."""
    fast, steps = PRESETS["fast"], preset_steps("fast", inference_steps)
    return {
        "exact": preset("exact", inference_steps),
        f"solver_steps={steps} (euler)": SpeedSettings(steps=steps),
        f"solver={fast['solver']} solver_steps={steps}": SpeedSettings(fast["solver"], steps),
        f"guidance_end={fast['guidance_end']}": SpeedSettings(
            steps=inference_steps, guidance_window=(fast["guidance_start"], fast["guidance_end"])
        ),
        f"deep_cache_interval={fast['deep_cache_interval']}": SpeedSettings(
            steps=inference_steps, deep_cache_interval=fast["deep_cache_interval"]
        ),
        "fast": preset("fast", inference_steps),
    }
