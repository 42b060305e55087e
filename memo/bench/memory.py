"""Device memory of generation, counted on the real code path: every allocation and free of every tensor.

:class:`MemoryCounter` is a ``TorchDispatchMode``: each aten op the pipeline runs passes through it, and
each new storage it returns is counted on its device until the storage dies (a weak reference's callback,
so views, in-place ops and frees count as the allocator sees them). A storage's *kind* (weights, temporal
memory, reference features, VAE, activations) follows it: the weights are registered before the call,
a copy between devices keeps the kind of its source (and its bytes count as a host<->device transfer),
what the VAE allocates is VAE, and the temporal memory and the reference features are re-tagged when they
are made (``TemporalMemory.absorb``, the reference net's output). The peak is the largest total of live
device bytes, with the kinds as they stood at that moment.

Under ``torch._subclasses.fake_tensor.FakeTensorMode`` the same pipeline call runs on fake tensors that
stand for a CUDA device (no memory, no GPU), so the full-size networks can be counted on any machine
(:func:`count_generation`); on real tensors the same counter tracks a real run, which is how the tests
check the count (``tests/test_memory.py``). Counted bytes are what ``torch.cuda.max_memory_allocated``
reports (each block rounded up to 512 bytes as the CUDA caching allocator does), not what the allocator
reserves: fragmentation and the CUDA context (about 0.5 GiB) come on top.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memo.models.diffusion_net import DiffusionNet
from memo.models.projections import AudioProjModel, ImageProjModel
from memo.models.reference_net import ReferenceFeatures, ReferenceNet
from memo.models.temporal_memory import TemporalMemory
from memo.pipeline import MemoPipeline

KINDS = ("weights", "temporal memory", "reference features", "activations", "VAE")
"""The kinds device bytes are split into."""

SD_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    sample_size=256,
)
"""The architecture of stabilityai/sd-vae-ft-mse (its config.json), the VAE MEMO is published with."""

PUBLISHED = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "published"
"""The published networks' config.json files (``<name>.config.json``), when this checkout has them."""

CUDA_BLOCK = 512
"""The CUDA caching allocator rounds every allocation up to a multiple of 512 bytes."""

_TRANSFERS = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten._copy_from.default}


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
        return None


@dataclass
class MemoryCount:
    """What one counted (or tracked) run used.

    ``peak_bytes``: the largest total of live bytes on the device; ``peak_split``: that total by kind
    (``KINDS``); ``host_bytes``: the largest total of live bytes of the kinds weights, temporal memory and
    reference features on the host (pinned when offloading to CUDA); ``to_device_bytes`` /
    ``to_host_bytes``: bytes copied host->device / device->host; ``frames``: frames generated;
    ``step_peaks`` / ``step_moved``: the device peak and the bytes moved of each denoising step, in order
    (to show the peak is periodic, and to extend a count of a few steps to many); ``counted_steps``: the
    steps per clip counted.
    """

    peak_bytes: int = 0
    peak_split: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0
    to_device_bytes: int = 0
    to_host_bytes: int = 0
    frames: int = 0
    step_peaks: list[int] = field(default_factory=list)
    step_moved: list[int] = field(default_factory=list)
    counted_steps: int = 0

    @property
    def moved_per_frame(self) -> float:
        """Bytes moved between host and device per generated frame."""
        return (self.to_device_bytes + self.to_host_bytes) / max(self.frames, 1)

    def moved_per_frame_at(self, steps_per_clip: int) -> float:
        """:attr:`moved_per_frame` with ``steps_per_clip`` steps per clip, from a count of fewer: every
        step after the first (which writes the temporal memory) moves what the last counted step moved."""
        clips = max(len(self.step_moved), 1) // max(self.counted_steps, 1)
        extra = (steps_per_clip - self.counted_steps) * clips * (self.step_moved[-1] if self.step_moved else 0)
        return (self.to_device_bytes + self.to_host_bytes + extra) / max(self.frames, 1)


