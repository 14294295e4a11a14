"""The README's usage example runs as written: its ```python blocks in order, then its `gradcoh ...` commands.

Blocks fenced as ```py are fragments inside a larger program (trainer callbacks) and are not run.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import matplotlib
from gradcoh.cli.main import app
from typer.testing import CliRunner

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_section() -> str:
    text = README.read_text()
    return text[text.index("## Usage") : text.index("### What is logged, and how")]


def fenced(section: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block, in order."""
    out, lang, lines = [], None, []
    for line in section.splitlines():
        if line.startswith("```") and lang is None:
            lang, lines = line[3:].strip(), []
        elif line.startswith("```"):
            out.append((lang, "\n".join(lines) + "\n"))
            lang = None
        elif lang is not None:
            lines.append(line)
    return out


def test_readme_usage_runs_as_written(tmp_path, monkeypatch, capsys):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    section = usage_section()
    blocks = [code for lang, code in fenced(section) if lang == "python"]
    assert len(blocks) >= 2
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert "m_coherence/clean" in capsys.readouterr().out
    commands = [line for lang, code in fenced(section) if lang == "" for line in code.splitlines()
                if line.startswith("gradcoh ")]
    assert len(commands) >= 3
    runner = CliRunner()
    for command in commands:
        result = runner.invoke(app, shlex.split(command)[1:])
        assert result.exit_code == 0, (command, result.output)
    assert (tmp_path / "coherence.png").stat().st_size > 0


def test_ci_runs_the_readme_test_command_and_the_one_thread_rerun():
    """.ci/run runs the README's test command verbatim, then tests/logger with one thread."""
    import re

    command = re.search(r"^    (pip install -e \"\.\[test\]\" && python -m pytest[^\n]*)$", README.read_text(), re.M)
    assert command, "the README's test command"
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert command.group(1) in ci
    rerun = [line for line in ci if line.startswith("OMP_NUM_THREADS=1 ")]
    assert rerun and "tests/logger" in rerun[0]
