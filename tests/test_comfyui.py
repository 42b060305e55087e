"""The ComfyUI node pack (comfyui_memo/) imported the way ComfyUI imports a custom node, its node definitions
checked against ComfyUI's node schema, and every node run on the tiny model pack with inputs in ComfyUI's own
layouts (IMAGE as LoadImage makes it, AUDIO as LoadAudio makes it).

ComfyUI itself cannot be installed here, so the few calls the pack makes into it (``comfy.model_management``,
``comfy.utils.ProgressBar``, ``folder_paths``) are answered by small stand-ins that behave as ComfyUI's do
(read from ComfyUI's sources in ``comfyanonymous/ComfyUI``, each file at the commit named, so from different
versions: ``nodes.py`` e60e19b (node definitions, ``NODE_CLASS_MAPPINGS``, custom-node loading, which registers a
folder under its own name), ``execution.py`` 00a0995 (nodes run under ``torch.inference_mode()``, input
validation), ``comfy_extras/nodes_audio.py`` 01e93c7 (AUDIO, Load Audio), ``comfy_extras/nodes_video.py`` 0413db9
(Create Video, Save Video; the VIDEO type came with 68f0d35), ``comfy/model_management.py`` 00184d1
(``free_memory``, ``unet_offload_device``, ``soft_empty_cache``, ``throw_exception_if_processing_interrupted``),
``comfy/utils.py`` 00728eb (``ProgressBar.update_absolute(value, total, preview)``), ``latent_preview.py``
0219e5b (the preview as ``("JPEG", image, args.preview_size)``), ``folder_paths.py`` (``add_model_folder_path``,
``get_folder_paths``)); nothing else of ComfyUI is imitated.

The default tier checks the import, the schema, the example workflow and one node on the models; the runs of
the generating nodes are the ``e2e`` tier.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
import types
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO
from omegaconf import OmegaConf
from PIL import Image, ImageOps

from memo.io.audio import audio_from_samples
from memo.io.video import probe_video
from memo.io.video_writer import VideoWriter

PACK_DIR = REPO / "comfyui_memo"
EXAMPLE_IMAGE = REPO / "assets" / "examples" / "portrait.jpg"
EXAMPLE_AUDIO = REPO / "assets" / "examples" / "speech.wav"
SECONDS = 1.1
FRAMES = 33  # ceil(1.1 s x 30 fps): two whole clips of 16 frames and one cut short


# -- the stand-ins for ComfyUI's modules ----------------------------------------------------------------


class InterruptProcessingException(Exception):
    pass


class ProgressBar:
    """comfy.utils.ProgressBar: a total, absolute updates (recorded here)."""

    made: list[ProgressBar] = []

    def __init__(self, total):
        self.total = total
        self.values: list[float] = []
        self.previews: list[tuple] = []
        ProgressBar.made.append(self)

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.values.append(min(value, self.total))
        if preview is not None:
            self.previews.append(preview)


def comfy_modules(models_dir: Path) -> dict[str, types.ModuleType]:
    comfy = types.ModuleType("comfy")
    management = types.ModuleType("comfy.model_management")
    management.calls = []
    management.interrupt = False
    management.InterruptProcessingException = InterruptProcessingException
    management.get_torch_device = lambda: torch.device("cpu")
    management.unet_offload_device = lambda: torch.device("cpu")
    management.free_memory = lambda memory_required, device, keep_loaded=[]: management.calls.append(
        ("free_memory", memory_required, device)
    )
    management.soft_empty_cache = lambda force=False: management.calls.append(("soft_empty_cache",))

    def throw_exception_if_processing_interrupted():
        if management.interrupt:
            management.interrupt = False
            raise InterruptProcessingException()

    management.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(preview_size=512)  # ComfyUI's --preview-size default
    comfy.model_management, comfy.utils, comfy.cli_args = management, utils, cli_args

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(models_dir)
    folder_paths.folder_names_and_paths = {}

    def add_model_folder_path(folder_name, full_folder_path, is_default=False):
        paths = folder_paths.folder_names_and_paths.setdefault(folder_name, ([], set()))[0]
        if full_folder_path not in paths:
            paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)

    folder_paths.add_model_folder_path = add_model_folder_path
    folder_paths.get_folder_paths = lambda folder_name: folder_paths.folder_names_and_paths[folder_name][0][:]
    return {
        "comfy": comfy,
        "comfy.model_management": management,
        "comfy.utils": utils,
        "comfy.cli_args": cli_args,
        "folder_paths": folder_paths,
    }


def load_custom_node(module_path: Path) -> types.ModuleType:
    """What ComfyUI's nodes.load_custom_node does with a folder: import its __init__.py as a package under a
    name made from the path, registered in sys.modules first."""
    name = str(module_path).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, module_path / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    models_dir = tmp_path_factory.mktemp("ComfyUI") / "models"
    stand_ins = comfy_modules(models_dir)
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield types.SimpleNamespace(
            models_dir=models_dir, management=stand_ins["comfy.model_management"], pack=load_custom_node(PACK_DIR)
        )
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# -- ComfyUI's layouts ------------------------------------------------------------------------------------


def load_image_node(path: Path) -> torch.Tensor:
    """LoadImage's IMAGE: upright RGB, float32 in [0, 1], (1, height, width, 3)."""
    picture = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    return torch.from_numpy(np.array(picture).astype(np.float32) / 255.0)[None]


