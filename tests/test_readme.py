"""The README's commands and quickstart are what CI and users actually run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.rst").read_text()


def _setup_commands() -> list[str]:
    section = README.split("Setup\n=====", 1)[1].split("\n\n", 3)
    block = next(part for part in section if part.startswith("    "))
    return [line.strip() for line in block.splitlines() if line.strip()]


def _code_blocks() -> list[str]:
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", README)
    return ["\n".join(line[4:] for line in b.splitlines()) for b in blocks]


def test_setup_has_two_commands_and_ci_runs_the_test_command() -> None:
    commands = _setup_commands()
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
    assert "pytest" in commands[1]


def test_quickstart_runs_as_written() -> None:
    blocks = _code_blocks()
    assert blocks, "README has no python code block"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], "README.rst quickstart", "exec"), namespace)  # noqa: S102
    x = namespace["x"]
    # The quickstart's backward pass restored the freed input.
    assert tuple(x.shape) == (4, 16, 8, 8)


def test_setup_installs_what_the_benchmark_needs() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    first = _setup_commands()[0]
    assert first.startswith('pip install ".[bench]"') and first.endswith("invertnet bench")
    extras = project["optional-dependencies"]
    # The benchmark shows a progress bar unless told not to; --plot needs matplotlib.
    assert {_name(r) for r in extras["bench"]} >= {"tqdm", "matplotlib"}
    # The core needs torch alone; the test extra pulls in every other extra.
    assert [_name(r) for r in project["dependencies"]] == ["torch"]
    assert any(r.startswith("invertnet[") and "all" in r for r in extras["test"])


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0]
