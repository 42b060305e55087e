"""The pieces of exact resume that need no render (issue 27): a job's fingerprint and its first difference, the
progress folder's records and memory snapshot read back, its lock, the playlist's text, a segment's sound."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from conftest import REPO

import memo.io.job_state
from memo.io.audio import decode_audio
from memo.io.job_state import (
    FIRST_SNAPSHOT_SECONDS,
    ClipRecord,
    JobBusyError,
    JobState,
    first_difference,
    snapshot_due,
    state_folder,
)
from memo.io.segments import SOUND_NAME, SegmentWriter, assemble, encode_sound, playlist_text, segment_name
from memo.settings.inference import JOB_NEUTRAL_SETTINGS, InferenceConfig
from memo.settings.schema import setting_names

JOB = {"version": "0.1.0", "image": "ab", "audio": "cd", "seed": "42", "emotion": "auto", "resolution": "512"}


def test_first_difference_names_the_setting_or_the_input():
    assert first_difference(JOB, dict(JOB)) is None
    assert first_difference(JOB, {**JOB, "seed": "7"}) == "seed differs (7, was 42)"
    assert first_difference(JOB, {**JOB, "audio": "ef"}) == "the audio differs"
    assert first_difference({**JOB, "crf": "18"}, JOB) == "crf differs (unset, was 18)"


def test_only_the_neutral_settings_stay_out_of_the_fingerprint():
    names = set(setting_names(InferenceConfig))
    assert set(JOB_NEUTRAL_SETTINGS) <= names
    assert {"crf", "offload", "speed", "seed", "paste_back"}.isdisjoint(JOB_NEUTRAL_SETTINGS)


def test_records_and_memory_round_trip_and_a_snapshot_drops_older_latents(tmp_path):
    state = JobState(tmp_path / "out.mp4", JOB).open()
    try:
        assert state.folder == state_folder(tmp_path / "out.mp4") == tmp_path / ".out.mp4.resume"
        generator = torch.Generator().manual_seed(3)
        for clip in range(4):
            state.segment(clip).write_bytes(b"ts")
            latents = torch.randn(1, 4, 2, 8, 8, generator=generator)
            state.save_clip(clip, ClipRecord(latents, generator.get_state(), 1.5))
        state.segment(5).write_bytes(b"ts")  # a segment without its record (clip 4 missing): not done
        assert state.done_clips() == 4 and state.seconds_kept(4) == 6.0
        back = state.load_clip(3)
        assert back.latents.shape == (1, 4, 2, 8, 8) and torch.equal(back.noise_state, generator.get_state())
        memory = {"down.0": (torch.ones(2, 2, 3, 3), torch.zeros(2, 2, 3))}
        assert state.load_memory() == (-1, None)
        state.save_memory(3, memory)
        clip, states = state.load_memory()
        assert clip == 3 and torch.equal(states["down.0"][0], memory["down.0"][0])
        # replay from the snapshot of clip 3 reads clip 2's and 3's latents at most; the older ones are gone
        assert [state.load_clip(c).latents is None for c in range(4)] == [True, True, False, False]
    finally:
        state.close()


@pytest.mark.parametrize("clip_seconds", [2.0, 6.9, 45.0])
def test_snapshots_bound_a_replay_to_half_the_time_rendered_and_come_every_interval_later(clip_seconds):
    """A render of 3 hours, clip by clip, with snapshots where :func:`snapshot_due` says: a kill -9 just before
    any clip's end replays the clips since the last snapshot; after the first minute that is never more than
    half the time rendered (then a tenth of it at most once an hour is rendered), and an hour holds 10 snapshots
    at most with ``every`` 10 minutes. ``every`` 0 snapshots after every clip."""
    every = 600.0
    rendered, held, snapshots, worst_early, worst_late = 0.0, 0.0, [], 0.0, 0.0
    while rendered < 3 * 3600:
        rendered += clip_seconds
        replay = rendered - held  # rendering a kill -9 at this clip's end, before its snapshot, replays
        if rendered > FIRST_SNAPSHOT_SECONDS + clip_seconds:
            worst_early = max(worst_early, replay / rendered)
        if rendered > 3600:
            worst_late = max(worst_late, replay / rendered)
        if snapshot_due(rendered - held, held, every):
            held = rendered
            snapshots.append(rendered)
    assert worst_early <= 0.5 + clip_seconds / FIRST_SNAPSHOT_SECONDS
    assert worst_late <= (every + clip_seconds) / 3600
    assert sum(1 for at in snapshots if at <= 3600) <= 10 and len(snapshots) <= 25
    assert snapshot_due(clip_seconds, 100.0, 0.0)


def test_a_snapshot_written_in_the_background_is_a_copy_and_its_failure_is_raised(tmp_path, monkeypatch):
    """``background``: the states are copied before the call returns (the render goes on changing them), the
    file and the dropped latents appear once written, and a failed write reaches the render's thread (which
    warns and goes on); leaving the block drops a failure (the snapshot is of no use then)."""
    with JobState(tmp_path / "out.mp4", JOB).open() as state:
        for clip in range(3):
            state.save_clip(clip, ClipRecord(torch.full((1, 4, 1, 2, 2), float(clip)), None, 1.0))
        memory = {"down.0": (torch.ones(2, 3), torch.zeros(2))}
        state.save_memory(2, memory, background=True)
        memory["down.0"][0].fill_(7.0)  # the render's next update
        state.wait_for_memory()
        clip, states = state.load_memory()
        assert clip == 2 and torch.equal(states["down.0"][0], torch.ones(2, 3))
        assert [state.load_clip(c).latents is None for c in range(3)] == [True, False, False]

        def disk_full(data, path):
            raise OSError(28, "No space left on device", str(path))

        monkeypatch.setattr(memo.io.job_state, "_save", disk_full)
        state.save_memory(2, memory, background=True)
        with pytest.raises(OSError, match="No space left"):
            state.wait_for_memory()
        state.save_memory(2, memory, background=True)
        with pytest.raises(OSError, match="No space left"):  # the next snapshot raises the last one's failure
            state.save_memory(2, memory, background=True)
        with JobState(tmp_path / "other.mp4", JOB).open() as other:  # a failure at the end is dropped
            other.save_memory(0, memory, background=True)
        assert [p.name for p in [*state.folder.iterdir(), *other.folder.iterdir()] if p.name.startswith(".")] == []


def test_another_job_or_a_restart_discards_and_a_held_folder_is_refused(tmp_path):
    with JobState(tmp_path / "out.mp4", JOB).open() as state:
        state.segment(0).write_bytes(b"ts")
        holder = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(f"""
                from memo.io.job_state import JobState, JobBusyError
                try:
                    JobState({str(tmp_path / 'out.mp4')!r}, {JOB!r}).open()
                except JobBusyError as error:
                    print(error)
                """)],
            capture_output=True, text=True, cwd=REPO, check=True,
        )  # fmt: skip
        assert "Another run is rendering" in holder.stdout
    again = JobState(tmp_path / "out.mp4", {**JOB, "seed": "7"}).open()
    assert again.discarded == "seed differs (7, was 42)" and not again.segment(0).exists()
    again.close()
    with JobState(tmp_path / "out.mp4", {**JOB, "seed": "7"}).open(resume=False) as restarted:
        assert restarted.discarded == "--restart (resume=False)"
    assert JobBusyError.__mro__[1].__name__ == "UserError"


def test_the_playlist_is_an_hls_event_list_until_it_ends():
    live = playlist_text([16 / 30, 16 / 30], ended=False)
    assert live.splitlines()[:5] == [
        "#EXTM3U",
        "#EXT-X-VERSION:3",
        "#EXT-X-TARGETDURATION:1",
        "#EXT-X-MEDIA-SEQUENCE:0",
        "#EXT-X-PLAYLIST-TYPE:EVENT",
    ]
    assert live.splitlines()[5:] == ["#EXTINF:0.533333,", "clip-00000.ts", "#EXTINF:0.533333,", "clip-00001.ts"]
    ended = playlist_text([16 / 30], ended=True)
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in ended and ended.endswith("#EXT-X-ENDLIST\n")


def test_segments_remux_into_the_frames_and_the_one_sound_track(tmp_path):
    """Two 8-frame segments encoded on their own remux to the frames of both and the sound encoded once, and the
    same frames give the same bytes (a resumed job's segments are an uninterrupted one's)."""
    audio = decode_audio(REPO / "assets" / "examples" / "speech.wav")
    rate = Fraction(30)
    sound = encode_sound(audio, Fraction(16, 30), tmp_path / SOUND_NAME)
    rng = np.random.default_rng(0)
    frames = np.clip(np.cumsum(rng.integers(-4, 5, (16, 32, 32, 3)), axis=0) + 128, 0, 255).astype(np.uint8)
    paths = []
    for clip in range(2):
        with SegmentWriter(tmp_path / segment_name(clip), clip * 8, rate, 32, 32, 18, sound) as writer:
            writer.write(frames[clip * 8 : clip * 8 + 8])
            paths.append(writer.publish())
    with SegmentWriter(tmp_path / "again.ts", 8, rate, 32, 32, 18, sound) as writer:
        writer.write(frames[8:])
        assert writer.publish().read_bytes() == paths[1].read_bytes()
    video = assemble(paths, sound, tmp_path / "out.mp4", overwrite=False)
    with av.open(str(video)) as container:
        decoded = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    with av.open(str(video)) as container:
        track = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)
    with av.open(str(sound)) as container:
        alone = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)
    assert decoded.shape == frames.shape and np.abs(decoded.astype(int) - frames).mean() < 8
    assert np.array_equal(track, alone)
    with pytest.raises(Exception, match="appeared"):  # an existing output is never replaced unasked
        assemble(paths, sound, tmp_path / "out.mp4", overwrite=False)