def load_audio_node(path: Path) -> dict:
    """LoadAudio's AUDIO: the decoded channels as float32 (1, channels, samples) and the file's sample rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        chunks = [frame.to_ndarray().reshape(stream.channels, -1) for frame in container.decode(stream)]
        rate = stream.codec_context.sample_rate
    return {"waveform": torch.from_numpy(np.concatenate(chunks, axis=1).astype(np.float32))[None], "sample_rate": rate}


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """1.1 s of the bundled speech as 44.1 kHz stereo FLAC."""
    audio, rate = soundfile.read(EXAMPLE_AUDIO, dtype="float32")
    clip = audio[: int(SECONDS * rate)]
    times = np.arange(0, len(clip), rate / 44100)
    left = np.interp(times, np.arange(len(clip)), clip)
    path = tmp_path_factory.mktemp("audio") / "speech.flac"
    soundfile.write(path, np.stack([left, left * 0.5], axis=1).astype(np.float32), 44100)
    return path


def run(comfy, name: str, **inputs):
    """Run a node as ComfyUI's executor does: a fresh instance, its FUNCTION, under torch.inference_mode()."""
    node = comfy.pack.NODE_CLASS_MAPPINGS[name]()
    with torch.inference_mode():
        return getattr(node, node.FUNCTION)(**inputs)


@pytest.fixture(scope="module")
def memo(comfy, pack):
    """Load MEMO with the pack installed in ComfyUI's model folder and named by its folder name there."""
    (comfy.models_dir / "memo").mkdir(parents=True, exist_ok=True)
    (comfy.models_dir / "memo" / "tiny").symlink_to(pack, target_is_directory=True)
    config = OmegaConf.load(pack / "inference.yaml")
    # Typed as people type into the box: spaces around '=', a comment, a blank line.
    lines = [f"{key} = {config[key]} " for key in ("vae", "wav2vec", "emotion2vec")]
    settings = "\n".join(["# the tiny pack's own models", *lines, "", "inference_steps =3"])
    loaded = run(comfy, "LoadMemo", model_name_or_path="tiny", weight_dtype="fp32", device="auto", settings=settings)[0]
    assert loaded.generator.config.inference_steps == 3 and loaded.generator.config.vae == str(config["vae"])
    return loaded


GENERATE = dict(
    emotion="auto", inference_steps=2, cfg_scale=3.5, seed=7, width=64, height=64, framing="crop", allow_no_face=False
)


# -- import and schema ------------------------------------------------------------------------------------


