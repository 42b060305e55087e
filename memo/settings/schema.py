"""The machinery shared by the inference and training settings: typed fields with one line of help and a range,
loading YAML and ``key=value`` layers over them, and the messages for a bad key.

A settings class is a dataclass whose fields are made by :func:`setting`: a type (the annotation; a choice is a
``Literal``), a default, one line of help, and optionally ``minimum``/``maximum`` and ``multiple_of``. Fields
made by :func:`section` hold a nested settings class: a named section's settings are dotted (``data.width``),
a flat section's keep their own names (``learning_rate``, held in ``config.optimizer``), so settings can be
grouped in code without renaming what users write. :func:`load_layers` merges layers through OmegaConf's
structured configs, so a value of the wrong type is refused, and turns every problem into one
:class:`ConfigError` line that names the key and, for an unknown key, the closest valid ones (difflib).
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import logging
import math
import operator
import os
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from memo.errors import UserError

logger = logging.getLogger("memo")


class ConfigError(UserError, ValueError):
    """A setting is unknown, of the wrong type, or out of range."""


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 (the name argparse and accelerate use)
    *,
    factory: Any = dataclasses.MISSING,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    multiple_of: int | None = None,
) -> Any:
    """A settings field: ``default`` (or ``factory`` for a list or a section), one line of ``help``, and the
    checks its value must pass (``None`` always passes: it means "not set")."""
    metadata = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "multiple_of": multiple_of}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, help: str, *, flat: bool = False) -> Any:  # noqa: A002 (as setting())
    """A field holding the settings class ``cls``: its settings are named ``<field>.<name>``, or with ``flat``
    just ``<name>`` (a grouping in code that users do not see)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "flat": flat})


