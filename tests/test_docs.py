"""Every example in the documentation runs, so the docs cannot rot.

- Every ```python block of every page under ``docs/`` runs. The blocks of one page run in
  order in one namespace, in a fresh process whose working directory is a temporary folder
  (so a page that trains leaves nothing behind), and a traceback names the page and line.
  A block that cannot run in CI (it needs a GPU, a dataset, a run directory it does not make)
  is marked by the line ``<!-- no-run: <why> -->`` right before it; it is still compiled.
- Every ``sslkit ...`` command line in a shell block (```bash, ```sh, ```console), also after
  ``accelerate launch ... -m``, ``python -m``, ``srun ... bash -c '...'`` and environment
  assignments, is parsed by ``sslkit.cli.build_parser()`` as ``sslkit`` parses it, and the
  ``key=value`` overrides of ``sslkit train`` are checked against the config schema (on top of
  the recipe when it is a file of this repository), so a renamed option, key or recipe fails.
  ``<!-- no-run: <why> -->`` before a shell block skips it.
- Every ```yaml block parses, and one whose top-level keys are config sections (a recipe or
  part of one) is checked against the config schema.
- Every docstring example (``>>>``) of every sslkit module, which the API reference shows,
  passes as a doctest.
- ``mkdocs build --strict`` passes (when mkdocs is installed: ``make docs`` and so ``make
  test`` install it).
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import pkgutil
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import yaml

import sslkit
from sslkit.cli import build_parser
from sslkit.config import Config, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
PYTHON = ("python", "py", "python3")
SHELL = ("bash", "sh", "shell", "console")
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)")
_NO_RUN = re.compile(r"^\s*<!--\s*no-run\s*(?::\s*(?P<why>.*?))?\s*-->\s*$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_OPERATORS = {"|", "||", "&", "&&", ";", ";;", ">", ">>", "<", "<<", ">&", "<&", "&>", ">|", "(", ")"}


@dataclass
class Block:
    page: Path
    line: int  # line of the block's first code line, 1-based
    lang: str
    code: str
    no_run: Optional[str]  # the reason given by <!-- no-run: ... -->, None for a block that runs

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the no-run marker before each."""
    lines = page.read_text().split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        end = i + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence) and lines[end].strip().strip(fence[0]) == ""
        ):
            end += 1
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:end]]
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = _NO_RUN.match(before)
        no_run = (marker["why"] or "") if marker else None
        blocks.append(Block(page, i + 2, opening["lang"].lower(), "\n".join(body) + "\n", no_run))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in code_blocks(page)]
PYTHON_PAGES = sorted({b.page for b in ALL_BLOCKS if b.lang in PYTHON and b.no_run is None})


def test_the_docs_have_examples():
    assert len(PAGES) >= 10, PAGES
    assert len(PYTHON_PAGES) >= 4, PYTHON_PAGES
    assert sum(b.lang in SHELL for b in ALL_BLOCKS) >= 10


def test_every_no_run_marker_says_why():
    unexplained = [b.where for b in ALL_BLOCKS if b.no_run == ""]
    assert not unexplained, f"write <!-- no-run: <the reason> --> before: {unexplained}"


def test_marked_python_blocks_compile():
    for block in ALL_BLOCKS:
        if block.lang in PYTHON and block.no_run is not None:
            compile("\n" * (block.line - 1) + block.code, block.where, "exec")


# The blocks of one page, in order, in one namespace; the code is compiled with the page as
# its file name and its lines at their lines in the page, so a traceback points into the page.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for block in json.load(sys.stdin):
    print(f"--- running {block['where']}", flush=True)
    exec(compile("\\n" * (block["line"] - 1) + block["code"], block["path"], "exec"), namespace)