def test_a_pack_folder_named_memo_refuses_to_load_and_says_why(comfy, tmp_path):
    """Older ComfyUI imports a custom node under its folder name; as 'memo' it would hide the memo package."""
    link = tmp_path / "memo"
    link.symlink_to(PACK_DIR, target_is_directory=True)
    saved = sys.modules.pop("memo")
    try:
        spec = importlib.util.spec_from_file_location("memo", link / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["memo"] = module
        with pytest.raises(ImportError, match="custom_nodes/ComfyUI-MEMO"):
            spec.loader.exec_module(module)
    finally:
        sys.modules["memo"] = saved


def test_pack_imports_as_a_custom_node_and_registers_its_model_folder(comfy):
    mappings, names = comfy.pack.NODE_CLASS_MAPPINGS, comfy.pack.NODE_DISPLAY_NAME_MAPPINGS
    assert set(mappings) == {"LoadMemo", "MemoEmotion", "MemoFaceCrop", "MemoGenerate", "MemoPasteBack"}
    assert set(names) == set(mappings) and all(isinstance(v, str) and v for v in names.values())
    assert comfy.pack.__name__ in sys.modules
    folders = sys.modules["folder_paths"].get_folder_paths("memo")
    assert folders == [str(comfy.models_dir / "memo")]


WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def check_input(node: str, name: str, spec) -> None:
    """One input as nodes.py declares them: (TYPE, options) or ([choices], options)."""
    assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (node, name)
    kind, options = spec[0], (spec[1] if len(spec) == 2 else {})
    assert isinstance(options, dict), (node, name)
    if isinstance(kind, list):
        assert kind and all(isinstance(choice, str) for choice in kind), (node, name)
        assert options.get("default", kind[0]) in kind, (node, name)
        return
    assert isinstance(kind, str) and kind == kind.upper(), (node, name)
    if kind in ("INT", "FLOAT"):
        number = int if kind == "INT" else (int, float)
        low, high, default = options["min"], options["max"], options["default"]
        assert all(isinstance(v, number) and not isinstance(v, bool) for v in (low, high, default)), (node, name)
        assert low <= default <= high, (node, name)
    elif kind == "STRING":
        assert isinstance(options.get("default", ""), str), (node, name)
    elif kind == "BOOLEAN":
        assert isinstance(options.get("default", False), bool), (node, name)


def test_every_node_definition_is_valid_for_comfyui(comfy):
    produced = {t for cls in comfy.pack.NODE_CLASS_MAPPINGS.values() for t in cls.RETURN_TYPES}
    for name, cls in comfy.pack.NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        assert set(inputs) <= {"required", "optional", "hidden"} and "required" in inputs, name
        for section in ("required", "optional"):
            for input_name, spec in inputs.get(section, {}).items():
                check_input(name, input_name, spec)
                kind = spec[0]
                if isinstance(kind, str) and kind.startswith("MEMO_"):
                    assert kind in produced, f"{name}.{input_name}: no node makes {kind}"
        assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES), name
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), name
        assert isinstance(cls.CATEGORY, str) and cls.CATEGORY, name
        function = getattr(cls, cls.FUNCTION)
        parameters = inspect.signature(function).parameters
        declared = {**inputs["required"], **inputs.get("optional", {})}
        assert set(parameters) - {"self"} == set(declared), name
        assert all(parameters[n].default is not inspect.Parameter.empty for n in inputs.get("optional", {})), name


# -- the nodes on the tiny pack ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_generate_gives_one_frame_per_video_frame_of_the_audio(comfy, memo, speech, tmp_path):
    image, audio = load_image_node(EXAMPLE_IMAGE), load_audio_node(speech)
    assert audio["waveform"].shape[:2] == (1, 2) and audio["sample_rate"] == 44100
    ProgressBar.made.clear()
    frames, audio_out, fps = run(comfy, "MemoGenerate", memo=memo, image=image, audio=audio, **GENERATE)

    assert frames.shape == (FRAMES, 64, 64, 3) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1 and frames.std() > 0
    assert audio_out is audio and fps == 30.0
    bar = ProgressBar.made[-1]
    assert bar.total == 3 * 2 and bar.values[-1] == bar.total  # 3 clips of 16 frames, 2 steps each
    # The preview under the node: each finished clip's last frame, as ComfyUI's samplers send a preview.
    assert [(kind, size) for kind, _, size in bar.previews] == [("JPEG", 512)] * 3
    for (_, picture, _), last in zip(bar.previews, (15, 31, FRAMES - 1), strict=True):
        expected = (frames[last] * 255).round().to(torch.uint8).numpy()
        assert picture.size == (64, 64) and (np.asarray(picture) == expected).all()

    # What Create Video + Save Video make of the outputs: an mp4 of that many frames, as long as the audio.
    output = tmp_path / "out.mp4"
    sound = audio_from_samples(audio_out["waveform"][0], audio_out["sample_rate"], "the AUDIO output")
    with VideoWriter(output, int(fps), 64, 64, audio=sound) as writer:
        writer.write(frames.permute(3, 0, 1, 2))
    info = probe_video(output)
    assert info.num_frames == FRAMES and abs(info.audio_duration - SECONDS) < 0.05
    with av.open(str(output)) as container:
        assert sum(1 for _ in container.decode(video=0)) == FRAMES


