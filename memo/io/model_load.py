"""The one way every model loads: checked cheaply first, and any failure one line naming the file and the fix.

A damaged model file can pass :mod:`memo.io.model_files`' structure check and still fail in its loader, with a
traceback and sometimes late: a whole weights file swapped for another network's (diffusers leaves the missing
weights on the meta device, which fails at the first ``.to()``), a safetensors header with an unknown dtype or
a wrong shape, a ``config.json`` that is ``{}`` or holds a string where an int belongs, a negative channel
count, a ``model.pt`` that is a zip but no checkpoint, a ``config.yaml`` missing keys.

A :class:`ModelSpec` says where one model's config and weights are and how its class is built; then

* :func:`verify_models` checks, without loading any weights: every file's structure, the config's values against
  the class's signature (types), the network built from the config on the meta device (a negative size fails
  here), and the weights file's tensor names, dtypes and shapes against that network's state dict. Results are
  kept per file state, so checking again (at load) costs nothing.
* :func:`load_model` verifies, then loads inside :func:`model_boundary`, which turns any failure of the loader
  into a :class:`~memo.io.model_files.DamagedModelError`, and refuses a network left with weights on the meta
  device.

Every message is one line: ``setting=name: FILE <what is wrong>: <fix>`` (the download command of the README,
or for a local folder, a good copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import pickle
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from memo.errors import UserError, system_error
from memo.io.model_files import DamagedModelError, ModelFolder, find_problems, fix_for, read_safetensors_header

T = TypeVar("T")

SAFETENSORS_DTYPES = frozenset(
    "BOOL F4 F6_E2M3 F6_E3M2 U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 I16 U16 F16 BF16 I32 U32 F32 C64 F64 I64 U64".split()
)
"""The dtype names a safetensors header may hold (the format's specification)."""
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
MIN_SHARED = 0.5
"""A weights file lacking this share or more of the tensors its network needs is another network's (a smaller
share missing may be names the loader converts, such as diffusers' older attention names; the check after
loading catches the rest)."""
REASON_CHARS = 240

Shapes = dict[str, tuple[str | None, tuple[int, ...]]]
"""Tensor name -> (dtype name or None where unknown, shape)."""


def safetensors_shapes(path: Path) -> Shapes:
    """The tensors a safetensors file holds, from its header alone."""
    header = read_safetensors_header(path)
    return {
        name: (entry.get("dtype"), tuple(entry.get("shape", ())))
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict)
    }


@dataclass(frozen=True)
class ModelSpec(Generic[T]):
    """One model to check and load: where its files are, how its network is built, how it loads.

    ``model`` names the setting that chose the folder (for the message and the fix); ``config`` and ``weights``
    are relative to ``model.folder``. ``build(config_path)`` makes the network from its config (called on the
    meta device, so no weights are allocated); ``signature`` is the callable whose parameters the config's
    values must fit (None: ``build`` checks them); ``shapes(weights_path)`` lists the weights file's tensors
    under the network's own names; ``load()`` loads the model for use."""

    model: ModelFolder
    config: str
    weights: str
    build: Callable[[Path], nn.Module]
    load: Callable[[], T]
    signature: Callable | None = None
    shapes: Callable[[Path], Shapes] = safetensors_shapes
    extra: Sequence[str] = field(default=())
    """Other files of the folder the loader reads (checked for their structure)."""
    kind: str = ""
    """The class built (keeps the results of checks apart per class)."""
    strict: bool = False
    """Whether the weights must hold exactly the network's tensors (else: those it needs; the loader may convert
    older names, as diffusers does)."""

    @property
    def files(self) -> list[str]:
        return [self.config, self.weights, *self.extra]

    def path(self, relative: str) -> Path:
        return self.model.folder / relative


def pretrained_spec(
    cls: type,
    model: ModelFolder,
    subfolder: str = "",
    load: Callable[[], T] | None = None,
    extra: Sequence[str] = (),
    **kwargs,
) -> ModelSpec:
    """The spec of a diffusers (``ConfigMixin``) or transformers (``PreTrainedModel``) class whose
    ``config.json`` and safetensors weights are in ``model.folder / subfolder``; ``load`` defaults to
    ``cls.from_pretrained(folder, **kwargs)``."""
    folder = model.folder / subfolder if subfolder else model.folder
    prefix = f"{subfolder}/" if subfolder else ""
    config_class = getattr(cls, "config_class", None)
    if config_class is not None:  # transformers: its config is a checked dataclass

        def build(path: Path) -> nn.Module:
            return cls._from_config(config_class.from_dict(_read_config(path)))

        weights, signature = TRANSFORMERS_WEIGHTS, None
    else:

        def build(path: Path) -> nn.Module:
            return cls.from_config(_read_config(path))

        weights, signature = DIFFUSERS_WEIGHTS, cls.__init__
    return ModelSpec(
        model=model,
        config=f"{prefix}config.json",
        weights=f"{prefix}{weights}",
        build=build,
        load=load or (lambda: cls.from_pretrained(folder, **kwargs)),
        signature=signature,
        extra=[f"{prefix}{name}" for name in extra],
        kind=f"{cls.__module__}.{cls.__qualname__}",
    )


