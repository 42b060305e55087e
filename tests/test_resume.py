"""Exact resume (issue 27) in process: the pipeline taken up at a clip from its saved state gives the frames an
uninterrupted call gives, bit for bit, from a snapshot of the memory or by replaying every clip's update."""

from __future__ import annotations

import copy

import pytest
import torch
from test_pipeline import FPC, make_inputs

from memo.pipeline import ResumeState

CLIPS = 4

pytestmark = pytest.mark.slow  # 4-clip renders (tests/test_job_state.py holds the fast checks)


def render(pipe, **overrides):
    """A 4-clip video; returns its frames per clip and the state handed out at each clip end."""
    states = []

    def keep(p, clip, frames):
        memory = p.temporal_memory.states
        states.append(
            dict(
                latents=p.clip_latents.clone(),
                noise=p.noise_generator.get_state(),
                memory={name: tuple(t.clone() for t in state) for name, state in memory.items()},
                memory_clip=p.memory_clip,
                frames=frames,
            )
        )

    args = dict(make_inputs(CLIPS), frames_per_clip=FPC, past_frames=FPC, num_inference_steps=2, seed=7)
    args.update(overrides)
    pipe(**args, output_type=None, callback_on_clip_end=keep)
    return states


@pytest.fixture(scope="module")
def whole(loaded_tiny_pipeline):
    """The uninterrupted 4-clip render of :func:`render`'s defaults, shared by the tests that only read it (each
    takes what it hands a resumed render as a copy, so none sees another's changes)."""
    return render(copy.deepcopy(loaded_tiny_pipeline))


@pytest.mark.parametrize("snapshot_clip", [-1, 0, 2], ids=["replay-all", "replay-two", "snapshot-at-stop"])
def test_resumed_frames_equal_an_uninterrupted_runs(tiny_pipeline, whole, snapshot_clip):
    assert all(state["memory_clip"] == clip for clip, state in enumerate(whole))
    resume_at = 3
    state = ResumeState(
        clip=resume_at,
        latents={clip: whole[clip]["latents"] for clip in range(resume_at)},
        memory=None if snapshot_clip == -1 else whole[snapshot_clip]["memory"],
        memory_clip=snapshot_clip,
        noise_state=whole[resume_at - 1]["noise"],
    )
    resumed = render(tiny_pipeline, resume_from=copy.deepcopy(state))
    assert len(resumed) == CLIPS - resume_at
    for clip, again in zip(range(resume_at, CLIPS), resumed):
        assert torch.equal(again["frames"], whole[clip]["frames"]), f"clip {clip} differs"
        assert torch.equal(again["latents"], whole[clip]["latents"])


def test_a_memory_that_already_holds_the_clip_skips_its_update(tiny_pipeline, whole):
    """A snapshot taken during clip k, after its first step (a stop by signal): clip k starts again from it."""
    state = ResumeState(
        clip=2,
        latents={1: whole[1]["latents"]},
        memory=whole[2]["memory"],
        memory_clip=2,
        noise_state=whole[1]["noise"],
    )
    resumed = render(tiny_pipeline, resume_from=copy.deepcopy(state))
    assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(resumed, whole[2:]))


def test_a_state_that_lacks_latents_is_refused(tiny_pipeline):
    with pytest.raises(ValueError, match="resumable point"):
        render(tiny_pipeline, resume_from=ResumeState(clip=2, latents={}, memory=None, memory_clip=-1))


def test_host_memory_and_deep_cache_resume_exactly(tiny_pipeline):
    """offload=model/group's memory (on the host, :class:`HostTemporalMemory`) restored from a snapshot, with
    speed=fast's feature cache and UniPC's multistep solver: the resumed clips equal the uninterrupted ones."""
    from memo.runtime.memory import HostTemporalMemory
    from memo.sampling.solvers import flow_scheduler

    def setup(pipe):
        pipe.memory_factory = lambda: HostTemporalMemory(torch.device("cpu"))
        pipe.scheduler = flow_scheduler("unipc", pipe.scheduler)
        return pipe

    fast = dict(deep_cache_interval=2, num_inference_steps=3)
    second = copy.deepcopy(tiny_pipeline)
    whole = render(setup(tiny_pipeline), **fast)
    state = ResumeState(
        clip=3,
        latents={c: whole[c]["latents"] for c in range(1, 3)},
        memory=whole[1]["memory"],
        memory_clip=1,
        noise_state=whole[2]["noise"],
    )
    resumed = render(setup(second), resume_from=state, **fast)
    assert torch.equal(resumed[0]["frames"], whole[3]["frames"])
