"""The web app as a user meets it: ``python app.py`` on the tiny model pack, driven through gradio_client and a
real headless Chromium; bad input comes back as our message, and a second request waits for the first.

The browser test keeps a screenshot of the page with its video at ``test-artifacts/app.png``. The server, the
client and the browser are the ``e2e`` tier; the page's handlers and the start-up checks also run in this
process (default tier).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile
from conftest import REPO, decoded_video, run_main
from PIL import Image

from memo.io.video import probe_video

gradio_client = pytest.importorskip("gradio_client")

EXAMPLE_IMAGE = REPO / "assets" / "examples" / "portrait.jpg"
EXAMPLE_AUDIO = REPO / "assets" / "examples" / "speech.wav"
CHROMIUM = Path(os.environ.get("MEMO_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOT = REPO / "test-artifacts" / "app.png"
CLIP_SECONDS = 1.5


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """The bundled speech cut to 1.5 s."""
    audio, rate = soundfile.read(EXAMPLE_AUDIO, dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "speech_short.wav"
    soundfile.write(path, audio[: int(CLIP_SECONDS * rate)], rate)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(pack: Path, root: Path, *overrides: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python app.py`` on a free port with its outputs in ``root / "outputs"``; yields its address and process,
    and stops it (SIGTERM) on leaving, its log printed."""
    port = free_port()
    log = (root / "app.log").open("a")
    command = [
        sys.executable, str(REPO / "app.py"), "--config", str(pack / "inference.yaml"), "--port", str(port),
        "--output_dir", str(root / "outputs"), *overrides,
    ]  # fmt: skip
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(root / "gradio")}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 600  # loading gradio and the models on busy shared cores takes minutes
        while True:
            assert process.poll() is None, (root / "app.log").read_text()
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the app did not start:\n" + (root / "app.log").read_text()
                time.sleep(0.5)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        print((root / "app.log").read_text())


@pytest.fixture(scope="module")
def app_url(pack, tmp_path_factory):
    """``python app.py`` on a free port; one step without guidance by default, so the full example renders fast."""
    with serving(pack, tmp_path_factory.mktemp("app"), "inference_steps=1", "cfg_scale=1") as (url, _):
        yield url


def generate_args(
    image: Path, audio: Path, *, steps: int = 2, guidance: float = 3.5, speed: str = "exact", paste_back: bool = False
) -> tuple:
    """The /generate endpoint's inputs: image, audio, emotion, size, steps, guidance, seed, framing, speed,
    paste_back."""
    handle_file = gradio_client.handle_file
    files = handle_file(str(image)), handle_file(str(audio))
    return *files, "auto", "64x64", steps, guidance, 7, "crop", speed, paste_back


@pytest.mark.e2e
def test_renders_uploads_with_progress_and_queues_the_next_request(app_url, speech, tmp_path):
    from gradio_client.exceptions import AppError
    from gradio_client.utils import Status

    client = gradio_client.Client(app_url, verbose=False, download_files=str(tmp_path))
    faceless = tmp_path / "flat_grey.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(faceless)

    good = client.submit(*generate_args(EXAMPLE_IMAGE, speech), api_name="/generate")
    while good.status().code not in (Status.PROCESSING, Status.PROGRESS, Status.FINISHED):
        time.sleep(0.05)
    bad = client.submit(*generate_args(faceless, speech, speed="fast"), api_name="/generate")
    progress: list[tuple[float, str]] = []
    bad_states: set[Status] = set()
    deadline = time.monotonic() + 300
    while not bad.done() and time.monotonic() < deadline:
        progress += [(update.progress or 0.0, update.desc or "") for update in good.status().progress_data or []]
        bad_states.add(bad.status().code)
        time.sleep(0.05)
    good_when_bad_ended = good.done() or progress[-1][0]

    _, video = good.result()  # the live stream's combined copy, and the video itself
    info = probe_video(video["video"] if isinstance(video, dict) else video)
    assert info.num_frames == math.ceil(CLIP_SECONDS * 30) and info.has_audio
    assert any("left" in desc for _, desc in progress), progress  # step progress with the time left
    with pytest.raises(AppError, match="No face was found in .*flat_grey.png"):
        bad.result()
    assert Status.IN_QUEUE in bad_states, bad_states
    assert good_when_bad_ended == 1, "the second request ran alongside the first instead of waiting for it"