@pytest.mark.e2e
def test_speed_input_of_load_memo_reaches_generation(comfy, memo, speech):
    settings = "\n".join(f"{key}={getattr(memo.generator.config, key)}" for key in ("vae", "wav2vec", "emotion2vec"))
    fast = run(
        comfy,
        "LoadMemo",
        model_name_or_path="tiny",
        weight_dtype="fp32",
        device="auto",
        settings=settings,
        speed="fast",
    )[0]
    assert fast.generator.config.speed == "fast" and memo.generator.config.speed == "exact"
    image, audio = load_image_node(EXAMPLE_IMAGE), load_audio_node(speech)
    ProgressBar.made.clear()
    frames, _, _ = run(comfy, "MemoGenerate", memo=fast, image=image, audio=audio, **{**GENERATE, "inference_steps": 5})
    assert frames.shape == (FRAMES, 64, 64, 3) and torch.isfinite(frames).all()
    assert ProgressBar.made[-1].total == 3 * 2  # fast runs 40 % of the 5 steps: 2 per clip


@pytest.mark.e2e
def test_emotion_labels_can_be_read_edited_and_fed_to_generate(comfy, memo, speech):
    image, audio = load_image_node(EXAMPLE_IMAGE), load_audio_node(speech)
    labels, text = run(comfy, "MemoEmotion", memo=memo, audio=audio, emotion="auto", overrides="")
    assert labels.shape == (int(SECONDS * 16000),) and labels.dtype == torch.long
    lines = text.splitlines()
    assert lines[0].startswith("0.00-") and lines[-1].split(":")[0].endswith(f"-{SECONDS:.2f} s")

    overrides = "# the second half is happy\n\n0.5-end: happy"
    edited, edited_text = run(comfy, "MemoEmotion", memo=memo, audio=audio, emotion="auto", overrides=overrides)
    assert edited_text.splitlines()[-1].endswith(f"-{SECONDS:.2f} s: happy")
    assert torch.equal(edited[:8000], labels[:8000]) and (edited[8000:] == 3).all()
    # The labels text, given back as overrides, reproduces the labels it describes.
    again, _ = run(comfy, "MemoEmotion", memo=memo, audio=audio, emotion="neutral", overrides=edited_text)
    assert torch.equal(again, edited)

    # Labels fed in decide the emotion: all-sad labels give exactly the frames of emotion=sad.
    sad, sad_text = run(comfy, "MemoEmotion", memo=memo, audio=audio, emotion="sad", overrides="")
    assert sad_text == f"0.00-{SECONDS:.2f} s: sad"
    quick = {**GENERATE, "inference_steps": 1}
    given = run(comfy, "MemoGenerate", memo=memo, image=image, audio=audio, **quick, emotion_labels=sad)[0]
    forced = run(comfy, "MemoGenerate", memo=memo, image=image, audio=audio, **{**quick, "emotion": "sad"})[0]
    happy = run(comfy, "MemoGenerate", memo=memo, image=image, audio=audio, **{**quick, "emotion": "happy"})[0]
    assert torch.equal(given, forced) and not torch.equal(given, happy)


def test_face_crop_is_the_reference_frame_at_the_video_size(comfy, memo, caplog):
    image = load_image_node(EXAMPLE_IMAGE)
    crop = dict(memo=memo, width=64, height=128, framing="crop", allow_no_face=False)
    with caplog.at_level("WARNING", logger="memo"):
        reference, _ = run(comfy, "MemoFaceCrop", image=image, **crop)
    assert reference.shape == (1, 128, 64, 3) and reference.dtype == torch.float32
    assert 0 <= reference.min() and reference.max() <= 1 and reference.std() > 0.05
    assert "ComfyUI images are 0..1" not in caplog.text
    # The same picture in 0..255 (a mistake upstream) is clamped to white, and the log says so.
    with caplog.at_level("WARNING", logger="memo"):
        run(comfy, "MemoFaceCrop", image=image * 255, **{**crop, "allow_no_face": True})
    assert "reaches 255 but ComfyUI images are 0..1" in caplog.text


