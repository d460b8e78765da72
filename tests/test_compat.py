"""The library imports cleanly and leaves warnings and stdout to its users."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "invertnet"
# Command-line modules may write to stdout; the library proper may not.
CLI = ("bench", "train", "cli.py")


def _library_sources() -> list[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] not in CLI:
            files.append(path)
    return files


def test_import_raises_no_warning() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import invertnet; print(invertnet.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert Path(result.stdout.strip()).resolve() == (PACKAGE / "__init__.py").resolve()


def test_library_sets_no_warning_filters_and_prints_nothing() -> None:
    sources = _library_sources()
    assert PACKAGE / "wrappers" / "invertible.py" in sources
    pattern = re.compile(r"\b(filterwarnings|simplefilter)\b|(?<![\w.])print\(")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith((">>>", "..."))  # doctests
    ]
    assert offenders == []


def test_the_grep_would_catch_offenders() -> None:
    pattern = re.compile(r"\b(filterwarnings|simplefilter)\b|(?<![\w.])print\(")
    assert pattern.search("warnings.filterwarnings('ignore')")
    assert pattern.search("    print(x)")
    assert not pattern.search("self.pprint(x)")
