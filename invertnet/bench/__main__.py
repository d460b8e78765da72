"""``python -m invertnet.bench``: the same as ``invertnet bench``."""

from __future__ import annotations

import sys

from invertnet.bench import main

if __name__ == "__main__":
    sys.exit(main())
