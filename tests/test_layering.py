"""Layering rules for ``src/fxsurgeon`` (issue 19): no import cycles, no cross-module ``_private`` imports,
no upward imports between declared layers, and no submodule importing the bare ``fxsurgeon`` facade.

Every module is read with :mod:`ast`, not imported, so module-level and lazy (in-function) imports both count.
Imports under ``if TYPE_CHECKING:`` are left out: they never run, so they can neither form a runtime cycle nor
pull a high layer in at import time. An edge goes to the module named, not to the packages above it, although
Python runs those packages' ``__init__`` first: ``fxsurgeon.record`` importing ``fxsurgeon.passes.base`` also runs
``fxsurgeon.passes``, which imports every pass (closed today only through lazy imports; see issue 19).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "fxsurgeon"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Lower numbers are lower layers; a module may import only from its own layer or below. A key names a module or
# a package prefix ("fxsurgeon.passes" covers fxsurgeon.passes.*); the longest matching key wins. The layers follow
# the pipeline: shared runtime helpers, then maths and module builders, tracing and the record, measurement
# (calibration, latency, budgets), the passes that use it, convert, saving/loading, reports and benchmarks, and
# last the command line. The facade ``fxsurgeon`` sits on top: nothing inside the package imports it.
LAYERS: dict[str, int] = {
    # 0: leaves shared by everything: the exception type, device/dtype/timing/version helpers, train/eval flags,
    # the table of moved module names, the on-disk cache file, ONNX export and onnxruntime sessions
    "fxsurgeon.errors": 0,
    "fxsurgeon.runtime": 0,
    "fxsurgeon.modes": 0,
    "fxsurgeon.moved": 0,
    "fxsurgeon.cachefile": 0,
    "fxsurgeon.onnxrun": 0,
    # 1: pure maths and module builders (forms/), graph reading and editing (graph/), the pass vocabulary
    "fxsurgeon.forms": 1,
    "fxsurgeon.modules": 1,
    "fxsurgeon.heads": 1,
    "fxsurgeon.models": 1,
    "fxsurgeon.graph": 1,
    "fxsurgeon.passes.base": 1,
    "fxsurgeon.passes.options": 1,
    "fxsurgeon.passes.registry": 1,
    # 2: tracing, the conversion record, verification, model sources, recipe files, synthetic data
    "fxsurgeon.tracing": 2,
    "fxsurgeon.record": 2,
    "fxsurgeon.verify": 2,
    "fxsurgeon.sources": 2,
    "fxsurgeon.recipe_files": 2,
    "fxsurgeon.synthetic": 2,
    # 3: measurement the passes and convert use: calibration, rank allocation, latency tables and budgets
    "fxsurgeon.calibrate": 3,
    "fxsurgeon.budget": 3,
    # 4: the passes and the pass manager
    "fxsurgeon.passes": 4,
    # 5: convert, and recipes (which validate pass options and may call convert)
    "fxsurgeon.convert": 5,
    "fxsurgeon.recipes": 5,
    # 6: saved files: save/load and replay, file checks, exports, original checkpoints of converted models
    "fxsurgeon.io": 6,
    "fxsurgeon.rebuild": 6,
    "fxsurgeon.filecheck": 6,
    "fxsurgeon.export": 6,
    "fxsurgeon.checkpoints": 6,
    # 7: reports, benchmarks, test helpers (fuzzers)
    "fxsurgeon.report": 7,
    "fxsurgeon.bench": 7,
    "fxsurgeon.testing": 7,
    # 8-10: the command line: shared helpers, then batch and the sub-CLIs, then the command that adds them
    "fxsurgeon.cli.common": 8,
    "fxsurgeon.batch": 9,
    "fxsurgeon.cli.bench": 9,
    "fxsurgeon.cli.report": 9,
    "fxsurgeon.cli": 10,
    # the facade: imports everything, imported by nothing inside the package
    "fxsurgeon": 99,
}

# Known violations still present, each with the reason it is still there. Empty means none are tolerated.
# Entries are (importer, imported module, imported name or None).
ALLOWED: set[tuple[str, str, str | None]] = set()


@dataclass(frozen=True)
class Import:
    importer: str  #: dotted name of the importing module
    line: int
    module: str  #: dotted name of the imported fxsurgeon module
    name: str | None  #: the name taken from it (``from m import name``), or None for a module import

    def __str__(self) -> str:
        what = f"{self.module}.{self.name}" if self.name else self.module
        return f"{self.importer}:{self.line} imports {what}"


def module_sources(root: Path = SRC, package: str = PACKAGE) -> dict[str, tuple[str, bool]]:
    """{dotted module name: (source, is_package)} for every ``.py`` file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join([package, *parts])] = (path.read_text(encoding="utf-8"), is_pkg)
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of every node under an ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) block."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skip.update(id(n) for n in ast.walk(child))
    return skip