"""


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_python_examples_run(page, tmp_path):
    blocks = [{"where": b.where, "path": str(b.page), "line": b.line, "code": b.code}
              for b in code_blocks(page) if b.lang in PYTHON and b.no_run is None]
    # One thread: the examples' models are tiny, and two OpenMP threads on a busy 2-core machine
    # spend 100x longer waiting for each other than computing (measured).
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=900)
    if done.returncode != 0:
        ran = re.findall(r"^--- running (.*)$", done.stdout, re.M)
        pytest.fail(f"the example at {ran[-1] if ran else page} failed (mark a block that cannot run in CI "
                    f"with <!-- no-run: <why> -->):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")


# ---------------------------------------------------------------- shell blocks


def shell_lines(code: str, lang: str) -> list[str]:
    """Logical command lines: continuations joined, prompts (console) stripped."""
    out: list[str] = []
    pending = ""
    for raw in code.split("\n"):
        line = raw
        if lang == "console":
            if not pending and not line.startswith("$ "):
                continue  # output
            line = line[2:] if not pending else line
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return [line for line in out if line.strip()]


def split_words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes: not for us to judge
        return []


def sslkit_commands(words: list[str]) -> list[list[str]]:
    """The argument lists of every ``sslkit`` invocation among ``words``."""
    found: list[list[str]] = []
    commands: list[list[str]] = [[]]
    for word in words:  # split at ; && || | and redirections
        if word in _OPERATORS:
            if commands[-1] and commands[-1][-1].isdigit() and word.startswith((">", "<")):
                commands[-1].pop()  # "2>&1": the 2 belongs to the redirection
            commands.append([])
        else:
            commands[-1].append(word)
    for command in commands:
        start = 0
        while start < len(command) and _ASSIGNMENT.match(command[start]):
            start += 1  # VAR=value sslkit ...
        for i in range(start, len(command)):
            word = command[i]
            if i == start and (word == "sslkit" or word.endswith("/sslkit")) or (
                i > start and command[i - 1] == "-m" and word == "sslkit"
            ):
                args = command[i + 1:]
                # a redirection target or output file is not an argument
                found.append([a for a in args if a not in _OPERATORS])
                break
            if " " in word and "sslkit" in word:  # bash -c '... sslkit ...'
                found += sslkit_commands(split_words(word))
    return found


def check_sslkit_argv(argv: list[str]) -> None:
    """Parse ``argv`` as ``sslkit.cli.main`` does; check train's overrides against the schema."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help
            return
        raise AssertionError(f"sslkit {' '.join(argv)}: the command line does not parse") from None
    if extra and (args.command != "train" or any(e.startswith("-") or "=" not in e for e in extra)):
        raise AssertionError(f"sslkit {' '.join(argv)}: unrecognized arguments {extra}")
    if args.command == "train":
        overrides = [o for o in [*args.overrides, *extra] if "$" not in o]
        recipe = None
        if "$" not in args.recipe:
            path = ROOT / args.recipe
            if path.is_file():
                recipe = path
            elif args.recipe.startswith("recipes/"):
                raise AssertionError(f"sslkit {' '.join(argv)}: there is no {args.recipe}")
        load_config(recipe, overrides)  # ConfigError names an unknown key or a wrong type


SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL and b.no_run is None]


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.where)
def test_sslkit_command_lines_parse(block):
    for line in shell_lines(block.code, block.lang):
        for argv in sslkit_commands(split_words(line)):
            try:
                check_sslkit_argv(argv)
            except Exception as err:  # noqa: BLE001 - any failure is the page's
                pytest.fail(f"{block.where}: {line.strip()}\n{type(err).__name__}: {err}")


def test_command_line_extraction():
    """The extraction above finds the commands the pages write, and only those."""
    words = split_words("WANDB_MODE=offline sslkit train r.yaml train.trackers=[wandb] 2>&1 | tee log  # note")
    assert sslkit_commands(words) == [["train", "r.yaml", "train.trackers=[wandb]"]]
    words = split_words("accelerate launch --multi_gpu --num_processes 8 -m sslkit train r.yaml optim.lr=0.3")
    assert sslkit_commands(words) == [["train", "r.yaml", "optim.lr=0.3"]]
    words = split_words("srun bash -c 'exec accelerate launch -m sslkit train \"$RECIPE\" resume=$RESUME'")
    assert sslkit_commands(words) == [["train", "$RECIPE", "resume=$RESUME"]]
    assert sslkit_commands(split_words("pip install 'sslkit[gpu]' && cd sslkit")) == []
    console = shell_lines("$ sslkit plot \\\n    runs/x\nruns/x/plots/curves.png\n", "console")
    assert [line.split() for line in console] == [["sslkit", "plot", "runs/x"]]
    check_sslkit_argv(["train", "recipes/quickstart.yaml", "optim.lr=0.3", "--num-processes", "2"])
    for bad in (["train", "recipes/quickstart.yaml", "optim.lrr=0.3"], ["train", "recipes/nope.yaml"],
                ["eval", "knn", "--checkpoint", "c", "--data", "d", "--kk", "3"], ["plot"]):
        with pytest.raises(Exception):
            check_sslkit_argv(bad)


YAML_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("yaml", "yml") and b.no_run is None]
SECTIONS = set(Config.model_fields)


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=lambda b: b.where)
def test_yaml_blocks_parse_and_recipes_fit_the_schema(block):
    tree = yaml.safe_load(block.code)
    if isinstance(tree, dict) and tree and set(tree) <= SECTIONS:
        config_from_dict(tree)  # a recipe (fragment): every key must exist, every value fit its type


# ---------------------------------------------------------------- API reference and site


def sslkit_modules() -> list[str]:
    names = [sslkit.__name__]
    for info in pkgutil.walk_packages(sslkit.__path__, prefix="sslkit."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return names


def test_docstring_examples_pass():
    """The ``>>>`` examples the API reference shows, module by module."""
    attempted = 0
    for name in sslkit_modules():
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"a docstring example of {name} fails (see the output above)"
        attempted += result.attempted
    assert attempted > 0


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]' (make docs does)")
    pytest.importorskip("material", reason="mkdocs-material is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python",
                        reason="mkdocstrings-python is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "WARNING" not in output, output[-6000:]
    for page in PAGES:  # every page is built (and so in the nav: strict fails on one left out)
        rel = page.relative_to(DOCS)
        built = tmp_path / "site" / (rel.parent if rel.name == "index.md" else rel.with_suffix("")) / "index.html"
        assert built.is_file(), f"{page} was not built"
