"""The README's commands and quickstart are what CI and users actually run."""

from __future__ import annotations

import re
from pathlib import Path

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
