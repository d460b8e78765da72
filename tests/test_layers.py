"""The package's layers, written down once (:data:`LAYERS`), and held: every import
of every module of ``invertnet`` (at its top, inside functions, under
``TYPE_CHECKING``) runs down the layers or stays in its own part, and no module
imports itself back through others.

The imports are read from the source (``ast``), not by importing: a test that
imported the package would see only what one run happens to execute.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "invertnet"

#: The layers of ``invertnet``, lowest first. Each is a tuple of *parts*: a part is
#: a sub-package or module directly under ``invertnet`` (``""`` is
#: ``invertnet/__init__.py``, the public API). A module may import its own part and
#: the parts of lower layers; not a peer in its own layer, nor anything above.
LAYERS: tuple[tuple[str, ...], ...] = (
    # Private helpers that import nothing of invertnet: grad-mode switching,
    # optional dependencies.
    ("_grad_mode", "_optional"),
    # The runtime floor, what the memory-saving layers share: the one module of
    # private PyTorch APIs, the forward-state record, the random state, the deferred
    # device check, the block contract.
    ("_runtime",),
    # Blocks that know only the floor: the wrapper (which knows a module through
    # the block contract alone) and MomentumNet.
    ("wrappers", "momentum"),
    # Blocks built on those: the couplings (their momentum coupling validates gamma
    # as MomentumNet does), normalizing flows (which run under the wrapper), the
    # invertibility checker, the chain of a stack's blocks under one wrapper call.
    ("couplings", "flows", "checks", "_block_chain"),
    # The two-stream stack: couplings under wrappers.
    ("reversible_sequential",),
    # The public API, invertnet/__init__.py.
    ("",),
    # On top of the library: models, then the commands that train and measure them.
    ("models",),
    ("bench", "train", "hf", "cli"),
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _bound_names(path: Path) -> set[str]:
    """The names a module binds at its top level (also under ``if`` and ``try``)."""
    names: set[str] = set()
    pending = list(ast.parse(path.read_text(), str(path)).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                pending.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            pending.extend(node.body)
    return names


def _from_import(origin: str, name: str) -> str:
    """The module that ``from origin import name`` depends on: ``origin.name`` where
    that is a module of the package; ``origin`` where ``name`` is bound there;
    otherwise ``origin.name`` (a module that is not Python source, such as an
    optional compiled extension, which imports nothing of invertnet)."""
    sub = f"{origin}.{name}"
    if sub in MODULES:
        return sub
    path = MODULES.get(origin)
    if path is not None and path.name == "__init__.py" and name not in _bound_names(path):
        return sub
    return origin


def _imported(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """The invertnet modules ``module`` imports, with the line of each import.

    ``from P import N`` imports the module ``P.N`` where there is one, else (a name
    defined in ``P``) the module ``P`` (see :func:`_from_import`).
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                yield _from_import(origin, alias.name), node.lineno


def _graph() -> dict[str, dict[str, int]]:
    """Module -> the invertnet modules it imports -> the line of the first import."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        edges: dict[str, int] = {}
        for target, line in _imported(module, path):
            if target != "invertnet" and not target.startswith("invertnet."):
                continue
            # Only Python source imports anything: a compiled extension has no edges.
            if target in MODULES and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def _part(module: str) -> str:
    """The part of ``invertnet`` that ``module`` belongs to (``""``: the package's
    own ``__init__``)."""
    return module.split(".")[1] if "." in module else ""


def _layer_of() -> dict[str, int]:
    return {part: i for i, layer in enumerate(LAYERS) for part in layer}


def test_every_part_of_the_package_has_a_layer() -> None:
    layers = _layer_of()
    unplaced = sorted({_part(m) for m in MODULES} - set(layers))
    assert not unplaced, f"add these parts of invertnet to LAYERS in {__file__}: {unplaced}"
    listed = [part for layer in LAYERS for part in layer]
    assert len(listed) == len(set(listed)), "a part is listed in two layers"


def test_no_import_runs_up_the_layers_or_across_to_a_peer() -> None:
    layers = _layer_of()
    wrong = []
    for module, edges in _graph().items():
        part = _part(module)
        for target, line in edges.items():
            other = _part(target)
            if other == part or other not in layers or part not in layers:
                continue  # within a part; unplaced parts fail the test above
            if layers[other] >= layers[part]:
                where = "up" if layers[other] > layers[part] else "across"
                wrong.append(
                    f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports "
                    f"{target} ({where}: {part or 'invertnet'} is in layer "
                    f"{layers[part]}, {other or 'invertnet'} in layer {layers[other]})"
                )
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    described = []
    for component in cycles:
        members = set(component)
        edges = [
            f"  {MODULES[a].relative_to(PACKAGE.parent)}:{line} imports {b}"
            for a in component
            for b, line in graph[a].items()
            if b in members
        ]
        described.append(" <-> ".join(component) + "\n" + "\n".join(edges))
    assert not cycles, "import cycles:\n" + "\n".join(described)


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        # A submodule named in a from-import is that module, not its package.
        ("from invertnet.couplings import base", "invertnet.x", "invertnet.couplings.base"),
        ("from invertnet.couplings import Step", "invertnet.x", "invertnet.couplings"),
        ("from . import base", "invertnet.couplings.additive", "invertnet.couplings.base"),
        ("from .base import Step", "invertnet.couplings.additive", "invertnet.couplings.base"),
        ("from .. import wrappers", "invertnet.flows.flow", "invertnet.wrappers"),
        ("import invertnet.wrappers.debug", "invertnet.x", "invertnet.wrappers.debug"),
        # Not a module, and not bound in the package: an optional compiled extension.
        ("from invertnet.couplings import _built", "invertnet.x", "invertnet.couplings._built"),
    ],
)
def test_imports_are_read_as_python_resolves_them(
    tmp_path: Path, source: str, module: str, expected: str
) -> None:
    name = "__init__.py" if module == "invertnet.x" else "m.py"
    path = tmp_path / name
    path.write_text(f"def f():\n    {source}\n")  # inside a function: still found
    assert [target for target, _ in _imported(module, path)] == [expected]
