"""The web app: a Gradio page over one :class:`MemoGenerator`, loaded once at start and shared by every request.

Per-request settings (emotion, size, steps, guidance, seed, framing, speed, paste back) go through
``MemoGenerator.with_settings``, which shares the loaded models. Renders run one at a time (later requests wait in
Gradio's queue); errors from bad input show as their message in the page, anything else as a short message with
the details in the log.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import logging
import math
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from PIL import Image

from memo.apps.cli import (
    EXAMPLE_AUDIO,
    EXAMPLE_IMAGE,
    add_settings_arguments,
    inference_setting_names,
    parse_with_settings,
    report_error,
    report_stop,
    setup_logging,
)
from memo.apps.live import generate_watched
from memo.apps.render_jobs import RenderJob, RenderJobs
from memo.constants import EMOTION_NAMES
from memo.errors import (
    STOP_SIGNALS,
    Interrupted,
    UserError,
    as_path,
    check_runtimes,
    failure_message,
    stop_on_signals,
)
from memo.generator import MemoGenerator, Progress
from memo.io.partial import remove_abandoned
from memo.io.video import check_output_folder
from memo.sampling.speed import SPEEDS
from memo.settings.inference import FRAMINGS, load_config, setting_help

logger = logging.getLogger("memo")

SQUARE_SIZES = (256, 384, 512, 640, 768)
JOBS_FOLDER = ".renders"
"""Under the output folder: the record of each render under way (:mod:`memo.apps.render_jobs`)."""
LIVE_FOLDER = ".live"
"""Under the output folder: the live segments of the renders under way, each in a folder of its own."""
CACHE_CLEANUP = (3600, 86400)
"""Every hour, Gradio deletes uploads and results of its own cache older than a day."""


@contextlib.contextmanager
def shown_in_page(action: str) -> Iterator[None]:
    """Turn errors into a message in the page, worded as batch inference reports a failed job
    (:func:`memo.errors.failure_message`); anything unexpected is also logged with its traceback."""
    try:
        yield
    except gr.Error:
        raise
    except Exception as error:
        if isinstance(error, UserError):
            logger.warning("%s refused: %s", action, error)
        else:
            logger.exception("%s failed", action)
        raise gr.Error(failure_message(error), duration=None, print_exception=False) from None


def size_choices(generator: MemoGenerator) -> list[str]:
    """``WxH`` choices: the config's own size first, then common squares."""
    width, height = generator.config.video.size
    own = f"{width}x{height}"
    return [own] + [f"{side}x{side}" for side in SQUARE_SIZES if f"{side}x{side}" != own]


def parse_size(text: str) -> dict[str, int]:
    """``"512x384"`` as the ``width`` and ``height`` settings."""
    try:
        width, height = (int(part) for part in str(text).lower().split("x"))
    except ValueError:
        raise gr.Error(f"Size must look like 512x512, got {text!r}.", duration=None, print_exception=False) from None
    return {"width": width, "height": height}


def whole_number(value: float, name: str) -> int:
    """A number field of the page (Gradio gives floats; the API takes any JSON number) as the whole number the
    setting ``name`` takes; :class:`gr.Error` for NaN, infinity or a fraction, which ``int`` would raise on or
    silently cut."""
    if not math.isfinite(value) or value != int(value):
        raise gr.Error(f"{name} must be a whole number, got {value}.", duration=None, print_exception=False)
    return int(value)


def live_view_available() -> bool:
    """Whether the page can show the video as it is made: Gradio streams video through the ``ffmpeg`` and
    ``ffprobe`` programs, which memo itself does not need."""
    return shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None


class RenderStopped(Exception):
    """The page that asked for the render went away (the user left or pressed stop)."""


def page_progress(progress: gr.Progress, stopped: threading.Event) -> Progress:
    """The generator's progress callback feeding ``gr.Progress`` the progress text (video time done / total, s per
    frame, time left: :mod:`memo.progress`); it stops the render once ``stopped`` is set."""

    def update(fraction: float, text: str) -> None:
        if stopped.is_set():
            raise RenderStopped
        progress(fraction, desc=text)

    return update


