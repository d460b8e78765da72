"""Refresh the README's benchmark table from a saved ``invertnet bench --json`` file.

Usage (from the repository root)::

    python tools/update_readme_bench.py docs/_static/bench_cpu.json

The table goes between the ``.. bench-results-start`` and ``.. bench-results-end``
comments of README.rst; everything else is left as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

# Use the invertnet of this checkout, also when another one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from invertnet.bench.report import render_rst  # noqa: E402

START = ".. bench-results-start"
END = ".. bench-results-end"


def replace_block(readme: str, block: str) -> str:
    """Return ``readme`` with the text between the markers replaced by ``block``."""
    if readme.count(START) != 1 or readme.count(END) != 1:
        raise ValueError(f"README must contain {START!r} and {END!r} exactly once each")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n\n{block.strip()}\n\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    """Render the JSON file's table into the README; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="a file written by invertnet bench --json")
    parser.add_argument("--readme", type=Path, default=Path("README.rst"))
    args = parser.parse_args(argv)
    document = json.loads(args.json.read_text())
    try:
        updated = replace_block(args.readme.read_text(), render_rst(document))
    except ValueError as exc:
        parser.error(str(exc))
    args.readme.write_text(updated)
    sys.stdout.write(f"updated {args.readme} from {args.json}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