def test_paste_back_puts_the_crop_back_into_the_picture(comfy, memo):
    """The Face Crop's own reference frame, pasted back as if it were the video: the picture comes back (up to
    the resampling there and back), at its size or scaled to max_output_side; mismatched inputs are refused."""
    picture = torch.from_numpy(np.array(Image.open(EXAMPLE_IMAGE).convert("RGB").resize((600, 400)))).float()[None]
    picture = picture / 255.0
    crop_inputs = dict(memo=memo, width=64, height=64, framing="crop", allow_no_face=False)
    reference, crop = run(comfy, "MemoFaceCrop", image=picture, **crop_inputs)
    frames = reference.repeat(3, 1, 1, 1)
    (pasted,) = run(comfy, "MemoPasteBack", frames=frames, image=picture, crop=crop, max_output_side=1920)
    assert pasted.shape == (3, 400, 600, 3) and pasted.dtype == torch.float32
    left, top, right, bottom = crop.box
    outside = torch.ones(400, 600, dtype=torch.bool)
    outside[int(top) : int(bottom) + 1, int(left) : int(right) + 1] = False
    assert torch.equal(pasted[0][outside], picture[0][outside])
    # The 64x64 reference is the crop shrunk: pasted back it is a blurred copy of that part of the picture.
    assert (pasted[0] - picture[0]).abs().mean() < 0.05
    (small,) = run(comfy, "MemoPasteBack", frames=frames[:1], image=picture, crop=crop, max_output_side=300)
    assert small.shape == (1, 200, 300, 3)

    error = comfy.pack.runtime.MemoNodeError
    _, stretched = run(comfy, "MemoFaceCrop", image=picture, **{**crop_inputs, "framing": "stretch"})
    with pytest.raises(error, match="framing=stretch, so there is no region of the picture to paste into"):
        run(comfy, "MemoPasteBack", frames=frames, image=picture, crop=stretched, max_output_side=1920)
    with pytest.raises(error, match="The frames are 32x32 but MEMO Face Crop framed for 64x64"):
        run(comfy, "MemoPasteBack", frames=frames[:, :32, :32], image=picture, crop=crop, max_output_side=1920)
    with pytest.raises(error, match="connect the same picture to both"):
        run(comfy, "MemoPasteBack", frames=frames, image=picture[:, :200], crop=crop, max_output_side=1920)


@pytest.mark.e2e
def test_bad_input_is_a_one_line_comfyui_error(comfy, memo, speech):
    error = comfy.pack.runtime.MemoNodeError
    image, audio = load_image_node(EXAMPLE_IMAGE), load_audio_node(speech)
    blank = torch.full((1, 256, 256, 3), 0.5)
    with pytest.raises(error, match="No face was found in the IMAGE input") as caught:
        run(comfy, "MemoGenerate", memo=memo, image=blank, audio=audio, **GENERATE)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(error, match="must span seconds inside the audio"):
        run(comfy, "MemoEmotion", memo=memo, audio=audio, emotion="auto", overrides="2-3: happy")
    other = torch.zeros(16000, dtype=torch.long)
    with pytest.raises(
        error, match=r"cover 1.00 s but the audio lasts 1.10 s \(The AUDIO input\); label the same audio"
    ):
        run(comfy, "MemoGenerate", memo=memo, image=image, audio=audio, **GENERATE, emotion_labels=other)
    with pytest.raises(error, match="Unknown setting 'resolutoin' in Load MEMO's settings box"):
        run(
            comfy,
            "LoadMemo",
            model_name_or_path="tiny",
            weight_dtype="fp32",
            device="cpu",
            settings=" resolutoin = 128",
        )
    with pytest.raises(
        error, match="Line 2 of Load MEMO's settings box sets 'device', which Load MEMO's own inputs decide"
    ):
        run(
            comfy,
            "LoadMemo",
            model_name_or_path="tiny",
            weight_dtype="fp32",
            device="cpu",
            settings="# mine\ndevice = cuda",
        )
    with pytest.raises(error, match="must look like key=value"):
        run(
            comfy,
            "LoadMemo",
            model_name_or_path="tiny",
            weight_dtype="fp32",
            device="cpu",
            settings="vocal_separation false",
        )
    with pytest.raises(
        error, match="Line 1 of Load MEMO's settings box sets 'offload', which does not apply in ComfyUI"
    ):
        run(comfy, "LoadMemo", model_name_or_path="tiny", weight_dtype="fp32", device="cpu", settings="offload=model")
    if not torch.cuda.is_available():
        with pytest.raises(error, match="device=cuda but PyTorch finds no CUDA GPU here"):
            run(comfy, "LoadMemo", model_name_or_path="tiny", weight_dtype="fp32", device="cuda", settings="")
    for node, inputs in (
        ("MemoFaceCrop", dict(width=64, height=64, framing="crop", allow_no_face=False)),
        ("MemoGenerate", dict(audio=audio, **GENERATE)),
    ):
        with pytest.raises(error, match=r"The IMAGE input holds no picture \(shape \(0, "):
            run(comfy, node, memo=memo, image=image[:0], **inputs)
    no_rate = {**audio, "sample_rate": 0}
    with pytest.raises(error, match="The AUDIO input has sample rate 0; it must be a positive whole number of Hz"):
        run(comfy, "MemoEmotion", memo=memo, audio=no_rate, emotion="auto", overrides="")
    with pytest.raises(error, match="model_name_or_path=/nowhere/memo: no such folder"):
        run(comfy, "LoadMemo", model_name_or_path="/nowhere/memo", weight_dtype="fp32", device="cpu", settings="")
    silent_nan = {"waveform": torch.full((1, 1, 16000), float("nan")), "sample_rate": 16000}
    with pytest.raises(error, match="NaN"):
        run(comfy, "MemoGenerate", memo=memo, image=image, audio=silent_nan, **GENERATE)


