"""The ``invertnet`` command: ``invertnet bench ...`` and ``invertnet train ...``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

#: Sub-command name -> module whose ``main(argv)`` runs it.
COMMANDS = {
    "bench": ("invertnet.bench", "measure memory and speed side by side"),
    "train": ("invertnet.train", "train the memcnn and momentumnet models"),
}


def _usage() -> str:
    lines = ["usage: invertnet COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'invertnet COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a sub-command; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(_usage() + "\n")
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"invertnet: unknown command {name!r}; known: {', '.join(COMMANDS)}\n")
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