class WebApp:
    """The page's event handlers over one loaded generator."""

    def __init__(self, generator: MemoGenerator, output_dir: Path, streaming: bool | None = None):
        """``streaming``: show the video as it is made (:func:`live_view_available` unless given)."""
        self.generator = generator
        self.output_dir = output_dir
        self.streaming = live_view_available() if streaming is None else streaming
        self.live_dir = output_dir / LIVE_FOLDER
        self.jobs = RenderJobs(output_dir / JOBS_FOLDER)
        self.closing = threading.Event()
        """Set when the server stops: renders under way stop at their next step and keep their records and progress,
        so that the next start offers to continue them."""
        self._renders: set[threading.Event] = set()

    def stop_renders(self) -> None:
        """The server is stopping: stop every render under way at its next step, keeping what it has made."""
        self.closing.set()
        for stopped in list(self._renders):
            stopped.set()

    def preview(self, image: str | None, size: str, framing: str) -> Image.Image | None:
        """The face crop the model will see; a warning (not an error) when the image cannot be used."""
        if not image:
            return None
        try:
            with shown_in_page("Preview"):
                generator = self.generator.with_settings(framing=framing, **parse_size(size))
                return generator.prepare_image(image).framed
        except gr.Error as error:
            gr.Warning(error.message, duration=None)
            return None

    def generate(
        self,
        image: str | None,
        audio: str | None,
        emotion: str,
        size: str,
        inference_steps: float,
        cfg_scale: float,
        seed: float | None,
        framing: str,
        speed: str,
        paste_back: bool = False,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (how Gradio passes its progress bar)
    ) -> Iterator[tuple]:
        """Render the video, yielding (live segment, None) for each finished segment of the video (>= 2 s, an mp4
        the live player streams) and at last (skip, the video's path). The inputs carry the settings' names
        (the page's API too); ``size`` is ``WxH``, the ``width`` and ``height`` settings."""
        if not image:
            raise gr.Error("Upload a portrait image first, or click 'Use the example'.", print_exception=False)
        if not audio:
            raise gr.Error("Upload or record the speech first, or click 'Use the example'.", print_exception=False)
        with shown_in_page("Generation"):
            settings = {
                "inference_steps": whole_number(inference_steps, "inference_steps"),
                "cfg_scale": float(cfg_scale),
            }
            settings |= {"framing": framing, "speed": speed, "paste_back": bool(paste_back)}
            settings |= {"emotion": emotion, **parse_size(size)}
            settings |= {} if seed is None else {"seed": whole_number(seed, "seed")}
            generator = self.generator.with_settings(**settings)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        output = self.output_dir / f"{Path(image).stem}_{Path(audio).stem}_{stamp}_{uuid.uuid4().hex[:8]}.mp4"
        made = [folder for folder in (self.output_dir, *self.output_dir.parents) if not folder.exists()]
        job = self.jobs.start(Path(image), Path(audio), settings, output)
        try:
            yield from self.render(generator, job, Path(image), Path(audio), progress)  # messages name the uploads
        finally:
            for folder in (self.live_dir, self.jobs.folder, *made):  # a refused render leaves nothing behind
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def continue_render(
        self,
        name: str | None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (how Gradio passes its progress bar)
    ) -> Iterator[tuple]:
        """Render again a video whose render a restart of the server cut short (:meth:`RenderJobs.interrupted`),
        from its own copies of the inputs and its settings, into the same output; yields as :meth:`generate`."""
        job = next((job for job in self.jobs.interrupted() if job.output.name == name), None)
        if job is None:
            raise gr.Error(f"No interrupted render is called {name!r}; it may have finished.", print_exception=False)
        with shown_in_page("Generation"):
            generator = self.generator.with_settings(**job.settings)
        yield from self.render(generator, job, job.image, job.audio, progress, resume=True)

    def render(
        self,
        generator: MemoGenerator,
        job: RenderJob,
        image: Path,
        audio: Path,
        progress: gr.Progress,
        resume: bool = False,
    ) -> Iterator[tuple]:
        """Render ``job`` from ``image`` and ``audio``, yielding each live segment and then the video (see
        :meth:`generate`); the job's record is removed when the render ends here, whatever the end (only a killed
        server leaves it)."""
        progress(0, desc="Reading the image and the audio")
        segments: queue.Queue[Path | None] = queue.Queue()
        stopped = threading.Event()
        self._renders.add(stopped)
        if self.closing.is_set():
            stopped.set()
        outcome: dict[str, object] = {}

        def work(folder: Path) -> None:
            try:
                outcome["video"] = generate_watched(
                    generator,
                    image,
                    audio,
                    job.output,
                    lambda path, *_: segments.put(path),
                    folder,
                    progress=page_progress(progress, stopped),
                    resume=resume,
                )
            except BaseException as error:  # handed to the page's thread, which reports it
                outcome["error"] = error
            finally:
                segments.put(None)

        self.live_dir.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(dir=self.live_dir) as folder:
                # In this request's context: gr.Progress finds its event through context variables.
                context = contextvars.copy_context()
                worker = threading.Thread(target=context.run, args=(work, Path(folder)), name="render", daemon=True)
                worker.start()
                try:
                    while (segment := segments.get()) is not None:
                        if self.streaming:
                            yield str(segment), None
                finally:
                    stopped.set()  # the page went away: the render stops at its next step
                    worker.join()
        finally:
            self._renders.discard(stopped)
            if not self.closing.is_set():  # a render stopped by the server's stop is offered at the next start
                self.jobs.end(job)
        error = outcome.get("error")
        if isinstance(error, RenderStopped):  # the page went away, or the server is stopping: nobody to tell
            return
        if error is not None:
            with shown_in_page("Generation"):
                raise error
        yield gr.skip(), str(outcome["video"])

    def build(self) -> gr.Blocks:
        """The page: inputs and the face-crop preview on the left, settings and the video on the right."""
        config = self.generator.config
        with gr.Blocks(title="MEMO", delete_cache=CACHE_CLEANUP) as demo:
            gr.Markdown("# MEMO\nA talking video from one portrait and a speech or song recording.")
            with gr.Row():
                with gr.Column():
                    image = gr.Image(
                        label="Portrait", type="filepath", sources=["upload", "webcam", "clipboard"], height=320
                    )
                    audio = gr.Audio(label="Speech", type="filepath", sources=["upload", "microphone"])
                    example = gr.Button("Use the example", elem_id="use-example")
                    preview = gr.Image(
                        label="Face crop the model sees", interactive=False, height=256, elem_id="preview"
                    )
                with gr.Column():
                    with gr.Row():
                        emotion = gr.Dropdown(
                            ["auto", *EMOTION_NAMES], value=config.conditions.emotion, label="Emotion"
                        )
                        size = gr.Dropdown(
                            size_choices(self.generator),
                            label="Size (width x height)",
                            info="or type one, in multiples of 64",
                            allow_custom_value=True,
                        )
                        framing = gr.Radio(list(FRAMINGS), value=config.conditions.framing, label="Framing")
                    with gr.Row():
                        inference_steps = gr.Slider(
                            1, 100, value=config.sampling.inference_steps, step=1, label="Steps"
                        )
                        cfg_scale = gr.Slider(
                            1, 10, value=config.sampling.cfg_scale, step=0.1, label="Guidance (1 = off)"
                        )
                        seed = gr.Number(value=config.sampling.seed, precision=0, minimum=0, label="Seed")
                        speed = gr.Radio(
                            list(SPEEDS),
                            value=config.sampling.speed,
                            label="Speed",
                            info="fast: under a quarter of the compute, slightly different frames",
                        )
                    paste_back = gr.Checkbox(
                        value=config.video.paste_back,
                        label="Paste back into the photo",
                        info=setting_help("paste_back"),
                        elem_id="paste-back",
                    )
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    interrupted = [job.output.name for job in self.jobs.interrupted()]
                    with gr.Row(visible=bool(interrupted)):
                        pending = gr.Dropdown(
                            interrupted,
                            value=interrupted[0] if interrupted else None,
                            label="Renders cut short by a restart of the server",
                            elem_id="interrupted",
                        )
                        go_on = gr.Button("Continue", elem_id="continue")
                    live = gr.Video(
                        label="Watch it grow (the video so far, while it renders)",
                        streaming=True,
                        autoplay=True,
                        interactive=False,
                        visible=self.streaming,
                        elem_id="live",
                    )
                    video = gr.Video(label="Video", interactive=False, buttons=["download"], elem_id="video")
            example.click(
                lambda: (str(EXAMPLE_IMAGE), str(EXAMPLE_AUDIO)), outputs=[image, audio], api_visibility="private"
            )
            gr.on(
                [image.change, size.change, framing.change],
                self.preview,
                inputs=[image, size, framing],
                outputs=preview,
                api_name="preview",
                concurrency_limit=2,
            )
            run.click(
                self.generate,
                inputs=[image, audio, emotion, size, inference_steps, cfg_scale, seed, framing, speed, paste_back],
                outputs=[live, video],
                api_name="generate",
                concurrency_limit=1,
                concurrency_id="render",
            )
            go_on.click(
                self.continue_render,
                inputs=pending,
                outputs=[live, video],
                api_name="continue",
                concurrency_limit=1,
                concurrency_id="render",
            )
        return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The MEMO web app: upload a portrait and speech, get a talking video in the browser.",
        epilog="Any setting of the config can be overridden as key=value, e.g. inference_steps=30 weight_dtype=fp16.",
    )
    add_settings_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--output_dir", default="outputs/web", help="where videos are kept (default: %(default)s)")
    return parse_with_settings(parser, argv, inference_setting_names())