def collect_imports(sources: dict[str, tuple[str, bool]], package: str = PACKAGE) -> list[Import]:
    """Every import of a ``package`` module by a ``package`` module, at any depth of the syntax tree."""
    modules = set(sources)
    found: list[Import] = []

    def target(mod: str, name: str | None, importer: str, line: int) -> None:
        # ``from pkg import sub`` names a module when ``pkg.sub`` is one; otherwise it takes a name from ``pkg``
        if name is not None and f"{mod}.{name}" in modules:
            found.append(Import(importer, line, f"{mod}.{name}", None))
        else:
            found.append(Import(importer, line, mod, name))

    for importer, (source, is_pkg) in sources.items():
        tree = ast.parse(source)
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == package or alias.name.startswith(package + "."):
                        found.append(Import(importer, node.lineno, alias.name, None))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = importer.split(".") if is_pkg else importer.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if not (mod == package or mod.startswith(package + ".")):
                    continue
                for alias in node.names:
                    target(mod, None if alias.name == "*" else alias.name, importer, node.lineno)
    return found


def find_cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself), Tarjan."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.module)
        graph.setdefault(imp.module, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # iterative would be safer for deep graphs; ours is ~60 modules
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(sccs, key=lambda c: (-len(c), c))


def cycle_edges(imports: list[Import], sccs: list[list[str]]) -> list[Import]:
    """The imports that stay inside one strongly connected component: the edges to cut."""
    comp_of = {m: i for i, comp in enumerate(sccs) for m in comp}
    return [imp for imp in imports
            if imp.importer in comp_of and comp_of.get(imp.module) == comp_of[imp.importer]]


def _is_private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(imports: list[Import]) -> list[Import]:
    """Imports of a ``_private`` name (or module) from another module of the package."""
    out = []
    for imp in imports:
        if imp.module == imp.importer:
            continue
        if _is_private(imp.name) or any(_is_private(part) for part in imp.module.split(".")):
            out.append(imp)
    return out


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    best = None
    for key in layers:
        if (module == key or module.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    return None if best is None else layers[best]


def upward_imports(imports: list[Import], layers: dict[str, int]) -> list[Import]:
    """Imports from a higher layer into a lower one."""
    return [imp for imp in imports
            if imp.importer != imp.module
            and (layer_of(imp.importer, layers) or 0) < (layer_of(imp.module, layers) or 0)]


def facade_imports(imports: list[Import], package: str = PACKAGE) -> list[Import]:
    """Submodules importing the bare package (its ``__init__`` facade) instead of the defining submodule."""
    return [imp for imp in imports if imp.module == package and imp.importer != package]


def _unallowed(imports: list[Import]) -> list[Import]:
    return [imp for imp in imports if (imp.importer, imp.module, imp.name) not in ALLOWED]


def _report(title: str, imports: list[Import]) -> str:
    return title + ":\n" + "\n".join(f"  {imp}" for imp in imports)


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return collect_imports(module_sources())


def test_every_module_has_a_layer(imports):
    missing = sorted(m for m in module_sources() if layer_of(m, LAYERS) is None)
    assert not missing, f"modules with no layer in LAYERS (add them): {missing}"


def test_no_import_cycles(imports):
    sccs = find_cycles(imports)
    edges = _unallowed(cycle_edges(imports, sccs))
    assert not edges, (
        "import cycles (strongly connected components): "
        + "; ".join(" <-> ".join(c) for c in sccs) + "\n" + _report("imports inside them", edges))


def test_no_cross_module_private_imports(imports):
    bad = _unallowed(private_imports(imports))
    assert not bad, _report("private names imported from another module (make them public or move them)", bad)


def test_no_upward_imports(imports):
    bad = _unallowed(upward_imports(imports, LAYERS))
    assert not bad, _report(
        "imports from a higher layer (see LAYERS; move the shared code down, e.g. to fxsurgeon.runtime)",
        [imp for imp in bad])


def test_no_facade_imports(imports):
    bad = _unallowed(facade_imports(imports))
    assert not bad, _report("submodules importing the bare fxsurgeon package; import the defining module", bad)


def test_allow_list_is_not_stale(imports):
    live = {(i.importer, i.module, i.name) for i in imports}
    stale = sorted(ALLOWED - live, key=str)
    assert not stale, f"ALLOWED entries no longer needed (remove them): {stale}"


# --- the checker can fail -------------------------------------------------------------------------------------

SYNTHETIC = {
    "pkg": ("from .high import run\n", True),
    "pkg.low": ("import os\n\ndef f():\n    from .high import _helper\n    return _helper\n", False),
    "pkg.high": ("from .low import f\nfrom . import low as _low\n\ndef _helper():\n    pass\n", False),
    "pkg.mid": ("from pkg.low import f, __doc__\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                "    from pkg.high import run\nimport pkg\n", False),
    "pkg.sub": ("", True),
    "pkg.sub.leaf": ("from .. import low\nfrom ..low import _x\n", False),
}


def test_checker_finds_synthetic_violations():
    imps = collect_imports(SYNTHETIC, package="pkg")
    edges = {(i.importer, i.line, i.module, i.name) for i in imps}
    # lazy import, relative imports at two levels, ``from . import module``, absolute form, TYPE_CHECKING skipped
    assert ("pkg.low", 4, "pkg.high", "_helper") in edges
    assert ("pkg.high", 2, "pkg.low", None) in edges
    assert ("pkg.sub.leaf", 1, "pkg.low", None) in edges
    assert ("pkg.sub.leaf", 2, "pkg.low", "_x") in edges
    assert ("pkg.mid", 1, "pkg.low", "__doc__") in edges
    assert not any(i.importer == "pkg.mid" and i.module == "pkg.high" for i in imps)

    assert find_cycles(imps) == [["pkg.high", "pkg.low"]]
    assert {str(i) for i in cycle_edges(imps, find_cycles(imps))} == {
        "pkg.low:4 imports pkg.high._helper", "pkg.high:1 imports pkg.low.f", "pkg.high:2 imports pkg.low"}

    private = {str(i) for i in private_imports(imps)}
    assert private == {"pkg.low:4 imports pkg.high._helper", "pkg.sub.leaf:2 imports pkg.low._x"}

    layers = {"pkg.low": 0, "pkg.sub": 0, "pkg.mid": 1, "pkg.high": 2, "pkg": 9}
    assert [str(i) for i in upward_imports(imps, layers)] == [
        "pkg.low:4 imports pkg.high._helper", "pkg.mid:5 imports pkg"]
    assert [str(i) for i in facade_imports(imps, package="pkg")] == ["pkg.mid:5 imports pkg"]


def test_checker_passes_a_clean_package():
    clean = {"pkg": ("from .b import g\n", True), "pkg.a": ("X = 1\n", False),
             "pkg.b": ("from .a import X\n\ndef g():\n    return X\n", False)}
    imps = collect_imports(clean, package="pkg")
    assert find_cycles(imps) == [] and private_imports(imps) == []
    assert upward_imports(imps, {"pkg.a": 0, "pkg.b": 1, "pkg": 9}) == []
    assert facade_imports(imps, package="pkg") == []


# ------------------------------------------------------------------------------------ test files mirror modules

#: test files that check the package as a whole or something outside it, with why
NOT_ONE_MODULE = {
    "test_layering.py": "the import structure of the whole package (and this naming rule)",
    "test_docs.py": "the README and the docs site: examples run, links resolve, the strict build",
    "test_docs_cli.py": "docs/cli.md generated from the parser, and the README's quick start",
    "test_gpu.py": "the CUDA path of convert, report and bench together (marked gpu)",
    "test_gpu_calibration.py": "calibration on CUDA (marked gpu)",
}


def _module_paths() -> set[str]:
    """``fxsurgeon/passes/separable/options.py`` → ``"passes_separable_options"``, packages included."""
    out = set()
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and not parts[-1].startswith("_"):
            out.add("_".join(parts))
    return out


def owning_module(test_name: str, modules: set[str]) -> str | None:
    """The longest module path a test file's name starts with (``test_<module>[_<topic>].py``), or None.

    >>> owning_module("test_passes_separable.py", {"passes", "passes_separable"})
    'passes_separable'
    >>> owning_module("test_budget_latency_budget.py", {"budget", "budget_latency", "budget_latency_budget"})
    'budget_latency_budget'
    """
    stem = test_name.removeprefix("test_").removesuffix(".py")
    words = stem.split("_")
    for n in range(len(words), 0, -1):
        if "_".join(words[:n]) in modules:
            return "_".join(words[:n])
    return None


def test_test_files_are_named_after_the_modules_they_test():
    modules = _module_paths()
    tests = sorted(p.name for p in Path(__file__).parent.glob("test_*.py"))
    unnamed = [t for t in tests if t not in NOT_ONE_MODULE and owning_module(t, modules) is None]
    assert not unnamed, (f"test files whose name starts with no module path of src/fxsurgeon (test_<module>[_topic].py,"
                         f" e.g. test_passes_separable.py): {unnamed}")
    stale = sorted(set(NOT_ONE_MODULE) - set(tests))
    assert not stale, f"NOT_ONE_MODULE names files that no longer exist: {stale}"


def test_naming_rule_can_fail():
    assert owning_module("test_shapes.py", _module_paths()) is None
    assert owning_module("test_passes_manager_shapes.py", _module_paths()) == "passes_manager"