@pytest.mark.e2e
def test_preview_shows_the_face_crop(app_url, tmp_path):
    client = gradio_client.Client(app_url, verbose=False, download_files=str(tmp_path))
    path = client.predict(gradio_client.handle_file(str(EXAMPLE_IMAGE)), "128x64", "crop", api_name="/preview")
    assert Image.open(path).size == (128, 64)


@pytest.mark.e2e
def test_the_page_in_a_browser_renders_the_example(app_url):
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MEMO_TEST_CHROMIUM)")
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (no browser download needed)"
    )
    with playwright.sync_playwright() as driver, tempfile.TemporaryDirectory() as profile:
        browser = driver.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 1000}
        )
        try:
            page = browser.new_page()
            page.goto(app_url, wait_until="domcontentloaded")
            page.locator("#use-example").click()
            page.locator("#preview img").wait_for(timeout=60_000)
            page.locator("#generate").click()
            video = page.locator("#video video")
            video.wait_for(timeout=300_000)
            assert video.get_attribute("src")
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            print(f"screenshot: {SCREENSHOT}")
        finally:
            browser.close()


@pytest.mark.e2e
def test_the_page_shows_the_video_growing_before_the_render_ends(app_url):
    """Chromium plays the live stream: the player has frames to show while the render still goes on (the final
    video not yet in the page), then the final video comes. The example speech (11 s) makes 6 segments."""
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MEMO_TEST_CHROMIUM)")
    from memo.apps.web import live_view_available

    if not live_view_available():
        pytest.skip("no ffmpeg and ffprobe on PATH, through which Gradio streams video (apt-get install ffmpeg)")
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (no browser download needed)"
    )
    with playwright.sync_playwright() as driver, tempfile.TemporaryDirectory() as profile:
        browser = driver.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 1000}
        )
        try:
            page = browser.new_page()
            page.goto(app_url, wait_until="domcontentloaded")
            page.locator("#use-example").click()
            page.locator("#preview img").wait_for(timeout=60_000)
            page.locator("#generate").click()
            # A decoded frame in the live player (HAVE_CURRENT_DATA), and at that moment no final video yet.
            seen = page.wait_for_function(
                """() => {
                    const live = document.querySelector('#live video');
                    if (!live || live.readyState < 2 || live.videoWidth === 0) return null;
                    return {final: document.querySelector('#video video') !== null, width: live.videoWidth};
                }""",
                timeout=300_000,
                polling=100,
            ).json_value()
            assert seen == {"final": False, "width": 64}, seen
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT.with_name("app-live.png")), full_page=True)
            page.locator("#video video").wait_for(timeout=300_000)
        finally:
            browser.close()


def test_bad_settings_stop_the_app_with_a_message(pack):
    """In this process; ``app.py`` started as a program stops on bad settings in test_settings.py."""
    from memo.apps import web

    result = run_main(web.main, ["--config", str(pack / "inference.yaml"), "resolution=100"])
    assert result.returncode == 2
    assert "error: Invalid settings: width must be a positive multiple of 64" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def loaded(pack):
    """One generator on the tiny pack for the in-process tests of the page."""
    from memo.generator import MemoGenerator
    from memo.settings.inference import load_config

    return MemoGenerator(load_config(pack / "inference.yaml", ["cfg_scale=1"]))


def test_the_page_renders_previews_and_refuses_in_process(loaded, speech, tmp_path):
    """The handlers the page calls, on one loaded generator: a video with progress, the face crop, our message."""
    import gradio as gr

    from memo.apps.web import WebApp

    app = WebApp(loaded, tmp_path / "web", streaming=True)  # the page's streaming needs ffmpeg; the handler not
    app.build()
    progress: list[tuple[float, str]] = []

    def record(fraction, desc=""):
        progress.append((fraction, desc))

    updates = app.generate(
        str(EXAMPLE_IMAGE), str(speech), "auto", "64x64", 1, 1.0, 7, "crop", "exact", progress=record
    )
    # The live player gets the video so far with its sound before the final video comes (here one segment: 1.5 s
    # is under the 2 s a segment gathers); the segments are removed once the render is over.
    segment, nothing = next(updates)
    live = probe_video(segment)
    assert nothing is None and live.num_frames == math.ceil(CLIP_SECONDS * 30) and live.has_audio
    ((skip, video),) = list(updates)
    assert skip == gr.skip() and not Path(segment).exists()
    info = probe_video(video)
    assert Path(video).parent == tmp_path / "web"
    assert info.num_frames == math.ceil(CLIP_SECONDS * 30) and info.has_audio
    assert any("00:01.5 video" in desc and "s/frame" in desc and "left" in desc for _, desc in progress), progress
    assert app.preview(str(EXAMPLE_IMAGE), "128x64", "crop").size == (128, 64)
    faceless = tmp_path / "flat_grey.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(faceless)
    with pytest.raises(gr.Error, match="No face was found in .*flat_grey.png"):
        list(app.generate(str(faceless), str(speech), "auto", "64x64", 1, 1.0, 7, "crop", "fast", progress=record))
    # The paste back checkbox: the video at the photo's size (a wide one, to tell it from the square crop).
    wide = tmp_path / "wide.png"
    Image.open(EXAMPLE_IMAGE).convert("RGB").resize((384, 256)).save(wide)
    *_, (_, pasted) = app.generate(
        str(wide), str(speech), "auto", "64x64", 1, 1.0, 7, "crop", "exact", True, progress=record
    )
    assert (probe_video(pasted).width, probe_video(pasted).height) == (384, 256)
    with pytest.raises(gr.Error, match="paste_back=true needs framing=crop"):
        list(
            app.generate(str(wide), str(speech), "auto", "64x64", 1, 1.0, 7, "stretch", "exact", True, progress=record)
        )