class MemoryCounter(TorchDispatchMode):
    """Counts the live bytes of every storage on ``device`` (and the host, when it is another device).

    Use as a context manager around the work; :meth:`register` the tensors that already exist (the weights),
    :meth:`kind` to label what a block of code allocates, :meth:`retag` to change the kind of existing
    tensors. ``round_to`` rounds each storage up (``CUDA_BLOCK`` for a CUDA device).
    """

    def __init__(self, device: torch.device, round_to: int = 1):
        super().__init__()
        self.device = torch.device(device)
        self.round_to = round_to
        self.live: dict[int, tuple[str, str, int]] = {}  # storage -> (place, kind, bytes)
        self.current: dict[str, Counter] = {"device": Counter(), "host": Counter()}
        self.peak = 0
        self.peak_split: dict[str, int] = {}
        self.host_peak = 0
        self.window_peak = 0
        self.to_device = 0
        self.to_host = 0
        self.kinds = ["activations"]

    def _place(self, device: torch.device) -> str | None:
        if device.type == self.device.type and (device.index or 0) == (self.device.index or 0):
            return "device"
        if device.type == "cpu":
            return "host"
        return None

    def _forget(self, key: int) -> None:
        place, kind, nbytes = self.live.pop(key)
        self.current[place][kind] -= nbytes

    def _add(self, tensor: torch.Tensor, kind: str) -> None:
        storage = _storage(tensor)
        if storage is None or storage._cdata in self.live:
            return
        place = self._place(tensor.device)
        if place is None:
            return
        nbytes = -(-storage.nbytes() // self.round_to) * self.round_to
        key = storage._cdata
        self.live[key] = (place, kind, nbytes)
        self.current[place][kind] += nbytes
        weakref.finalize(storage, self._forget, key)
        self._update_peaks()

    def _update_peaks(self) -> None:
        total = sum(self.current["device"].values())
        self.window_peak = max(self.window_peak, total)
        if total > self.peak:
            self.peak = total
            self.peak_split = {k: self.current["device"][k] for k in KINDS}
        if self.device.type != "cpu":
            host = sum(self.current["host"][k] for k in KINDS if k != "activations" and k != "VAE")
            self.host_peak = max(self.host_peak, host)

    def kind_of(self, tensor: torch.Tensor) -> str | None:
        storage = _storage(tensor)
        entry = self.live.get(storage._cdata) if storage is not None else None
        return entry[1] if entry else None

    def register(self, tensors, kind: str) -> None:
        """Count ``tensors`` (any nesting of tensors) that exist already, as ``kind``."""
        for tensor in tree_leaves(tensors):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor, kind)

    def retag(self, tensors, kind: str) -> None:
        """Count the storages of ``tensors`` as ``kind`` from now on (registering them when new)."""
        for tensor in tree_leaves(tensors):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = _storage(tensor)
            entry = self.live.get(storage._cdata) if storage is not None else None
            if entry is None:
                self._add(tensor, kind)
                continue
            place, old, nbytes = entry
            self.current[place][old] -= nbytes
            self.current[place][kind] += nbytes
            self.live[storage._cdata] = (place, kind, nbytes)
        self._update_peaks()

    @contextlib.contextmanager
    def kind(self, kind: str) -> Iterator[None]:
        """Label what is allocated inside as ``kind``."""
        self.kinds.append(kind)
        try:
            yield
        finally:
            self.kinds.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = self.kinds[-1]
        if func in _TRANSFERS:
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = args[0] if func is torch.ops.aten.copy_.default else out
            if isinstance(source, torch.Tensor) and source.device != target.device:
                moved = source.numel() * source.element_size()
                if self._place(target.device) == "device":
                    self.to_device += moved
                elif self._place(source.device) == "device":
                    self.to_host += moved
                kind = self.kind_of(source) or kind
                if func is torch.ops.aten.copy_.default:
                    self.retag(target, kind)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor, kind)
        return out

    def device_bytes(self) -> int:
        """Live bytes on the device now."""
        return sum(self.current["device"].values())


