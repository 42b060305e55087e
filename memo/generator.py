"""MemoGenerator: the whole program as a Python object, built once and called on many image/audio pairs.

Stages, each a module of its own: models (``io.hub``), image (``conditions.framing`` and
``conditions.face``), audio (``conditions.audio`` and ``conditions.audio_features``), emotion
(``conditions.emotion``), generation (``pipeline``) and output (``io.video``). Every stage logs one line.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from PIL import Image

import memo
from memo.conditions.audio_features import AudioFeatures
from memo.conditions.emotion import audio_emotion_labels, forced_emotion_labels, frame_emotion_labels
from memo.conditions.face import Face, face_embedding
from memo.conditions.framing import crop_box, frame_portrait, to_model_tensor
from memo.conditions.paste_back import PasteBack
from memo.constants import DTYPES, EMOTION_NAMES, SAMPLE_RATE
from memo.errors import UserError
from memo.io.audio import AudioError, DecodedAudio, check_min_duration, decode_audio, is_silent
from memo.io.image import load_image
from memo.io.job_state import ClipRecord, JobState, snapshot_due
from memo.io.segments import SegmentWriter, assemble, encode_sound, write_playlist
from memo.io.video import CheckedOutput, probe_video
from memo.loading import ConditionModels, locate_models, pick_device
from memo.models.temporal_memory import TemporalMemory
from memo.pipeline import MemoPipeline, ResumeState
from memo.progress import VideoProgress
from memo.runtime.compilation import (
    compile_enabled,
    compile_networks,
    compile_seconds,
    compiled_graphs,
    use_inductor_cache,
)
from memo.runtime.memory import apply_memory_plan, out_of_memory_advice
from memo.runtime.parallel import GuidanceParallel, ParallelError, select_rank_device
from memo.runtime.placement import (
    apply_offload,
    condition_models_placement,
    effective_offload,
    generation_working_bytes,
    module_bytes,
)
from memo.sampling.deep_cache import apply_deep_cache
from memo.settings.inference import (
    JOB_NEUTRAL_SETTINGS,
    LOAD_SETTINGS,
    ConfigError,
    InferenceConfig,
    check_names,
    validate,
)
from memo.settings.schema import flat_values

logger = logging.getLogger("memo")


Progress = Callable[[float, str], None]
SegmentCallback = Callable[[Path, int, float, float], None]
"""Called as ``on_segment(path, clip, start_s, duration_s)`` with a clip's finished segment."""
"""Called after every step with the share of the video done (0..1) and the progress text
(:meth:`memo.progress.VideoProgress.text`: video time done / total, seconds per frame, time left)."""


class GpuMemoryError(UserError, RuntimeError):
    """Generation ran out of accelerator memory."""


@dataclass
class PreparedImage:
    """The model's view of the portrait: the framed reference image and the face embedding; and, for
    ``paste_back``, the photo and the region of it that was framed (left, top, right, bottom; None when
    ``framing=stretch``)."""

    reference: torch.Tensor
    face_embedding: torch.Tensor
    face: Face | None
    framed: Image.Image
    photo: Image.Image | None = None
    box: tuple[float, float, float, float] | None = None


@dataclass
class PreparedAudio:
    """The decoded audio (the source of the video's sound track), its 16 kHz mono copy, the wav2vec2 features
    and per-frame emotion labels."""

    source: DecodedAudio
    waveform: torch.Tensor
    features: AudioFeatures
    emotion_labels: torch.Tensor
    emotion: str

    @property
    def seconds(self) -> float:
        return self.waveform.shape[0] / SAMPLE_RATE


@dataclass
class SavedProgress:
    """The progress a stopped render of a job left (``MemoGenerator.saved_progress``): clips done of all,
    seconds of video they hold, seconds of rendering they took, and the folder they are in."""

    clips_done: int
    video_seconds: float
    render_seconds: float
    folder: Path


def clock(seconds: float) -> str:
    """A video time as ``mm:ss.s`` (``h:mm:ss.s`` from an hour)."""
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{rest:04.1f}" if hours else f"{minutes:02d}:{rest:04.1f}"