def main(argv: list[str] | None = None) -> int:
    """Load the models, then serve the page until interrupted; 2 for bad settings or missing models."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        args.output_dir = as_path(args.output_dir, "--output_dir")
        config = load_config(args.config, args.overrides)
        check_runtimes(config.models.vocal_separation)
        check_output_folder(args.output_dir)
        generator = MemoGenerator(config)
    except UserError as error:
        return report_error(error)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned(args.output_dir)  # videos a killed app was writing
    shutil.rmtree(args.output_dir / LIVE_FOLDER, ignore_errors=True)  # and their live segments
    app = WebApp(generator, args.output_dir)
    if not app.streaming:
        logger.warning(
            "web app: videos show when they are done; to watch them grow in the page, install FFmpeg so that "
            "ffmpeg and ffprobe are on PATH (Gradio streams video through them), e.g. apt-get install ffmpeg"
        )
    demo = app.build()
    try:
        with stop_on_signals() as stopped:
            # A stop first stops the render under way (gradio's server waits for its request before it closes).
            handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

            def stop_renders_first(signum, frame):
                app.stop_renders()
                handlers[signum](signum, frame)

            if callable(handlers[signal.SIGTERM]):  # stop_on_signals installed them (the main thread)
                for signum in STOP_SIGNALS:
                    signal.signal(signum, stop_renders_first)
            demo.queue().launch(
                server_name=args.host,
                server_port=args.port,
                share=args.share,
                allowed_paths=[str(EXAMPLE_IMAGE.parent), str(args.output_dir.resolve())],
                show_error=True,
            )
    except OSError as error:
        print(f"error: cannot serve on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        stopped.append(stop.signum if isinstance(stop, Interrupted) else signal.SIGINT)
    if stopped:
        return report_stop(
            Interrupted(stopped[0]),
            "the server is closed; a video being rendered keeps its progress, and the page offers to continue it "
            "at the next start.",
        )
    return 0
