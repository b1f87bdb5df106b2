"""Helpers over fx graphs and module trees, shared by the passes.

* :mod:`~fxsurgeon.graph.edit`: replace a module by qualified name, describe a layer for records;
* :mod:`~fxsurgeon.graph.index`: where each module is registered and used in a graph;
* :mod:`~fxsurgeon.graph.ops`: the one taxonomy of operations the passes recognise;
* :mod:`~fxsurgeon.graph.mutation`: in-place writes and memory aliasing;
* :mod:`~fxsurgeon.graph.shapes`: ShapeProp shapes from a meta-device twin.
"""

from __future__ import annotations

from .edit import describe, parent_name, replace_module
from .index import called_modules, enclosing_called_module, functional_calls, module_aliases
from .mutation import alias_classes, mutated_inputs, reads_values
from .shapes import propagate_shapes

__all__ = [
    "alias_classes",
    "called_modules",
    "describe",
    "enclosing_called_module",
    "functional_calls",
    "module_aliases",
    "mutated_inputs",
    "parent_name",
    "propagate_shapes",
    "reads_values",
    "replace_module",
]
