"""The docs cannot drift from the code: Getting started runs as written, and every command line in
README.md and docs/ names a command, options, make targets and benchmarks that exist.

(The README's Python block runs as written in tests/test_api.py.)
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``language`` in a markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def section(page: Path, heading: str) -> str:
    """The text of the ``## heading`` section of a page, up to the next ``## ``."""
    text = page.read_text(encoding="utf-8")
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def command_lines(text: str) -> list[str]:
    """The shell command lines of the bash blocks of a text: continuations joined, comments dropped."""
    lines = []
    for block in blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


# ---------------------------------------------------------------- Getting started, as written


@pytest.mark.slow
def test_getting_started_runs_as_written(tmp_path, monkeypatch, small_judge):
    """Every command of "Your first translator" and the Python block after it, in an empty folder (the
    shapes judge placed beforehand: n2n-train-ae would train it for a minute)."""
    page = REPO / "docs" / "getting-started.md"
    shutil.copytree(small_judge, tmp_path / "experts" / "judge-shapes")
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for line in command_lines(section(page, "Your first translator, step by step")):
        done = subprocess.run(line, shell=True, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    assert np.asarray(Image.open("red.png")).std() > 0  # a grid of decoded samples, not a blank image
    assert (tmp_path / "runs/minilm_ae/eval.json").is_file()

    (code,) = blocks(section(page, "The same from Python"), "python")
    scope: dict = {}
    exec(compile(code, "getting-started.md", "exec"), scope)
    assert scope["images"].shape == (1, 4, 3, 64, 64)
    assert np.isfinite(scope["scores"]["heldout_bpd"])


# ---------------------------------------------------------------- every command line names real things


def commands() -> dict[str, click.Command]:
    """n2n's console scripts by name, as click commands."""
    found = {}
    for ep in entry_points(group="console_scripts"):
        if ep.name.startswith("n2n-") and ep.value.startswith("n2n."):
            found[ep.name] = ep.load()
    return found


def module_command(module: str) -> click.Command:
    """The click command that ``python -m module`` runs (n2n.extract -> n2n.extract.cli:main)."""
    return importlib.import_module(f"{module}.cli").main


def check_options(command: click.Command, words: list[str], where: str) -> None:
    """Every --option in ``words`` is one of ``command``'s (descending into a group's subcommand)."""
    if isinstance(command, click.Group) and words and not words[0].startswith("-"):
        sub = command.commands.get(words[0])
        assert sub is not None, f"{where}: {command.name} has no subcommand {words[0]!r}"
        return check_options(sub, words[1:], where)
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    known |= {"-h", "--help"}
    for word in words:
        option = word.split("=", 1)[0]
        if option.startswith("-") and option not in ("-", "--"):
            assert option in known, f"{where}: {command.name} has no option {option}"


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_line_names_real_commands_options_and_targets(page):
    scripts, targets = commands(), makefile_targets()
    for line in command_lines(page.read_text(encoding="utf-8")):
        for part in re.split(r"&&|\|\|", line):
            words = shlex.split(part.replace("$", "_"))  # shell variables stand for values
            while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
                words = words[1:]
            if not words:
                continue
            where = f"{page.name}: {part.strip()}"
            if words[0] in scripts:
                check_options(scripts[words[0]], words[1:], where)
            elif words[0] == "make":
                for target in (w for w in words[1:] if "=" not in w and not w.startswith("-")):
                    assert target in targets, f"{where}: the Makefile has no target {target!r}"
            elif "-m" in words and words[0] in ("python", "python3", "torchrun", ".venv/bin/python"):
                module = words[words.index("-m") + 1]
                if module.startswith("n2n."):
                    check_options(module_command(module), words[words.index("-m") + 2:], where)
                elif module.startswith("bench."):
                    assert (REPO / "bench" / f"{module.split('.', 1)[1]}.py").is_file(), f"{where}: no {module}"
            elif words[0].startswith("n2n-"):
                pytest.fail(f"{where}: there is no command {words[0]}")