@contextlib.contextmanager
def labelled(
    counter: MemoryCounter, pipe: MemoPipeline, step_peaks: list[int], step_moved: list[int]
) -> Iterator[None]:
    """Label the pipeline's allocations while it runs: VAE calls, the reference net's output, the temporal
    memory's states; record the device peak of each diffusion-net call (reset before each)."""
    encode, decode = pipe.vae.encode, pipe.decode_latents
    absorb = TemporalMemory.absorb
    reference_forward = pipe.reference_net.forward
    net_forward = pipe.diffusion_net.forward

    def in_vae(method):
        def run(*args, **kwargs):
            with counter.kind("VAE"):
                return method(*args, **kwargs)

        return run

    def counted_absorb(memory, name, keys, values):
        absorb(memory, name, keys, values)
        counter.retag(memory.states[name], "temporal memory")

    def counted_reference(*args, **kwargs):
        features = reference_forward(*args, **kwargs)
        if isinstance(features, ReferenceFeatures):
            counter.retag([features.down, features.mid, features.up], "reference features")
        return features

    def counted_step(*args, **kwargs):
        counter.window_peak = counter.device_bytes()
        moved = counter.to_device + counter.to_host
        try:
            return net_forward(*args, **kwargs)
        finally:
            step_peaks.append(counter.window_peak)
            step_moved.append(counter.to_device + counter.to_host - moved)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(pipe.vae, "encode", in_vae(encode)))
        stack.enter_context(mock.patch.object(pipe, "decode_latents", in_vae(decode)))
        stack.enter_context(mock.patch.object(TemporalMemory, "absorb", counted_absorb))
        stack.enter_context(mock.patch.object(pipe.reference_net, "forward", counted_reference))
        stack.enter_context(mock.patch.object(pipe.diffusion_net, "forward", counted_step))
        yield


def full_size_pipeline(
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.bfloat16,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
) -> MemoPipeline:
    """The MEMO networks at their published sizes (from ``PUBLISHED``'s configs when present, else the
    classes' defaults, which are the same) and the SD VAE, with random weights on ``device`` (build on
    ``meta``, or on any device under ``FakeTensorMode``, to hold no memory)."""
    nets = {"reference_net": ReferenceNet, "diffusion_net": DiffusionNet}
    nets |= {"image_proj": ImageProjModel, "audio_proj": AudioProjModel}
    with torch.device(device):
        built = {}
        for name, cls in nets.items():
            path = PUBLISHED / f"{name}.config.json"
            built[name] = cls.from_config(json.loads(path.read_text())) if path.is_file() else cls()
        built["vae"] = AutoencoderKL(**SD_VAE_CONFIG)
    pipe = MemoPipeline(scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), **built)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            # torch's own cast: diffusers' ModelMixin.to warns about float32 modules on every dtype cast, even
            # when the list of such modules is empty, as it is for these networks.
            torch.nn.Module.to(module, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fake_inputs(pipe: MemoPipeline, height: int, width: int, frames: int) -> dict:
    """The pipeline call's inputs as the generator hands them over (on the host): a reference image, a face
    embedding, ``frames`` frames of wav2vec2 features and emotion labels."""
    proj = pipe.audio_proj.config
    return dict(
        reference_image=torch.zeros(1, 3, height, width),
        face_embedding=torch.zeros(1, pipe.image_proj.config.clip_embeddings_dim),
        audio_features=torch.zeros(frames, proj.seq_len, proj.blocks, proj.channels),
        emotion_labels=torch.zeros(frames, dtype=torch.long),
    )


def _all_weights(pipe: MemoPipeline) -> list[torch.Tensor]:
    return [
        t
        for module in pipe.components.values()
        if isinstance(module, torch.nn.Module)
        for t in (*module.parameters(), *module.buffers())
    ]


def run_counted(
    pipe: MemoPipeline, counter: MemoryCounter, inputs: dict, frames_per_clip: int = 16, **call
) -> MemoryCount:
    """Run ``pipe(**inputs, **call)`` (frames streamed to a callback, as the generator does) under
    ``counter`` and return what it counted. The weights are registered first, wherever they are."""
    step_peaks: list[int] = []
    step_moved: list[int] = []
    frames = 0

    def on_clip(_pipe, _clip, video):
        nonlocal frames
        frames += video.shape[1]

    with counter:
        counter.register(_all_weights(pipe), "weights")
        with labelled(counter, pipe, step_peaks, step_moved):
            pipe(**inputs, frames_per_clip=frames_per_clip, output_type=None, callback_on_clip_end=on_clip, **call)
    return MemoryCount(
        peak_bytes=counter.peak,
        peak_split=dict(counter.peak_split),
        host_bytes=counter.host_peak,
        to_device_bytes=counter.to_device,
        to_host_bytes=counter.to_host,
        frames=frames,
        step_peaks=step_peaks,
        step_moved=step_moved,
        counted_steps=call.get("num_inference_steps", 20),
    )


def _cuda_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """``scaled_dot_product_attention`` as it runs on a CUDA GPU: with fake tensors no GPU is found, and
    torch would fall back to the math kernel (which holds the whole attention matrix); a GPU runs the
    flash kernel for fp16/bf16 without a mask (head sizes up to 256), the memory-efficient one otherwise."""
    if query.device.type != "cuda" or kwargs:
        return _sdpa(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
        )
    if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[
            0
        ]
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, False, dropout_p, is_causal, scale=scale
    )[0]


