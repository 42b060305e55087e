"""Every command the README and the docs pages show is real (issue 30): it names a script or file that exists,
``--flags`` that the program's argparse parser defines, and ``key=value`` settings that the typed settings
model (``memo/settings/``) knows, with a value that setting accepts; the extras it names are in
``pyproject.toml``. Commands are read from ```` ```bash ```` blocks and from inline code that starts like a
command (``python ...``, ``uv run ...``, ``accelerate launch ...``, ``torchrun ...``, ``pip install ...``,
``X.py ...``). A ``key=value`` pair written inline in prose (``offload=model``) is checked as a setting too.

The parsers are read from the programs' source (the ``add_argument`` calls of the module that builds the
parser, and of the helpers it imports from ``memo``), not by running them: starting every program would take
minutes, and importing the web app alone takes seconds. ``accelerate launch`` and ``torchrun`` options are
checked against those tools' own parsers. Placeholders (``IMAGE``, ``DIR``, ``N``) pass as values.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import shlex
import typing
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

from memo.settings import schema
from memo.settings.inference import InferenceConfig
from memo.settings.training import TrainingConfig

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
COMMAND_STARTS = ("python", "python3", "uv", "accelerate", "torchrun", "pip", "mkdocs", "pytest")
REPO_DIRS = ("assets/", "comfyui_memo/", "configs/", "docs/", "notebooks/", "scripts/", "tests/")
SEPARATORS = {"&&", "||", ";", "|", "&"}
SETTING_KEY = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|.*\.\.\..*|<.*>|")


@dataclasses.dataclass(frozen=True)
class Shown:
    """A command as a page shows it: where, and its text."""

    page: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


# -- reading the pages -----------------------------------------------------------------------------------------


def _code_spans(line: str) -> list[str]:
    return [match.group(2).strip() for match in re.finditer(r"(`+)(.+?)\1", line)]


def _looks_like_command(text: str) -> bool:
    words = text.split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # environment assignments
        words = words[1:]
    return bool(words) and (words[0] in COMMAND_STARTS or (words[0].endswith(".py") and len(words) > 1))


def _blocks(page: Path) -> list[tuple[int, str | None, str]]:
    """``(first line, fence, text)`` of each shell line of a fenced block (``\\`` continuations joined; fence
    is the block's language) and of each prose paragraph (lines joined, fence None), so that an inline code
    span broken over two lines is read whole."""
    blocks, fence, pending, start = [], None, [], 0
    for number, line in enumerate([*page.read_text().splitlines(), ""], start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None and pending:
                blocks.append((start, None, " ".join(pending)))
            pending, fence = [], (None if fence is not None else stripped[3:].strip())
            continue
        if fence is not None:
            if pending or stripped:
                start = number if not pending else start
                pending.append(line.rstrip("\\").strip())
                if not line.endswith("\\"):
                    blocks.append((start, fence, " ".join(pending)))
                    pending = []
        elif stripped and not stripped.startswith("|"):
            start = number if not pending else start
            pending.append(stripped)
        else:
            if pending:
                blocks.append((start, None, " ".join(pending)))
            pending = []
            if stripped:  # a table row: one line
                blocks.append((number, None, stripped))
    return blocks


def shown_commands(page: Path) -> list[Shown]:
    """The commands of ``page``: every line of its bash blocks and its inline commands."""
    name = str(page.relative_to(REPO))
    shown = []
    for number, fence, text in _blocks(page):
        if fence in ("bash", "sh", "shell"):
            shown.append(Shown(name, number, text))
        elif fence is None:
            shown += [Shown(name, number, span) for span in _code_spans(text) if _looks_like_command(span)]
    return shown


def shown_settings(page: Path) -> list[Shown]:
    """Inline code in prose that is only ``key=value`` pairs (``offload=model``, ``width=512 height=768``)."""
    name = str(page.relative_to(REPO))
    pairs = re.compile(r"[a-z][\w.]*=[^\s=]\S*( [a-z][\w.]*=[^\s=]\S*)*")
    return [
        Shown(name, number, span)
        for number, fence, text in _blocks(page)
        if fence is None
        for span in _code_spans(text)
        if pairs.fullmatch(span)
    ]


def words_of(text: str) -> list[list[str]]:
    """The simple commands of a shell line, each as its words (comments dropped, ``&&``/``;``/``|`` split)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for word in lexer:
        if word in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    return [command for command in commands if command]


# -- the programs' parsers, from their source ------------------------------------------------------------------


@dataclasses.dataclass
class Parser:
    """What a program's command line takes: its option strings, and its settings model if it takes
    ``key=value`` overrides."""

    flags: set[str]
    settings: type | None


def _module_path(module: str) -> Path | None:
    base = REPO / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _added_arguments(node: ast.AST) -> list[ast.Call]:
    return [
        call
        for call in ast.walk(node)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument"
    ]


def _imports_from_memo(tree: ast.AST) -> list[tuple[str, str]]:
    return [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("memo")
        for alias in node.names
    ]


@functools.cache
def parser_of(program: str) -> Parser | None:
    """The parser of ``program`` (a path from the repository root): the ``add_argument`` calls of the module
    that defines its ``main`` (the program itself, or the ``memo`` module it imports ``main`` from) and of the
    functions that module imports from ``memo`` to add arguments (``add_settings_arguments``); None for a file
    that builds no parser."""
    path = REPO / program
    tree = ast.parse(path.read_text())
    if not _added_arguments(tree):
        entry = next((module for module, name in _imports_from_memo(tree) if name == "main"), None)
        if entry is None or _module_path(entry) is None:
            return None
        path = _module_path(entry)
        tree = ast.parse(path.read_text())
    calls = _added_arguments(tree)
    imports = _imports_from_memo(tree)
    for module, name in imports:
        helper = _module_path(module)
        if helper is None:
            continue
        for node in ast.parse(helper.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                calls += _added_arguments(node)
    names = [arg.value for call in calls for arg in call.args if isinstance(arg, ast.Constant)]
    flags = {name for name in names if name.startswith("-")} | {"-h", "--help"}
    settings = None
    if "overrides" in names:
        training = any(module == "memo.settings.training" for module, _ in imports)
        settings = TrainingConfig if training else InferenceConfig
    return Parser(flags, settings)


@functools.cache
def launcher_flags(launcher: str) -> frozenset[str]:
    if launcher == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        parser = launch_command_parser()
    else:
        from torch.distributed.run import get_args_parser

        parser = get_args_parser()
    return frozenset(option for action in parser._actions for option in action.option_strings)


@functools.cache
def extras() -> frozenset[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return frozenset(project["optional-dependencies"])


# -- settings ----------------------------------------------------------------------------------------------------


@functools.cache
def setting_fields(cls: type) -> dict[str, tuple[typing.Any, tuple | None]]:
    """Every setting name of ``cls`` as users write it -> (its type, its choices or None)."""
    return {name: (kind, schema.choices_of(field, kind)) for name, _, field, kind in schema.leaves(cls)}


def _accepts(kind: typing.Any, value: str) -> bool:
    options = (
        typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, getattr(typing, "UnionType", ())) else ()
    )
    if type(None) in options and value == "null":
        return True
    kinds = [option for option in options if option is not type(None)] or [kind]
    for option in kinds:
        try:
            if option is bool:
                if value in ("true", "false"):
                    return True
            elif option in (int, float):
                option(value)
                return True
            else:
                return True  # strings, paths, lists: any text
        except ValueError:
            continue
    return False


def setting_problem(key: str, value: str, cls: type) -> str | None:
    """Why ``key=value`` is not a setting of ``cls`` with an accepted value, or None."""
    fields = setting_fields(cls)
    if key not in fields:
        return f"{key} is not a setting of {cls.__name__}"
    if PLACEHOLDER.fullmatch(value):
        return None
    kind, choices = fields[key]
    if choices and value not in [str(choice) for choice in choices] and value != "null":
        return f"{key}={value}: {key} takes {', '.join(map(str, choices))}"
    if not choices and not _accepts(kind, value):
        return f"{key}={value}: {key} does not take {value!r}"
    return None


# -- checking one command ------------------------------------------------------------------------------------------


def _path_problem(word: str) -> str | None:
    if word.startswith(REPO_DIRS) and not PLACEHOLDER.fullmatch(Path(word).name):
        path = word.split("::")[0]
        if not (REPO / path).exists():
            return f"{path} does not exist"
    return None


def program_problems(program: str, arguments: list[str]) -> list[str]:
    """What is wrong with ``program`` (a repository path) run with ``arguments``."""
    if not (REPO / program).is_file():
        return [f"{program} does not exist"]
    parser = parser_of(program)
    if parser is None:
        return [f"{program} is not a program (no argparse parser found)"]
    problems = []
    for word in arguments:
        word = word.strip("[]")
        if word.startswith("-") and not re.fullmatch(r"-\d.*", word):
            flag = word.split("=")[0]
            if flag not in parser.flags:
                problems.append(f"{program} has no option {flag}")
        elif "=" in word and SETTING_KEY.fullmatch(word.split("=")[0]):
            key, value = word.split("=", 1)
            if key == "key":  # the placeholder key=value
                continue
            if parser.settings is None:
                problems.append(f"{program} takes no key=value settings ({word})")
            elif problem := setting_problem(key, value, parser.settings):
                problems.append(problem)
        elif problem := _path_problem(word):
            problems.append(problem)
    return problems


def _extras_problems(words: list[str]) -> list[str]:
    named = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--extra"]
    named += [word.split("=", 1)[1] for word in words if word.startswith("--extra=")]
    for word in words:  # pip install -e ".[cpu,dev]"
        if match := re.search(r"\[([\w,-]+)\]$", word):
            named += match.group(1).split(",")
    return [f"no extra {name!r} in pyproject.toml" for name in named if name not in extras()]


def _python_problems(words: list[str]) -> list[str]:
    if len(words) < 2 or words[1] == "-c":
        return []
    if words[1] == "-m":
        return _tool_problems(words[2:]) if len(words) > 2 else []
    return program_problems(words[1], words[2:])


def _tool_problems(words: list[str]) -> list[str]:
    tool, arguments = words[0], words[1:]
    if tool == "pytest":
        return [problem for word in arguments if (problem := _path_problem(word))]
    if tool == "mkdocs":
        return [] if arguments and arguments[0] in ("build", "serve") else [f"mkdocs {arguments}: not build/serve"]
    return []


def command_problems(words: list[str]) -> list[str]:
    """What is wrong with one simple command (its words), or nothing."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words:
        return []
    head = words[0]
    if head in ("python", "python3"):
        return _python_problems(words)
    if head.endswith(".py"):
        return program_problems(head, words[1:])
    if head == "uv" and len(words) > 1 and words[1] == "run":
        options, rest = [], words[2:]
        while rest and rest[0].startswith("-"):
            takes_value = rest[0] in ("--extra", "--with", "--python", "--group") and len(rest) > 1
            options += rest[: 1 + takes_value]
            rest = rest[1 + takes_value :]
        problems = _extras_problems(options)
        if rest:
            if rest[0] in ("python", "python3"):
                problems += _python_problems(rest)
            elif rest[0].endswith(".py"):
                problems += program_problems(rest[0], rest[1:])
            else:
                problems += _tool_problems(rest)
        return problems
    if head in ("uv", "pip"):
        return _extras_problems(words)
    if head in ("accelerate", "torchrun"):
        launched = words[2:] if head == "accelerate" else words[1:]
        if head == "accelerate" and words[1:2] != ["launch"]:
            return [f"accelerate {words[1:2]}: only launch is shown"]
        at = next((i for i, word in enumerate(launched) if word.endswith(".py")), None)
        at = len(launched) if at is None else at  # `accelerate launch --cpu` in prose: the options alone
        problems = [
            f"{head} has no option {word}"
            for word in launched[:at]
            if word.startswith("-") and word.split("=")[0] not in launcher_flags(head)
        ]
        problems += [problem for word in launched[:at] if (problem := _path_problem(word))]
        return problems + (program_problems(launched[at], launched[at + 1 :]) if at < len(launched) else [])
    if head in ("mkdocs", "pytest"):
        return _tool_problems(words)
    return []


def shown_problems(shown: Shown) -> list[str]:
    try:
        commands = words_of(shown.text)
    except ValueError as error:  # unbalanced quotes
        return [f"{shown}: cannot be split into words ({error})"]
    return [f"{shown}: {problem}" for words in commands for problem in command_problems(words)]


@functools.cache
def python_keywords() -> frozenset[str]:
    """The keyword arguments of the Python API the pages show (``MemoPipeline.__call__``,
    ``MemoGenerator.generate``): ``latents=``, ``callback_on_clip_end=f`` are not settings."""
    names = set()
    for module, function in (("memo/pipeline.py", "__call__"), ("memo/generator.py", "generate")):
        for node in ast.walk(ast.parse((REPO / module).read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == function:
                names |= {arg.arg for arg in node.args.args + node.args.kwonlyargs}
    return frozenset(names)


def inline_setting_problems(shown: Shown) -> list[str]:
    problems = []
    for pair in shown.text.split():
        key, value = pair.split("=", 1)
        if key == "key" or re.search(r"[\"'()]|^(True|False|None)$", value):
            continue  # the placeholder key=value, or Python code
        models = [cls for cls in (InferenceConfig, TrainingConfig) if key in setting_fields(cls)]
        if not models:
            if key not in python_keywords():
                problems.append(f"{shown}: {key} is not a setting")
        elif all(setting_problem(key, value, cls) for cls in models):
            problems.append(f"{shown}: {setting_problem(key, value, models[0])}")
    return problems


# -- the tests ---------------------------------------------------------------------------------------------------------


def test_every_shown_command_names_real_scripts_flags_and_settings():
    shown = [command for page in PAGES for command in shown_commands(page)]
    problems = [problem for command in shown for problem in shown_problems(command)]
    assert not problems, "commands shown in the docs that would fail:\n" + "\n".join(problems)


def test_every_inline_setting_is_a_setting():
    # docs/field-tests.md records the bad values a field pass tried (speed=turbo): they are meant to be refused
    shown = [pair for page in PAGES if page.name != "field-tests.md" for pair in shown_settings(page)]
    problems = [problem for pairs in shown for problem in inline_setting_problems(pairs)]
    assert not problems, "settings named in the docs that do not exist:\n" + "\n".join(problems)


def test_the_pages_commands_are_found():
    """The reader finds the commands a new user runs first, so the checks above cannot pass by reading nothing."""
    readme = {command.text for command in shown_commands(REPO / "README.md")}
    assert any(text.startswith("uv run --extra gpu inference.py --input_image") for text in readme)
    assert any(text.startswith("uv run --extra cpu --extra dev pytest") for text in readme)
    assert any(text.startswith("uv run --extra cpu inference.py --tiny") for text in readme)
    every = [command for page in PAGES for command in shown_commands(page)]
    assert len(every) > 60
    assert {command.page for command in every} >= {"README.md", "docs/inference.md", "docs/finetuning.md"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("python inference.py --input_imag a.jpg", "inference.py has no option --input_imag"),
        ("uv run --extra gpu inference.py offlaod=model", "offlaod is not a setting of InferenceConfig"),
        ("python inference.py offload=disk", "offload=disk: offload takes none, model, group"),
        ("python inference.py inference_steps=many", "inference_steps=many: inference_steps does not take 'many'"),
        ("python scripts/batch_inference.py --manifest m.csv --output_dir O seed=1.5", "seed does not take '1.5'"),
        ("python scripts/render_all.py", "scripts/render_all.py does not exist"),
        ("python scripts/evaluate.py --generated G --reference R emotion=happy", "takes no key=value settings"),
        ("python finetune.py --config configs/finetune.yaml --exp_name x emotion=happy", "not a setting of Training"),
        ("python finetune.py --config configs/finetune.yml --exp_name x", "configs/finetune.yml does not exist"),
        ("uv run --extra gpus inference.py", "no extra 'gpus'"),
        ('pip install -e ".[cpu,devel]"', "no extra 'devel'"),
        ("accelerate launch --num_process 2 inference.py", "accelerate has no option --num_process"),
        ("torchrun --nproc_per_node 2 inference.py paralel=guidance", "paralel is not a setting"),
        ("app.py --prot 8000", "app.py has no option --prot"),
        ("python -m pytest -q tests/test_nothing.py", "tests/test_nothing.py does not exist"),
    ],
)
def test_a_broken_command_is_caught(text, problem):
    problems = shown_problems(Shown("page.md", 1, text))
    assert len(problems) == 1 and problem in problems[0], problems


@pytest.mark.parametrize(
    "text",
    [
        "uv run --extra gpu inference.py --input_image me.jpg --input_audio hello.m4a   # -> outputs/me_hello.mp4",
        "python inference.py --config configs/inference.yaml --input_image IMAGE [--seed N] [key=value ...]",
        "accelerate launch --config_file configs/accelerate.yaml finetune.py --config configs/finetune.yaml "
        "--exp_name NAME data.num_workers=4 report_to=none",
        "CUDA_VISIBLE_DEVICES=0 python scripts/prepare_data.py --input_dir data/video --output_dir out",
        "uv run --extra cpu --extra dev pytest -m 'e2e or slow'",
        "python scripts/benchmark.py --device cpu --speed exact fast && python app.py --share weight_dtype=fp16",
    ],
)
def test_a_real_command_passes(text):
    assert shown_problems(Shown("page.md", 1, text)) == []


def test_an_unknown_inline_setting_is_caught():
    assert inline_setting_problems(Shown("page.md", 1, "offload=model")) == []
    assert inline_setting_problems(Shown("page.md", 1, "callback_on_clip_end=f")) == []
    assert "vae_tiles is not a setting" in inline_setting_problems(Shown("page.md", 1, "vae_tiles=512"))[0]
    assert "speed takes exact, fast" in inline_setting_problems(Shown("page.md", 1, "speed=turbo"))[0]