def duration(seconds: float) -> str:
    """A length of time in words: ``2 h 10 min``, ``3 min 5 s``, ``12 s``."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def content_hash(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


class MemoGenerator:
    """Loads every model once; :meth:`generate` turns an image and an audio file into an mp4."""

    def __init__(self, config: InferenceConfig):
        self.config = config
        if config.runtime.parallel == "guidance":
            select_rank_device()
        self.device = pick_device(config.runtime.device)
        # Before the models load, so that a launch with one process fails at once.
        self.parallel = GuidanceParallel(self.device) if config.runtime.parallel == "guidance" else None
        self.dtype = DTYPES[config.runtime.weight_dtype]
        start = time.perf_counter()
        files = locate_models(config.models, need_emotion2vec=config.conditions.emotion == "auto")
        self.files = files
        self.pipeline = MemoPipeline.from_checkpoint(files.memo, vae=files.vae, torch_dtype=self.dtype)
        self.euler = self.pipeline.scheduler  # the published scheduler; the solver setting swaps it per video
        # The render's bar is this generator's (memo.progress.VideoProgress, video time and time left), driven
        # from the pipeline's callbacks: the pipeline's own per-step bar would be a second one.
        self.pipeline.set_progress_bar_config(disable=True)
        self.progress_bar = self.parallel is None or self.parallel.is_main
        """Show the render's progress bar on stderr (one process of several turns it off)."""
        self.offload = effective_offload(config.runtime.offload, self.device)
        # Compiled before the offload hooks are added, so that model offload's hook wraps the compiled forward.
        self.compiled = compile_enabled(config.runtime.compile, self.device) and self.offload != "group"
        if self.compiled:
            cache = use_inductor_cache()  # before the first call, where compilation happens
            compile_networks(self.pipeline)
        apply_deep_cache(self.pipeline.diffusion_net)  # inside the offload hooks, which then wrap it
        apply_offload(self.pipeline, self.offload, self.device, fp8=config.runtime.fp8_weights)
        self.conditions = ConditionModels.load(files, config.models, self.device)
        logger.info(
            "models: loaded on %s (%s, offload %s) in %.1f s",
            self.device,
            config.runtime.weight_dtype,
            self.offload,
            time.perf_counter() - start,
        )
        if self.compiled:
            logger.info(
                "models: the reference and diffusion nets compile on first use (a few minutes the first time; "
                "kept in the inductor cache %s for later runs)",
                cache,
            )

    def with_settings(self, **settings) -> MemoGenerator:
        """A generator with some settings changed (resolution, steps, guidance, framing...) sharing these models.

        For per-request settings in a long-running program (web app, batch jobs); the models stay loaded once.
        Settings in ``LOAD_SETTINGS`` choose the models themselves and cannot change here.
        """
        settings = check_names(settings, "with_settings()")
        fixed = sorted(set(settings) & LOAD_SETTINGS)
        if fixed:
            raise ConfigError(
                f"{', '.join(fixed)} cannot change per call (it chooses the models); set it in the config."
            )
        clone = copy.copy(self)
        clone.config = validate(self.config.updated(**settings))
        return clone

    def to(self, device: torch.device | str) -> MemoGenerator:
        """Move the torch models to ``device``, e.g. off a GPU that a host program shares between models.

        Face analysis and vocal separation stay on the ONNX Runtime device chosen at load. With ``offload``
        the networks stay under their hooks, which already keep them on the CPU between videos. Without, the
        memory plan is made anew for ``device`` (on a GPU the networks take turns on it: ``runtime/memory.py``).
        """
        self.device = torch.device(device)
        if self.offload == "none":
            apply_memory_plan(self.pipeline, "none", self.device)
            if self.pipeline.network_turns is None:
                self.pipeline.to(self.device)
        self.conditions.to(self.device)
        return self

    # -- stages --------------------------------------------------------------------------------------

    def prepare_image(self, image_path: str | os.PathLike, allow_no_face: bool | None = None) -> PreparedImage:
        """Load the portrait, find the largest face and its embedding, and frame it at the video size."""
        return self.prepare_portrait(load_image(image_path), str(image_path), allow_no_face)

    def prepare_portrait(self, image: Image.Image, name: str, allow_no_face: bool | None = None) -> PreparedImage:
        """:meth:`prepare_image` for a portrait already in memory; ``name`` stands for it in messages."""
        config = self.config
        allow = config.conditions.allow_no_face if allow_no_face is None else allow_no_face
        embedding, face = face_embedding(
            self.conditions.face_analyzer, image, name, allow_missing=allow, missing_option="allow_no_face=true"
        )
        width, height = config.video.size
        bbox = face.bbox if face is not None else None
        framed = frame_portrait(image, bbox, width, height, mode=config.conditions.framing)
        where = f"face at {[round(v) for v in face.bbox]}" if face is not None else "no face (zero embedding)"
        logger.info(
            "image: %s, %dx%d, %s, framed to %dx%d (%s)",
            Path(name).name,
            *image.size,
            where,
            width,
            height,
            config.conditions.framing,
        )
        return PreparedImage(
            reference=to_model_tensor(framed),
            face_embedding=torch.as_tensor(embedding, dtype=torch.float32).reshape(1, -1),
            face=face,
            framed=framed,
            photo=image,
            box=crop_box(image.size, bbox, width, height) if config.conditions.framing == "crop" else None,
        )

    def prepare_audio(self, audio_path: str | os.PathLike, emotion: str | None = None) -> PreparedAudio:
        """Decode the audio (once), separate the vocals, compute wav2vec2 features and per-frame emotion labels."""
        return self.prepare_decoded(decode_audio(audio_path), emotion)

    def prepare_decoded(
        self, source: DecodedAudio, emotion: str | None = None, emotion_labels: torch.Tensor | None = None
    ) -> PreparedAudio:
        """:meth:`prepare_audio` for audio already decoded, from a file or from memory
        (``memo.io.audio.audio_from_samples``); ``source`` is also the sound track of the video.

        ``emotion_labels``, one class id per 16 kHz sample (``conditions.emotion.sample_emotion_labels``, perhaps
        edited), replace the emotion setting; :class:`AudioError` if they do not cover this audio.
        """
        config = self.config
        name = source.path.name
        waveform = source.mono()
        check_min_duration(waveform, config.video.fps, source.path)
        if is_silent(waveform):
            logger.warning("audio: %s is silent; the video will show no speech.", name)
        separator = self.conditions.separator
        vocals = separator(waveform) if separator is not None else waveform
        features = self.conditions.audio_encoder(
            vocals, config.video.fps, config.sampling.num_generated_frames_per_clip
        )
        emotion = (emotion or config.conditions.emotion).lower()
        if emotion_labels is not None:
            if emotion_labels.shape != waveform.shape:
                raise AudioError(
                    f"The emotion labels cover {emotion_labels.shape[-1] / SAMPLE_RATE:.2f} s but the audio lasts "
                    f"{waveform.shape[0] / SAMPLE_RATE:.2f} s ({name}); label the same audio you generate from."
                )
            labels = frame_emotion_labels(emotion_labels, len(features))
            counts = torch.bincount(labels[: features.num_frames], minlength=len(EMOTION_NAMES))
            summary = f"given, mostly {EMOTION_NAMES[int(counts.argmax())]}"
        elif emotion == "auto":
            conditions = self.conditions
            labels = audio_emotion_labels(waveform, conditions.emotion_encoder, conditions.classifier, len(features))
            counts = torch.bincount(labels[: features.num_frames], minlength=len(EMOTION_NAMES))
            summary = f"auto, mostly {EMOTION_NAMES[int(counts.argmax())]}"
        else:
            labels = forced_emotion_labels(emotion, len(features))
            summary = f"{emotion} (forced)"
        logger.info(
            "audio: %s, %.2f s, %s, %d frames at %d fps, emotion %s",
            name,
            waveform.shape[0] / SAMPLE_RATE,
            "vocals separated" if separator is not None else "no vocal separation",
            features.num_frames,
            config.video.fps,
            summary,
        )
        return PreparedAudio(
            source=source, waveform=waveform, features=features, emotion_labels=labels, emotion=summary
        )

    def job_fingerprint(self, photo: Image.Image, source: DecodedAudio, seed: int, emotion: str | None) -> dict:
        """What makes a render the same job: the portrait's pixels, the audio's decoded samples, the seed, the
        emotion asked for and every setting but :data:`memo.settings.inference.JOB_NEUTRAL_SETTINGS`."""
        settings = {
            key: str(value)
            for key, value in flat_values(self.config).items()
            if key not in JOB_NEUTRAL_SETTINGS and key != "seed"
        }
        samples = source.samples
        return {
            "version": memo.__version__,
            "image": content_hash(photo.mode.encode(), repr(photo.size).encode(), photo.tobytes()),
            "audio": content_hash(str(source.rate).encode(), str(samples.shape).encode(), samples.tobytes()),
            "seed": str(seed),
            "emotion": str((emotion or self.config.conditions.emotion).lower()),
            **settings,
        }

    def saved_progress(
        self,
        image_path: str | os.PathLike,
        audio_path: str | os.PathLike,
        output_path: str | os.PathLike,
        *,
        seed: int | None = None,
        emotion: str | None = None,
    ) -> SavedProgress | None:
        """The progress a stopped render of this job into ``output_path`` left, or None when there is none for
        this job (none at all, or another job's, which the next :meth:`generate` discards). Reads the inputs,
        runs no model."""
        seed = self.config.sampling.seed if seed is None else seed
        fingerprint = self.job_fingerprint(load_image(image_path), decode_audio(audio_path), seed, emotion)
        state = JobState(output_path, fingerprint)
        if not state.matches():
            return None
        done = state.done_clips()
        if not done:
            return None
        frames = done * self.config.sampling.num_generated_frames_per_clip
        return SavedProgress(done, frames / self.config.video.fps, state.seconds_kept(done), state.folder)

    def render(
        self,
        image: PreparedImage,
        audio: PreparedAudio,
        output_path: Path | CheckedOutput,
        seed: int,
        overwrite: bool,
        progress: Progress | None = None,
        *,
        resume: bool = True,
        emotion: str | None = None,
        on_segment: SegmentCallback | None = None,
    ) -> Path:
        """Generate the frames clip by clip, each clip encoded into a segment of the job's progress folder
        (:mod:`memo.io.job_state`) with ``audio.source`` as its sound, then the mp4 assembled from them; with
        ``paste_back`` each frame is pasted into the photo on its way to the encoder (:meth:`paste_plan`).

        With ``resume``, progress saved by a stopped render of the same job is taken up (the video is the one
        an uninterrupted render gives); else, or when the job differs, it is discarded, with one line saying so.
        ``on_segment(path, clip, start_s, duration_s)`` is called with each clip's finished segment (MPEG-TS, H.264
        and AAC, timestamps continuing), those kept from a stopped render first; the file is removed when the mp4
        is published, so read it in the call.
        """
        config = self.config
        width, height = config.video.size
        paste = self.paste_plan(image)
        if paste is not None:
            width, height = paste.size
        fpc = config.sampling.num_generated_frames_per_clip
        clips = len(audio.features) // fpc
        rate = Fraction(config.video.fps).limit_denominator(1001)
        photo = image.photo if image.photo is not None else image.framed
        fingerprint = self.job_fingerprint(photo, audio.source, seed, emotion)
        with JobState(output_path, fingerprint).open(resume) as state:
            if state.discarded:
                logger.info("resume: saved progress of %s discarded: %s; starting over", output_path, state.discarded)
            done = state.done_clips()
            resume_from = self._resume_state(state, done, clips)
            if done:
                logger.info(
                    "resuming at %s, clip %d of %d; %s of rendering kept",
                    clock(done * fpc / config.video.fps),
                    done + 1 if done < clips else clips,
                    clips,
                    duration(state.seconds_kept(done)),
                )
            if not state.sound.is_file():
                encode_sound(audio.source, Fraction(audio.features.num_frames) / rate, state.sound)
            durations = [min(fpc, audio.features.num_frames - clip * fpc) / config.video.fps for clip in range(clips)]
            write_playlist(state.folder, durations[:done])
            logger.info("preview: %s grows clip by clip (VLC, mpv, ffplay and Safari play it)", state.playlist)
            if on_segment is not None:
                for clip in range(done):
                    on_segment(state.segment(clip), clip, clip * fpc / config.video.fps, durations[clip])
            if done < clips:
                self._render_segments(
                    state,
                    image,
                    audio,
                    seed,
                    paste,
                    (width, height),
                    rate,
                    durations,
                    resume_from,
                    progress,
                    on_segment,
                )
            write_playlist(state.folder, durations, ended=True)
            state.drop_memory()  # every clip is done: only the segments and the sound are needed from here
            assemble([state.segment(clip) for clip in range(clips)], state.sound, output_path, overwrite)
            state.remove()
        return output_path

    def _resume_state(self, state: JobState, done: int, clips: int) -> ResumeState | None:
        """What the pipeline needs to take up the job at clip ``done`` from ``state``; None at clip 0."""
        if done == 0 or done >= clips:
            return None
        memory_clip, memory = state.load_memory()
        if memory_clip > done:
            memory_clip, memory = -1, None
        take_up = ResumeState(clip=done, latents={}, memory=memory, memory_clip=memory_clip)
        take_up.latents = {clip: state.load_clip(clip).latents for clip in take_up.needed_latents()}
        take_up.noise_state = state.load_clip(done - 1).noise_state
        if any(latents is None for latents in take_up.latents.values()):
            raise RuntimeError(f"The saved progress in {state.folder} lacks a clip's latents; rerun with --restart.")
        return take_up

    def _render_segments(
        self, state, image, audio, seed, paste, size, rate, durations, resume_from, progress, on_segment=None
    ) -> None:
        """The clip loop of :meth:`render`: each clip's frames into its segment, then its record, the playlist,
        and every ``resume_snapshot_minutes`` the temporal memory; a handled signal saves the memory on the
        way out when it is whole."""
        config = self.config
        fpc = config.sampling.num_generated_frames_per_clip
        writer: SegmentWriter | None = None
        snapshot_clip = resume_from.memory_clip if resume_from is not None else -1
        kept = state.seconds_kept(resume_from.clip) if resume_from is not None else 0.0
        # the rendering the last snapshot holds (one taken at a stop may hold the update of the clip then unfinished)
        held = state.seconds_kept(min(snapshot_clip + 1, resume_from.clip if resume_from is not None else 0))
        run_start = clip_start = time.perf_counter()
        snapshots = self.parallel is None  # each rank of parallel=guidance holds half the memory: replayed instead
        # The call's memory, held here: the pipeline lets go of its own when the call ends, a stop included, and a
        # handled signal's snapshot is written after that.
        memory = self.pipeline.memory_factory()

        def write(frames) -> None:
            nonlocal writer
            if writer is None:
                clip = state.done_clips()
                writer = SegmentWriter(state.segment(clip), clip * fpc, rate, *size, config.video.crf, state.sound)
            writer.write(frames)

        def save_memory(clip: int) -> None:
            nonlocal snapshot_clip, held
            started = time.perf_counter()
            try:
                state.save_memory(clip, memory.states)  # raises, too, the last background write's failure
            except OSError as error:
                # The snapshot only shortens a resume: a full disk (it is GiBs, a clip's files are MiBs) or another
                # failed write of it leaves the last one whole, and the render goes on; tried again next interval.
                held = kept + started - run_start
                snapshot_failed(error)
                return
            snapshot_clip, held = clip, kept + started - run_start
            spent = time.perf_counter() - started
            logger.debug("resume: memory through clip %d saved (%.1f s of the render's time)", clip + 1, spent)

        def snapshot_failed(error: OSError) -> None:
            logger.warning(
                "resume: the memory snapshot was not written (%s: %s); the render goes on, and a resume "
                "replays the clips since the last snapshot",
                error.strerror or error,
                state.folder,
            )

        def clip_end(pipe, clip: int) -> None:
            nonlocal writer, clip_start
            writer.publish()
            writer = None
            noise = pipe.noise_generator.get_state() if pipe.noise_generator is not None else None
            now = time.perf_counter()
            state.save_clip(clip, ClipRecord(pipe.clip_latents, noise, now - clip_start))
            clip_start = now
            write_playlist(state.folder, durations[: clip + 1])
            if on_segment is not None:
                on_segment(state.segment(clip), clip, clip * fpc / config.video.fps, durations[clip])
            rendered = kept + now - run_start
            if snapshots and snapshot_due(rendered - held, held, 60 * config.resume.resume_snapshot_minutes):
                save_memory(clip)

        on_clip = write if paste is None else paste.streaming(write)
        try:
            self.render_clips(
                image, audio, seed, on_clip, progress, resume_from=resume_from, on_clip_end=clip_end, memory=memory
            )
        except KeyboardInterrupt:
            whole = self.pipeline.memory_clip
            if snapshots and whole is not None and whole > snapshot_clip:
                save_memory(whole)
            try:
                state.wait_for_memory()
            except OSError as error:
                snapshot_failed(error)
            raise
        finally:
            if writer is not None:
                writer.discard()

    def paste_plan(self, image: PreparedImage) -> PasteBack | None:
        """With ``paste_back``, the plan that puts each generated frame back into ``image``'s photo
        (:mod:`memo.conditions.paste_back`), its output size logged; None without."""
        config = self.config
        if not config.video.paste_back:
            return None
        if image.box is None or image.photo is None:
            raise ConfigError("paste_back=true needs framing=crop: there is no region of the photo to paste into.")
        paste = PasteBack.plan(image.photo, image.box, config.video.size, config.video.max_output_side)
        scaled = "" if paste.size == image.photo.size else f", scaled from {image.photo.width}x{image.photo.height}"
        logger.info(
            "paste back: each %dx%d frame into the photo, output %dx%d%s",
            *config.video.size,
            *paste.size,
            scaled,
        )
        return paste

    def render_clips(
        self,
        image: PreparedImage,
        audio: PreparedAudio,
        seed: int,
        on_clip: Callable[[torch.Tensor], None],
        progress: Progress | None = None,
        *,
        resume_from: ResumeState | None = None,
        on_clip_end: Callable[[MemoPipeline, int], None] | None = None,
        memory: TemporalMemory | None = None,
    ) -> None:
        """Generate the frames clip by clip, handing each clip's frames (3, n, H, W) in [0, 1], on the CPU, to
        ``on_clip``; the clips together last exactly as long as the audio. An exception raised by ``progress``
        (called after every step) stops generation. ``resume_from`` takes the video up at a later clip
        (:class:`memo.pipeline.ResumeState`); ``on_clip_end(pipeline, clip)`` is called after ``on_clip``, with
        the clip's resume state on the pipeline. ``memory``: the temporal memory to fill (the pipeline makes one
        when None), for a caller that reads it after the pipeline has returned or raised."""
        config = self.config
        width, height = config.video.size
        clips = len(audio.features) // config.sampling.num_generated_frames_per_clip
        speed = config.sampling.speed_settings
        log = logger.info if self.parallel is None or self.parallel.is_main else logger.debug
        log(
            "generate: %d clips x %d steps, speed %s (%s), %dx%d, seed %d, on %s",
            clips,
            speed.steps,
            config.sampling.speed,
            speed.describe(),
            width,
            height,
            seed,
            self.device,
        )
        meter = VideoProgress(
            audio.features.num_frames,
            config.video.fps,
            config.sampling.num_generated_frames_per_clip,
            speed.steps,
            start_frame=0 if resume_from is None else resume_from.clip * config.sampling.num_generated_frames_per_clip,
            bar=self.progress_bar,
        )

        def clip_end(pipe, clip, frames):
            on_clip(frames)
            meter.clip_done(frames.shape[1])
            if on_clip_end is not None:
                on_clip_end(pipe, clip)

        def on_step(pipe, clip, step, t, tensors):
            meter.step(step)
            if progress is not None:
                progress(meter.fraction, meter.text())

        compile_before, graphs_before = compile_seconds(), compiled_graphs()
        self.pipeline.scheduler = speed.scheduler(self.euler)
        call = speed.pipeline_kwargs(config.sampling.cfg_scale)
        if self.parallel is not None:
            call["guider"] = self.parallel.guider(call["guider"])
        try:
            with meter, self.conditions_out_of_the_way():
                self.pipeline(
                    image.reference,
                    image.face_embedding,
                    audio.features,
                    audio.emotion_labels,
                    num_frames=audio.features.num_frames,
                    frames_per_clip=config.sampling.num_generated_frames_per_clip,
                    past_frames=config.sampling.num_past_frames,
                    initial_past_frames=config.sampling.num_init_past_frames,
                    seed=seed,
                    vae_batch_size=config.memory.vae_batch_size,
                    vae_tile_size=config.memory.vae_tile_size,
                    output_type=None,
                    callback_on_clip_end=clip_end,
                    callback_on_step_end=on_step,
                    resume_from=resume_from,
                    memory=memory,
                    **call,
                )
        except torch.OutOfMemoryError as error:
            raise GpuMemoryError(
                f"Out of {self.device.type.upper()} memory at {width}x{height}, {config.runtime.weight_dtype}, "
                f"offload={self.offload}. {self.out_of_memory_advice(width, height)}"
            ) from error
        if self.compiled and compile_seconds() > compile_before:
            logger.info(
                "generate: %.1f s of it compiling the networks (%d graphs)",
                compile_seconds() - compile_before,
                compiled_graphs() - graphs_before,
            )

    def _render_parallel(
        self, image, audio, output_path, seed, overwrite, progress, resume, emotion, on_segment=None
    ) -> None:
        """Rank 0 of ``parallel=guidance``: :meth:`render`, with the prepared conditions and the resume state
        handed to rank 1 once the progress folder is open."""
        shared = (image.reference, image.face_embedding, audio.features, audio.emotion_labels, seed)
        resume_state = self._resume_state
        handed = False  # whether rank 1 has its job (else it waits for one, and must hear of a stop)

        def share_then_take_up(state, done, clips):
            nonlocal handed
            take_up = resume_state(state, done, clips)
            if take_up is not None:  # the memory snapshot is not used here: each rank replays its own half
                take_up = ResumeState(done, {c: state.load_clip(c).latents for c in range(done)}, None, -1)
                take_up.noise_state = state.load_clip(done - 1).noise_state
            handed = True
            self.parallel.share((*shared, take_up))
            return take_up

        self._resume_state = share_then_take_up
        try:
            self.render(
                image,
                audio,
                output_path,
                seed,
                overwrite,
                progress,
                resume=resume,
                emotion=emotion,
                on_segment=on_segment,
            )
        except BaseException as error:
            # Stopped before rank 1 had its job (the progress folder locked by another run, unreadable, a
            # signal): rank 1 stops with it now, quietly (this rank says why), not at the collective's timeout.
            if not handed:
                with contextlib.suppress(ParallelError):  # rank 1 gone too: nothing to tell
                    self.parallel.share(ParallelError(str(error) or type(error).__name__, quiet=True))
            raise
        finally:
            del self._resume_state

    def _generate_other_half(self, output_path: Path, progress: Progress | None) -> Path:
        """Rank 1 of ``parallel=guidance``: rank 0's prepared conditions in, this half computed, nothing written."""
        job = self.parallel.share(None)
        if isinstance(job, ParallelError):
            raise job
        reference, embedding, features, labels, seed, resume_from = job
        image = PreparedImage(reference=reference, face_embedding=embedding, face=None, framed=None)
        audio = PreparedAudio(source=None, waveform=None, features=features, emotion_labels=labels, emotion="")
        self.render_clips(image, audio, seed, lambda frames: None, progress, resume_from=resume_from)
        return output_path

    def out_of_memory_advice(self, width: int, height: int) -> str:
        """What to change after running out of device memory (:func:`memo.runtime.memory.out_of_memory_advice`):
        on CUDA, the memory this process could use is what is free plus what its allocator holds."""
        available = None
        if self.device.type == "cuda":
            available = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device)
        config = self.config
        return out_of_memory_advice(
            self.offload, available, width, height, self.dtype, config.memory.vae_batch_size, config.runtime.fp8_weights
        )

    @contextlib.contextmanager
    def conditions_out_of_the_way(self) -> Iterator[None]:
        """Park the condition models on the CPU while the video is generated, unless there is room for them
        (the rule of :func:`memo.runtime.placement.condition_models_placement`), and bring them back afterwards."""
        width, height = self.config.video.size
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        placement = condition_models_placement(
            self.device,
            self.offload,
            free,
            module_bytes(*self.conditions.networks()),
            generation_working_bytes(width, height, self.dtype),
        )
        if placement.keep_on_device:
            yield
            return
        logger.info("generate: condition models wait on the CPU (%s)", placement.reason)
        self.conditions.to(torch.device("cpu"))
        try:
            yield
        finally:
            self.conditions.to(self.device)

    def generate(
        self,
        image_path: str | os.PathLike,
        audio_path: str | os.PathLike,
        output_path: str | os.PathLike | CheckedOutput,
        *,
        seed: int | None = None,
        emotion: str | None = None,
        overwrite: bool = False,
        progress: Progress | None = None,
        portrait: Image.Image | None = None,
        sound: DecodedAudio | None = None,
        resume: bool = True,
        on_segment: SegmentCallback | None = None,
    ) -> Path:
        """Render ``image_path`` speaking ``audio_path`` into ``output_path`` (an mp4); returns the path.

        Nothing is written when an input is bad, and an existing output is kept unless ``overwrite``. A caller
        that has checked its inputs already passes what it found, which is then trusted: ``output_path`` as a
        :class:`~memo.io.video.CheckedOutput`, ``portrait`` (``load_image(image_path)``) and ``sound``
        (``decode_audio(audio_path)``). A render that stops keeps its progress beside the output
        (:mod:`memo.io.job_state`); with ``resume`` the next call for the same job takes it up
        (:meth:`saved_progress` tells whether there is some), without it starts over. ``on_segment`` gets each
        clip's finished segment as the render goes (:meth:`render`), for a live view.

        With ``parallel=guidance`` every process calls this with the same arguments: rank 0 reads the inputs
        and writes the video, rank 1 receives the prepared conditions and computes its half.
        """
        if seed is not None:  # the seed setting's own check, as for seed=N
            seed = validate(self.config.updated(seed=seed)).sampling.seed
        if self.parallel is not None:
            self.parallel.agree(flat_values(self.config))
            if not self.parallel.is_main:
                return self._generate_other_half(Path(output_path), progress)
        start = time.perf_counter()
        try:
            if not isinstance(output_path, CheckedOutput):
                output_path = CheckedOutput.check(output_path, overwrite)
            if portrait is None:
                image = self.prepare_image(image_path)
            else:
                image = self.prepare_portrait(portrait, str(image_path))
            audio = self.prepare_audio(audio_path, emotion) if sound is None else self.prepare_decoded(sound, emotion)
        except UserError as error:
            if self.parallel is not None:
                self.parallel.share(ParallelError(str(error), quiet=True))
            raise
        seed = self.config.sampling.seed if seed is None else seed
        if self.parallel is not None:
            self._render_parallel(image, audio, output_path, seed, overwrite, progress, resume, emotion, on_segment)
        else:
            self.render(
                image,
                audio,
                output_path,
                seed,
                overwrite,
                progress,
                resume=resume,
                emotion=emotion,
                on_segment=on_segment,
            )
        info = probe_video(output_path)
        logger.info(
            "output: %s, %d frames, %.2f s at %g fps, %dx%d, in %.1f s",
            output_path,
            info.num_frames,
            info.num_frames / info.fps,
            info.fps,
            info.width,
            info.height,
            time.perf_counter() - start,
        )
        return output_path.path