_sdpa = torch.nn.functional.scaled_dot_product_attention
_tensor_data = torch._C.TensorBase.data


def _set_fake_data(tensor: torch.Tensor, new: torch.Tensor) -> None:
    """``tensor.data = new`` for a fake tensor, moving its device with its data (diffusers' group offload
    moves weights this way; a fake tensor keeps its device in a Python attribute the setter leaves alone)."""
    _tensor_data.__set__(tensor, new)
    if hasattr(new, "fake_device"):
        tensor.fake_device = new.fake_device


@contextlib.contextmanager
def fake_device() -> Iterator[None]:
    """Fake tensors for everything made inside (``FakeTensorMode``): any device, CUDA included, no memory.

    Modules move between fake devices as real ones do: ``Module.to`` swaps a fake parameter's Python object
    (``torch.utils.swap_tensors``), which refuses tensors with weak references, and every fake tensor has
    some (the fake mode's own bookkeeping); the check is lifted inside, since nothing here reads those
    references after a move, and ``tensor.data = moved`` moves a fake tensor's device too. Attention
    runs the kernels a GPU would (:func:`_cuda_attention`). The emotion of a clip (a value read back from a
    tensor) is taken as 0.
    """
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    no_weakrefs = SimpleNamespace(getweakrefs=lambda _tensor: [])
    with contextlib.ExitStack() as stack:
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(mock.patch.object(torch.utils, "weakref", no_weakrefs))
        stack.enter_context(mock.patch.object(FakeTensor, "data", property(_tensor_data.__get__, _set_fake_data)))
        stack.enter_context(mock.patch("memo.sampling.conditioning.clip_emotion", lambda labels: 0))
        stack.enter_context(mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _cuda_attention))
        yield


def count_generation(
    offload: str,
    resolution: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    clips: int = 1,
    steps: int = 20,
    frames_per_clip: int = 16,
    past_frames: int = 16,
    guidance_scale: float = 3.5,
    fp8: bool = False,
) -> MemoryCount:
    """Count the CUDA memory of generating ``clips`` clips at ``resolution`` x ``resolution`` with the
    full-size networks in memory mode ``offload`` (``memo.runtime.placement``), on fake tensors: no GPU and
    no memory needed. The call is the generator's: the published defaults for everything not given."""
    from memo.runtime.placement import apply_offload

    device = torch.device("cuda", 0)
    scheduler = FlowMatchEulerDiscreteScheduler()  # made of real tensors: its set-up reads their values
    with fake_device():
        pipe = full_size_pipeline("cpu", dtype, scheduler)
        apply_offload(pipe, offload, device, fp8=fp8)
        inputs = fake_inputs(pipe, resolution, resolution, clips * frames_per_clip)
        return run_counted(
            pipe,
            MemoryCounter(device, round_to=CUDA_BLOCK),
            inputs,
            frames_per_clip=frames_per_clip,
            past_frames=past_frames,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            seed=0,
        )


def count_modes(modes: Sequence[str], **settings) -> dict[str, MemoryCount]:
    """:func:`count_generation` of each of ``modes`` with the same ``settings``."""
    return {mode: count_generation(mode, **settings) for mode in modes}


def as_json(counts: dict[str, MemoryCount], **settings) -> dict:
    """``{"settings": ..., "modes": {mode: {"peak_bytes": ..., ...}}}``."""
    modes = {mode: asdict(count) | {"moved_per_frame": count.moved_per_frame} for mode, count in counts.items()}
    return {"settings": settings, "modes": modes}