def _read_config(path: Path) -> dict:
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError("it is not an object of settings")
    return value


def read_torch_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """What ``torch.load`` reads from ``path`` (tensors and plain containers only, ``weights_only``), on the CPU;
    ``mmap``: the tensors mapped, not read (a legacy, non-zip file is read whole). Raises ``ValueError`` saying
    in a few words why a file is no PyTorch checkpoint, without torch's warnings about it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                return torch.load(Path(path), map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as error:
                if not mmap or "mmap can only be used" not in str(error):
                    raise
                return torch.load(Path(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError) as error:
            text = str(error)
            detail = (
                text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
                if ("WeightsUnpickler error:" in text)
                else text
            )
            raise ValueError(f"no PyTorch checkpoint: {_reason(detail)}") from error


# --------------------------------------------------------------------------------------------------
# Config values against the class's signature


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as JSON or YAML gives it) is of the type ``hint``; unknown kinds of hint fit anything."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    sequence = origin if origin is not None else hint
    if sequence in (list, tuple, Sequence, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args and (len(args) == 1 or args[-1] is Ellipsis) else None
        return item is None or all(_fits(element, item) for element in value)
    if sequence in (dict, Mapping, typing.Mapping):
        return isinstance(value, dict)
    return True


def _hint_text(hint: Any) -> str:
    if typing.get_args(hint) or not hasattr(hint, "__name__"):
        return str(hint).replace("typing.", "").replace("NoneType", "None")
    return hint.__name__


def config_type_problem(config: Mapping[str, Any], signature: Callable) -> str | None:
    """The first value of ``config`` that does not fit its parameter of ``signature`` (by the annotation, else
    by the default's type), as ``"has NAME=VALUE where CLASS takes TYPE"``; None when all fit."""
    try:
        hints = typing.get_type_hints(signature)
    except Exception:  # an annotation that cannot be resolved here: the defaults' types still tell
        hints = {}
    owner = signature.__qualname__.split(".")[0]
    parameters = inspect.signature(signature).parameters
    settings = [name for name, p in parameters.items() if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    if settings and "_class_name" not in config and not any(name in config for name in settings):
        # A saved config names its class (the published ones of the small networks hold nothing else).
        return f"holds none of {owner}'s settings (such as {settings[0]}) and no _class_name: it is no network's config"
    for name, parameter in parameters.items():
        if name not in config or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = parameter.default
        hint = hints.get(name)
        if hint is None and default is not inspect.Parameter.empty and default is not None:
            hint = type(default)
        if hint is not None and not _fits(config[name], hint):
            return f"has {name}={json.dumps(config[name])} where {owner} takes {_hint_text(hint)}"
    return None


# --------------------------------------------------------------------------------------------------
# Checking and loading


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def _weights_problem(expected: Mapping[str, torch.Size], found: Shapes, config: str, strict: bool) -> str | None:
    unknown = next(
        ((name, dtype) for name, (dtype, _) in found.items() if dtype is not None and dtype not in SAFETENSORS_DTYPES),
        None,
    )
    if unknown is not None:
        return f"has a tensor of an unknown dtype ({unknown[0]}: {unknown[1]!r})"
    for name, shape in expected.items():
        if name in found and tuple(found[name][1]) != tuple(shape):
            return f"does not fit {config} ({name} is {list(found[name][1])} in the file, {list(shape)} by the config)"
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if strict and (missing or unexpected):
        return (
            f"does not fit {config} ({len(missing)} tensors the network needs are not in it"
            + (f", e.g. {missing[0]}" if missing else "")
            + f"; {len(unexpected)} are not the network's"
            + (f", e.g. {unexpected[0]}" if unexpected else "")
            + ")"
        )
    if found and len(unexpected) >= MIN_SHARED * len(found):
        return (
            f"holds other weights than {config} describes ({len(unexpected)} of its {len(found)} tensors are not the "
            f"network's, e.g. {unexpected[0]})"
        )
    if expected and len(missing) >= MIN_SHARED * len(expected):
        return (
            f"holds other weights than {config} describes ({len(missing)} of the {len(expected)} tensors the "
            f"network needs are not in it, e.g. {missing[0]})"
        )
    return None


_verified: dict[tuple, tuple[str, str] | None] = {}
"""Deep-check results by (spec's class and files, their sizes and times): checking again costs nothing."""


def _state_key(spec: ModelSpec) -> tuple | None:
    try:
        stats = tuple((str(spec.path(f)), *_stat(spec.path(f))) for f in spec.files)
    except OSError:
        return None
    return (spec.kind or id(spec.build), stats)


def _stat(path: Path) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


def _deep_problem(spec: ModelSpec) -> tuple[str, str] | None:
    """What is wrong with ``spec``'s config or weights (the file, relative to its folder, and the problem), None
    when they fit each other."""
    config_path, weights_path = spec.path(spec.config), spec.path(spec.weights)
    if spec.signature is not None and config_path.suffix == ".json":
        try:
            config = _read_config(config_path)
        except (OSError, ValueError, UnicodeDecodeError) as error:
            return spec.config, f"cannot be read as a config ({_reason(error)})"
        problem = config_type_problem(config, spec.signature)
        if problem is not None:
            return spec.config, problem
    try:
        with torch.device("meta"):
            network = spec.build(config_path)
    except (UserError, MemoryError, ImportError):
        raise
    except Exception as error:
        return spec.config, f"does not describe a network that can be built ({_reason(error)})"
    expected = {name: tensor.shape for name, tensor in network.state_dict().items()}
    try:
        found = spec.shapes(weights_path)
    except (UserError, MemoryError, ImportError):
        raise
    except Exception as error:
        return spec.weights, f"cannot be read ({_reason(error)})"
    problem = _weights_problem(expected, found, spec.config.rsplit("/", 1)[-1], spec.strict)
    return None if problem is None else (spec.weights, problem)


def find_model_problems(specs: Iterable[ModelSpec]) -> list[str]:
    """One line per problem of ``specs``: first each file's structure (every spec), then config and weights
    (those whose files are whole). Reads configs and headers only."""
    specs = list(specs)
    lines: list[str] = []
    for spec in specs:
        structure = find_problems([dataclasses.replace(spec.model, files=spec.files)])
        lines += structure
        if structure:
            continue
        key = _state_key(spec)
        if key is None or key not in _verified:
            problem = _deep_problem(spec)
            if key is not None:
                _verified[key] = problem
        else:
            problem = _verified[key]
        if problem is not None:
            relative, what = problem
            line = (
                f"{spec.model.setting}={spec.model.name}: {spec.path(relative)} {what}: {fix_for(spec.model, relative)}"
            )
            lines.append(line)
    return list(dict.fromkeys(lines))


def verify_models(specs: Iterable[ModelSpec]) -> None:
    """Check ``specs`` without loading weights; one :class:`DamagedModelError` lists every problem found."""
    lines = find_model_problems(specs)
    if lines:
        raise DamagedModelError("\n".join(lines))


def _blamed(model: ModelFolder, files: Sequence[str], error: BaseException) -> str:
    """The file of ``files`` the error names (by path, then by name), else the folder of the first."""
    text = str(error)
    for match in (lambda f: str(model.folder / f) in text, lambda f: Path(f).name in text):
        for relative in files:
            if match(relative):
                return relative
    return Path(files[0]).parent.as_posix() if files else "."


@contextlib.contextmanager
def model_boundary(model: ModelFolder, files: Sequence[str] = ()) -> Iterator[None]:
    """Inside, any failure of loading ``model``'s ``files`` becomes one :class:`DamagedModelError` line naming the
    file, what the loader said and the fix. A :class:`UserError`, a system error the user can act on (disk,
    permissions), running out of memory and a missing runtime pass unchanged."""
    try:
        yield
    except (UserError, MemoryError, ImportError):
        raise
    except Exception as error:
        if isinstance(error, torch.OutOfMemoryError) or system_error(error) is not None:
            raise
        relative = _blamed(model, files, error)
        path = model.folder / relative if relative != "." else model.folder
        raise DamagedModelError(
            f"{model.setting}={model.name}: {path} cannot be loaded ({type(error).__name__}: {_reason(error)}): "
            f"{fix_for(model, relative)}"
        ) from error


def _left_on_meta(network: nn.Module) -> list[str]:
    return [name for name, tensor in [*network.named_parameters(), *network.named_buffers()] if tensor.is_meta]


def load_model(spec: ModelSpec[T]) -> T:
    """Verify ``spec`` (:func:`verify_models`), then load it inside :func:`model_boundary`; a network left with
    weights on the meta device (a file without them) is refused. Raises :class:`DamagedModelError`."""
    verify_models([spec])
    with model_boundary(spec.model, spec.files):
        loaded = spec.load()
        network = loaded if isinstance(loaded, nn.Module) else getattr(loaded, "model", None)
        missing = _left_on_meta(network) if isinstance(network, nn.Module) else []
        if missing:
            raise ValueError(f"{spec.weights} lacks {len(missing)} of the network's tensors, e.g. {missing[0]}")
    return loaded
