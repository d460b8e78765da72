"""Build the optional C loops of the exact momentum iteration; the rest is in pyproject.toml.

The extension is optional: where it cannot be built (no C compiler), installation
goes on and invertnet uses the equivalent, slower tensor operations
(``invertnet.momentum.backends.NATIVE`` tells which).
"""

import sys

from setuptools import Extension, setup

# Without contraction, no multiplication is fused with the addition after it:
# the loops must round exactly as torch does (see the C file's header).
COMPILE_ARGS = [] if sys.platform == "win32" else ["-O3", "-std=c11", "-ffp-contract=off"]

setup(
    ext_modules=[
        Extension(
            "invertnet.momentum.backends._native",
            sources=["invertnet/momentum/backends/_native.c"],
            extra_compile_args=COMPILE_ARGS,
            optional=True,
        )
    ]
)
