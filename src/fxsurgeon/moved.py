"""Old module names that moved when the package was arranged into folders, kept importable.

Code, pickles (``torch.save`` of a whole converted model names its module classes by import path) and saved
files (a ``source`` factory such as ``fxsurgeon.fuzz:FuzzNet``) may name a module by where it was before.
:func:`install` adds a finder to :data:`sys.meta_path` that answers an old name with the module now at the new
one — the same module object, so classes pickled under the old path unpickle as today's classes — and says
where it lives now with a :class:`DeprecationWarning`. Nothing is imported until an old name is asked for.

>>> import importlib, warnings
>>> install()
>>> with warnings.catch_warnings(record=True):
...     warnings.simplefilter("always")
...     old = importlib.import_module("fxsurgeon.forms_dense")
>>> old is importlib.import_module("fxsurgeon.forms.dense")
True
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "current_structure", "install"]

#: old module name → where it lives now
MOVED: dict[str, str] = {
    "fxsurgeon.report_attrib": "fxsurgeon.report.attrib",
    "fxsurgeon.report_render": "fxsurgeon.report.render",
    "fxsurgeon.report_plot": "fxsurgeon.report.plot",
    "fxsurgeon.report_scope": "fxsurgeon.report.scope",
    "fxsurgeon.report_count": "fxsurgeon.report.count",
    "fxsurgeon.report_cli": "fxsurgeon.cli.report",
    "fxsurgeon.bench_ort": "fxsurgeon.bench.ort",
    "fxsurgeon.bench_cli": "fxsurgeon.cli.bench",
    "fxsurgeon.cli_common": "fxsurgeon.cli.common",
    "fxsurgeon.fuzz": "fxsurgeon.testing.fuzz",
    "fxsurgeon.testing_load_fuzz": "fxsurgeon.testing.load_fuzz",
    "fxsurgeon.forms_base": "fxsurgeon.forms.base",
    "fxsurgeon.forms_dense": "fxsurgeon.forms.dense",
    "fxsurgeon.cp": "fxsurgeon.forms.cp",
    "fxsurgeon.decompose": "fxsurgeon.forms.decompose",
    "fxsurgeon.fusion_math": "fxsurgeon.forms.fusion_math",
    "fxsurgeon.importance": "fxsurgeon.forms.importance",
    "fxsurgeon.allocation": "fxsurgeon.budget.allocation",
    "fxsurgeon.allotment": "fxsurgeon.budget.allotment",
    "fxsurgeon.latency": "fxsurgeon.budget.latency",
    "fxsurgeon.latency_table": "fxsurgeon.budget.latency_table",
    "fxsurgeon.latency_budget": "fxsurgeon.budget.latency_budget",
}


def current_structure(lines: list[str]) -> list[str]:
    """Structure lines of a saved file (``"name: module.Class(...)"``, :func:`fxsurgeon.rebuild.structure`) with module
    classes named by their current paths, so a file saved before a move compares equal to today's rebuild.

    >>> current_structure(["layer1.0.conv1: fxsurgeon.forms_dense.TuckerConv2d()"])
    ['layer1.0.conv1: fxsurgeon.forms.dense.TuckerConv2d()']
    """
    out = []
    for line in lines:
        for old, new in MOVED.items():
            if f": {old}." in line:
                line = line.replace(f": {old}.", f": {new}.", 1)
                break
        out.append(line)
    return out


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """The module at the new name ran already."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


_FINDER = _MovedFinder()


def install() -> None:
    """Put the finder on :data:`sys.meta_path` (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_FINDER)