@pytest.mark.e2e
def test_stop_button_interrupts_between_steps_and_models_go_back(comfy, memo, speech):
    image, audio = load_image_node(EXAMPLE_IMAGE), load_audio_node(speech)
    comfy.management.calls.clear()
    comfy.management.interrupt = True
    with pytest.raises(InterruptProcessingException):
        run(comfy, "MemoGenerate", memo=memo, image=image, audio=audio, **GENERATE)
    assert ProgressBar.made[-1].values == [1]  # stopped after the first step
    assert comfy.management.calls[-1] == ("soft_empty_cache",)


WORKFLOWS = {
    "portrait_to_video_api.json": {"LoadMemo", "MemoEmotion", "MemoGenerate"},
    "portrait_to_video_paste_back_api.json": {"LoadMemo", "MemoFaceCrop", "MemoGenerate", "MemoPasteBack"},
}


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_example_workflow_uses_core_nodes_and_these(comfy, name):
    """The API-format example passes the checks of ComfyUI's execution.validate_inputs: required inputs given,
    each link joins an output to an input of the same type, widget values within min/max or among the
    choices. Core nodes are taken as their definitions read in ComfyUI (LoadImage, LoadAudio, CreateVideo,
    SaveVideo)."""
    core = {
        "LoadImage": ({"image": "COMBO"}, ("IMAGE", "MASK")),
        "LoadAudio": ({"audio": "COMBO"}, ("AUDIO",)),
        "CreateVideo": ({"images": "IMAGE", "fps": "FLOAT", "audio": "AUDIO"}, ("VIDEO",)),
        "SaveVideo": ({"video": "VIDEO", "filename_prefix": "STRING", "format": "COMBO", "codec": "COMBO"}, ()),
    }
    specs = {
        name: {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
        for name, cls in comfy.pack.NODE_CLASS_MAPPINGS.items()
    }
    ours = {
        name: (
            {k: v[0] if isinstance(v[0], str) else "COMBO" for k, v in spec.items()},
            comfy.pack.NODE_CLASS_MAPPINGS[name].RETURN_TYPES,
        )
        for name, spec in specs.items()
    }
    definitions = {**core, **ours}
    assert sorted(path.name for path in (PACK_DIR / "workflows").glob("*.json")) == sorted(WORKFLOWS)
    workflow = json.loads((PACK_DIR / "workflows" / name).read_text())
    kinds = {node["class_type"] for node in workflow.values()}
    assert kinds == {"LoadImage", "LoadAudio", "CreateVideo", "SaveVideo", *WORKFLOWS[name]}
    for node_id, node in workflow.items():
        inputs, _ = definitions[node["class_type"]]
        assert set(node["inputs"]) <= set(inputs), node_id
        if node["class_type"] in specs:
            assert set(comfy.pack.NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()["required"]) <= set(
                node["inputs"]
            )
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                source, index = value
                assert definitions[workflow[source]["class_type"]][1][index] == inputs[name], (node_id, name)
            elif node["class_type"] in specs:
                spec = specs[node["class_type"]][name]
                kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
                if isinstance(kind, list):
                    assert value in kind, (node_id, name)
                else:
                    assert options.get("min", value) <= value <= options.get("max", value), (node_id, name)