def _is_section(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def literal_choices(kind: Any) -> tuple[Any, ...] | None:
    """The values of a ``Literal`` type (``Literal[...] | None`` included), else None."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    for option in options:
        if typing.get_origin(option) is typing.Literal:
            return typing.get_args(option)
    return None


def choices_of(field: dataclasses.Field, kind: Any) -> tuple[Any, ...] | None:
    """The values a field takes when it is a choice: its ``Literal``'s (``X | None`` included), else None."""
    return literal_choices(kind) or field.metadata.get("choices")


def leaves(cls: type, prefix: str = "", path: str = "") -> Iterator[tuple[str, str, dataclasses.Field, Any]]:
    """``(name, path, field, type)`` of every setting of ``cls`` in declaration order: the name users write and
    the attribute path of the loaded object (they differ for the settings of a flat section)."""
    kinds = hints(cls)
    for field in dataclasses.fields(cls):
        kind = kinds[field.name]
        if _is_section(kind):
            flat = field.metadata.get("flat", False)
            yield from leaves(kind, prefix if flat else f"{prefix}{field.name}.", f"{path}{field.name}.")
        else:
            yield f"{prefix}{field.name}", f"{path}{field.name}", field, kind


def setting_paths(cls: type) -> dict[str, str]:
    """Each setting's name -> its attribute path in the loaded object (``learning_rate`` ->
    ``optimizer.learning_rate``)."""
    return {name: path for name, path, _, _ in leaves(cls)}


def _is_mapping(kind: Any) -> bool:
    return typing.get_origin(kind) in (dict, Mapping)


def hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a settings class."""
    return typing.get_type_hints(cls)


def setting_names(cls: type) -> list[str]:
    """Every setting name of ``cls`` as users write it (sections expanded)."""
    return [name for name, _, _, _ in leaves(cls)]


def closest(name: str, names: Sequence[str]) -> str:
    """``"; did you mean 'a' or 'b'?"`` for the valid names closest to ``name``, or ``""``."""
    leaf = {candidate.rsplit(".", 1)[-1]: candidate for candidate in names}
    matches = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    matches += [leaf[m] for m in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(leaf), n=3, cutoff=0.6)]
    matches = list(dict.fromkeys(matches))[:3]
    return f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""


def _type_name(kind: Any) -> str:
    if kind is type(None):
        return "None"
    if typing.get_origin(kind) is typing.Literal:
        return "str"
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(kind))
    if typing.get_origin(kind) is not None:
        args = ", ".join(_type_name(arg) for arg in typing.get_args(kind))
        return f"{typing.get_origin(kind).__name__}[{args}]"
    return getattr(kind, "__name__", str(kind))


def describe(cls: type) -> Iterator[tuple[str, str, str, str]]:
    """``(name, type, default, help)`` of every setting of ``cls``, sections expanded, in declaration order."""
    for name, _, field, kind in leaves(cls):
        default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        meta = field.metadata
        kind_text = _type_name(kind)
        if choices := choices_of(field, kind):
            kind_text += ": " + "|".join(map(str, choices))
        bounds = [f">= {meta['minimum']}" if meta.get("minimum") is not None else ""]
        bounds += [f"<= {meta['maximum']}" if meta.get("maximum") is not None else ""]
        bounds += [f"multiple of {meta['multiple_of']}" if meta.get("multiple_of") else ""]
        bounds = [bound for bound in bounds if bound]
        if bounds:
            kind_text += f" ({', '.join(bounds)})"
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        yield name, kind_text, shown, meta.get("help", "")


def help_text(cls: type, title: str) -> str:
    """The ``--help-settings`` listing: one setting a line, its type and range, default and help, under a heading
    for each section."""
    rows = list(describe(cls))
    width = max(len(name) for name, *_ in rows)
    sections = {field.name: field.metadata.get("help", "") for field in dataclasses.fields(cls)}
    parts = [path.split(".")[0] if "." in path else "" for _, path, _, _ in leaves(cls)]
    lines = [title]
    for (name, kind, default, text), part, before in zip(rows, parts, ["", *parts[:-1]], strict=True):
        if part != before or len(lines) == 1:
            lines += ["", f"{part}: {sections[part]}" if part else "general"]
        lines.append(f"  {name:<{width}}  {text}")
        lines.append(f"  {'':<{width}}  [{kind}; default {default}]")
    return "\n".join(lines)


def range_problems(settings: Any) -> list[str]:
    """What breaks the choices/``minimum``/``maximum``/``multiple_of`` of each field (sections included), each
    under the name users write."""
    problems = []
    for name, path, field, kind in leaves(type(settings)):
        value = operator.attrgetter(path)(settings)
        if value is None or isinstance(value, (list, dict)):
            continue
        meta, choices = field.metadata, choices_of(field, kind)
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
            problems.append(f"{name} must be a finite number, got {value}")
        elif choices is not None and value not in choices:
            problems.append(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        elif meta.get("minimum") is not None and value < meta["minimum"]:
            problems.append(f"{name} must be at least {meta['minimum']}, got {value}")
        elif meta.get("maximum") is not None and value > meta["maximum"]:
            problems.append(f"{name} must be at most {meta['maximum']}, got {value}")
        elif meta.get("multiple_of") and value % meta["multiple_of"]:
            problems.append(f"{name} must be a multiple of {meta['multiple_of']}, got {value}")
    return problems


def yaml_reason(error: BaseException) -> str:
    """A YAML parser's error in one line, all of it (the problem, then where: PyYAML spreads them over lines)."""
    text = " ".join(str(error).split())
    for source in ('in "<unicode string>", ', 'in "<file>", ', "in '<unicode string>', "):
        text = text.replace(source, "")
    return text or type(error).__name__


def read_yaml(path: str | os.PathLike) -> DictConfig:
    """A YAML settings file as a mapping; :class:`ConfigError` if it is missing, a folder, not readable, not YAML
    or not a mapping."""
    if os.path.isdir(path):
        raise ConfigError(f"Config file {str(path)!r} is a folder; give the YAML file (e.g. {path}/inference.yaml).")
    if not os.path.isfile(path):
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"Config file {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8."
        ) from None
    except OSError as error:
        raise ConfigError(f"Config file {str(path)!r} cannot be read ({error.strerror or error}).") from None
    try:
        loaded = OmegaConf.load(io.StringIO(text))
    except Exception as error:
        tabs = [i for i, line in enumerate(text.splitlines(), 1) if line[: len(line) - len(line.lstrip())].count("\t")]
        hint = f" (line {tabs[0]} is indented with a tab: YAML takes spaces only)" if tabs else ""
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML{hint}: {yaml_reason(error)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of settings.")
    return loaded


def read_overrides(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` overrides (OmegaConf dot-list syntax) as a mapping; :class:`ConfigError` naming the override
    for a malformed one (no ``=``, an unbalanced quote, a value YAML cannot read)."""
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"Override {item!r} must look like key=value.")
        key, value = (part.strip() for part in item.split("=", 1))
        for quote in "\"'":
            if value.count(quote) % 2 and value.startswith(quote):
                shell = "'" if quote == '"' else '"'
                raise ConfigError(
                    f"Override {item!r} has an unbalanced quote ({quote}): write {key}={value.strip(quote)} or "
                    f"close the quote (in a shell: {shell}{key}={quote}{value.strip(quote)}{quote}{shell})."
                )
        try:
            OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as error:
            reason = yaml_reason(error) if isinstance(error, yaml.YAMLError) else str(error).splitlines()[0]
            raise ConfigError(f"Override {item!r} cannot be read: {reason}") from None
    return OmegaConf.from_dotlist(list(overrides))


def as_layer(settings: Any) -> DictConfig:
    """Loaded settings back as a layer: a mapping under the names users write (sections dotted)."""
    layer = OmegaConf.create({})
    for name, path, _, _ in leaves(type(settings)):
        OmegaConf.update(layer, name, operator.attrgetter(path)(settings), merge=False, force_add=True)
    return layer


def flat_values(settings: Any) -> dict[str, Any]:
    """Loaded settings as ``name -> value`` under the names users write."""
    return {name: operator.attrgetter(path)(settings) for name, path, _, _ in leaves(type(settings))}


def _keys(cls: type) -> dict[str, Any]:
    """The keys a layer may hold at the level of ``cls``: its fields, a flat section's fields in its place."""
    keys, kinds = {}, hints(cls)
    for field in dataclasses.fields(cls):
        kind = kinds[field.name]
        if _is_section(kind) and field.metadata.get("flat", False):
            keys |= _keys(kind)
        else:
            keys[field.name] = kind
    return keys


def _leaves(layer: DictConfig, cls: type | None, prefix: str = "") -> Iterator[tuple[str, bool]]:
    """Each dotted key of ``layer`` with whether ``cls`` knows it (a dict-typed setting takes any keys below)."""
    keys = _keys(cls) if cls is not None else {}
    for key in list(layer.keys()):
        name = f"{prefix}{key}"
        kind = keys.get(str(key))
        if kind is None:
            yield name, False
        elif _is_section(kind) and isinstance(layer[key], DictConfig):
            yield from _leaves(layer[key], kind, f"{name}.")
        else:
            yield name, True


def _nest(layer: DictConfig, cls: type) -> DictConfig:
    """``layer`` (checked keys, as users write them) with each setting at its attribute path."""
    paths = setting_paths(cls)
    if all(name == path for name, path in paths.items()):
        return layer
    nested = OmegaConf.create({})
    for name, _ in _leaves(layer, cls):
        OmegaConf.update(nested, paths[name], OmegaConf.select(layer, name), merge=False, force_add=True)
    return nested


def _move(layer: DictConfig, old: str, new: str) -> bool:
    """Move dotted key ``old`` of ``layer`` to ``new``; whether it was there."""
    parent_path, _, leaf = old.rpartition(".")
    parent = OmegaConf.select(layer, parent_path) if parent_path else layer
    if not isinstance(parent, DictConfig) or leaf not in parent:
        return False
    value = parent[leaf]
    del parent[leaf]
    OmegaConf.update(layer, new, value, merge=False, force_add=True)
    return True


def load_layers(
    cls: type,
    layers: Sequence[tuple[str, DictConfig]],
    renamed: Mapping[str, str] = {},  # noqa: B006 (read only)
    ignored: Mapping[str, str] = {},  # noqa: B006 (read only)
    help_command: str = "--help-settings",
) -> DictConfig:
    """The defaults of ``cls`` with each ``(origin, layer)`` merged over them in turn, typed (a DictConfig
    backed by ``cls``).

    A key in ``renamed`` (old dotted name -> new) is moved to its new name with a deprecation warning; a key in
    ``ignored`` (name -> why) is dropped with a warning. An unknown key or a value of the wrong type raises
    :class:`ConfigError` naming the key, where it came from, and the closest valid keys.
    """
    names = setting_names(cls)
    kinds = {name: kind for name, _, _, kind in leaves(cls)}
    described = {name: kind for name, kind, _, _ in describe(cls)}
    names_of = {path: name for name, path in setting_paths(cls).items()}
    merged = OmegaConf.structured(cls)
    for origin, layer in layers:
        for old, new in renamed.items():
            if _move(layer, old, new):
                logger.warning("%s in %s is deprecated: it is now called %s.", old, origin, new)
        for key, why in ignored.items():
            if key in layer:
                logger.warning("Ignoring %s from %s: %s.", key, origin, why)
                del layer[key]
        for key, known in _leaves(layer, cls):
            if not known:
                raise ConfigError(
                    f"Unknown setting {key!r} in {origin}{closest(key, names)} (`{help_command}` lists every setting)."
                )
            value = OmegaConf.select(layer, key, default=None)
            if described.get(key, "").startswith("bool") and isinstance(value, int) and not isinstance(value, bool):
                if value not in (0, 1):  # OmegaConf takes any number as true
                    raise ConfigError(f"Invalid setting {key}={value} in {origin}: it takes true or false.")
            choices = literal_choices(kinds.get(key))
            if choices and isinstance(value, bool):  # YAML reads true/yes/on and false/no/off as booleans
                words = [w for w in (("true", "yes", "on") if value else ("false", "no", "off")) if w in choices]
                if words:  # compile: true, mixed_precision: no
                    value = words[0]
                    OmegaConf.update(layer, key, value, merge=False)
            if choices and value is not None and value not in choices:
                raise ConfigError(
                    f"Invalid setting {key}={value} in {origin}: {key} must be one of {', '.join(map(str, choices))}, "
                    f"got {value!r}."
                )
        try:
            merged = OmegaConf.merge(merged, _nest(layer, cls))
        except OmegaConfBaseException as error:
            key = getattr(error, "full_key", "") or "?"
            key = names_of.get(key, key)
            value = OmegaConf.select(layer, key, default=None) if key != "?" else None
            reason = str(getattr(error, "msg", error)).strip().splitlines()[0]
            field = described.get(key)
            wanted = f" (it takes {field})" if field else ""
            shown = f"={value}" if value is not None else ""
            raise ConfigError(f"Invalid setting {key}{shown} in {origin}: {reason}{wanted}.") from None
    return merged
