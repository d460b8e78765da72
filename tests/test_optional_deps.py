"""The core needs only torch; optional packages fail with an error naming the extra.

Absence is simulated in a fresh interpreter whose ``import`` statement and
``importlib.import_module`` refuse numpy, tqdm, matplotlib, torchvision and
resource (as on Windows), so nothing already imported by this test session can hide
an import. (torch itself copes without numpy; ``importlib.util.find_spec``, which
torch uses to probe for it, is left alone.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from invertnet import _optional

ROOT = Path(__file__).resolve().parents[1]

_BLOCKER = """
import builtins
import importlib
import sys

BLOCKED = {"numpy", "tqdm", "matplotlib", "torchvision", "resource"}
_import, _import_module = builtins.__import__, importlib.import_module


def _refuse(name):
    if name.split(".")[0] in BLOCKED:
        raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)


def blocking_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0:
        _refuse(name)
    return _import(name, globals, locals, fromlist, level)


def blocking_import_module(name, package=None):
    _refuse(name)
    return _import_module(name, package)


builtins.__import__ = blocking_import
importlib.import_module = blocking_import_module
"""


def _run_without_optional(code: str) -> subprocess.CompletedProcess[str]:
    script = _BLOCKER + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""},
    )


def test_core_runs_with_torch_alone() -> None:
    proc = _run_without_optional(
        """
        import torch
        import invertnet
        from torch import nn

        block = invertnet.InvertibleModuleWrapper(invertnet.AdditiveCoupling(nn.Linear(2, 2)))
        x = torch.randn(3, 4, requires_grad=True)
        block(x).sum().backward()
        assert invertnet.is_invertible_module(
            invertnet.AffineCoupling(nn.Linear(2, 2), adapter=invertnet.AffineAdapterNaive),
            test_input_shape=(3, 4),
            atol=1e-5,
        )
        net = invertnet.MomentumNet([nn.Linear(4, 4) for _ in range(3)], gamma=0.9)
        net(torch.randn(2, 4)).sum().backward()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        invertnet.transform_to_momentumnet(enc, sub_layers=["layers"], gamma=0.9)
        # The commands and models import too; they only need the extras when used.
        import invertnet.bench.cli, invertnet.bench.report, invertnet.train, invertnet.models
        for name in ("tqdm", "matplotlib", "torchvision", "resource"):
            assert name not in sys.modules, name
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


_USES = [
    ("from invertnet.bench.cli import _progress; _progress(1, disable=False)", "tqdm", "bench"),
    (
        "from invertnet.bench.report import write_plot; "
        "write_plot({'results': [], 'machine': {}, 'settings': {}}, 'x.png')",
        "matplotlib",
        "plot",
    ),
    ("from invertnet.models import cifar_resnet; cifar_resnet(18)", "torchvision", "models"),
    (
        "from invertnet.train.data import _cifar_transforms; _cifar_transforms('cifar10')",
        "torchvision",
        "train",
    ),
]


def test_a_missing_optional_package_names_its_extra() -> None:
    # One interpreter for all four uses (starting one costs seconds).
    lines = ["errors = []"]
    for code, _, _ in _USES:
        lines += [
            "try:",
            f"    {code}",
            "except ImportError as exc:",
            "    errors.append(str(exc))",
        ]
        lines += ["else:", "    errors.append('no error')"]
    lines.append("print(repr(errors))")
    proc = _run_without_optional("\n".join(lines))
    assert proc.returncode == 0, proc.stderr
    errors = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr
    for message, (_, package, extra) in zip(errors, _USES, strict=True):
        assert f"needs {package}, which is not installed" in message, message
        assert f'pip install "invertnet[{extra}]"' in message, message


def test_bench_without_tqdm_runs_with_no_progress_and_says_what_to_install() -> None:
    proc = _run_without_optional(
        """
        from invertnet.bench.cli import _progress
        bar = _progress(3, disable=True)
        bar.update(); bar.set_description("x"); bar.close()
        try:
            _progress(3, disable=False)
        except ImportError as exc:
            assert "--no-progress" in str(exc) and exc.name == "tqdm", exc
            print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_training_memory_figure_falls_back_without_resource_or_proc() -> None:
    proc = _run_without_optional(
        """
        import math, torch
        from invertnet.train import loop

        class NoProc:
            def __init__(self, *a, **k):
                raise OSError("no /proc here")

        loop.open = NoProc  # as on Windows: no /proc/self/status
        value, kind = loop.peak_memory_mb(torch.device("cpu"))
        assert math.isnan(value) and "unavailable" in kind, (value, kind)
        from invertnet.train.cli import _mib
        assert _mib(value) == "unavailable" and _mib(2.0) == "2.0 MiB"
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_require_error_names_package_and_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(_optional.importlib, "import_module", refuse)
    with pytest.raises(ImportError, match=r'pip install "invertnet\[plot\]"') as info:
        _optional.require("matplotlib.figure", "plot", "the plot")
    assert info.value.name == "matplotlib"
    assert str(info.value).startswith("the plot needs matplotlib, which is not installed")


def test_bench_without_its_extra_stops_before_measuring() -> None:
    proc = _run_without_optional(
        """
        from invertnet.bench import main
        assert main(["--workloads", "additive-conv", "--quick"]) == 2
        assert main(["--workloads", "additive-conv", "--no-progress", "--plot", "x.png"]) == 2
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("invertnet bench:")]
    assert len(errors) == 2
    assert "needs tqdm" in errors[0] and 'pip install "invertnet[bench]"' in errors[0]
    assert "needs matplotlib" in errors[1] and 'pip install "invertnet[plot]"' in errors[1]