def test_a_render_cut_short_by_a_restart_is_offered_and_continues(loaded, speech, tmp_path):
    """A server killed mid-render leaves the render's record (its inputs' copies and settings); the next server's
    page offers it, and Continue renders it into the same output, then forgets it."""
    from memo.apps.web import WebApp

    killed = WebApp(loaded, tmp_path / "web")
    output = tmp_path / "web" / "portrait_speech_short_cut.mp4"
    killed.jobs.start(EXAMPLE_IMAGE, speech, {"width": 64, "height": 64, "inference_steps": 1, "seed": 7}, output)

    app = WebApp(loaded, tmp_path / "web")  # the restarted server
    [job] = app.jobs.interrupted()
    assert job.output == output and job.image.read_bytes() == EXAMPLE_IMAGE.read_bytes()
    demo = app.build()
    offered = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "interrupted")
    assert offered.value == output.name
    *_, (_, video) = app.continue_render(output.name, progress=lambda *args, **kwargs: None)
    assert Path(video) == output and probe_video(video).num_frames == math.ceil(CLIP_SECONDS * 30)
    assert app.jobs.interrupted() == [] and not job.folder.exists()


@pytest.mark.e2e
def test_a_render_stopped_with_the_server_continues_after_a_restart(pack, tmp_path):
    """Issue 27 for the web app, as a user meets it: the server is stopped (SIGTERM) mid-render; the restarted
    server's page offers the render, and Continue goes on from its saved clips (the log says so) to the video an
    uninterrupted render of the same request gives, frame for frame, with the same sound."""
    import numpy as np

    from memo.io.job_state import state_folder

    audio, rate = soundfile.read(EXAMPLE_AUDIO, dtype="float32")
    talk = tmp_path / "talk.wav"
    soundfile.write(talk, audio[: round(2.2 * rate)], rate)  # 5 clips of 16 frames at 30 fps
    outputs = tmp_path / "outputs"
    with serving(pack, tmp_path) as (url, server):
        client = gradio_client.Client(url, verbose=False)
        client.submit(*generate_args(EXAMPLE_IMAGE, talk), api_name="/generate")
        deadline = time.monotonic() + 300
        while not list(outputs.glob(".*.mp4.resume/clip-00001.pt")):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "app.log").read_text()
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    [folder] = outputs.glob(".*.mp4.resume")
    name = folder.name[1 : -len(".resume")]
    with serving(pack, tmp_path) as (url, _):
        page = urllib.request.urlopen(url + "config", timeout=30).read().decode()
        assert name in page  # offered under "Renders cut short by a restart of the server"
        client = gradio_client.Client(url, verbose=False)
        _, continued = client.predict(name, api_name="/continue")
        _, whole = client.predict(*generate_args(EXAMPLE_IMAGE, talk), api_name="/generate")
    log = (tmp_path / "app.log").read_text()
    assert log.count("resuming at 00:0") == 1 and "Traceback" not in log, log

    def decoded(video) -> tuple[np.ndarray, np.ndarray]:
        return decoded_video(video["video"] if isinstance(video, dict) else video)

    (frames, sound), (expected_frames, expected_sound) = decoded(continued), decoded(whole)
    assert np.array_equal(frames, expected_frames) and np.array_equal(sound, expected_sound)
    assert (outputs / name).is_file() and not state_folder(outputs / name).exists()
    assert not list((outputs / ".renders").glob("*/job.json"))
