"""In-place writes and memory aliasing between the nodes of a traced graph."""

from __future__ import annotations

import inspect

import torch.fx as fx
from torch import nn

from .ops import (
    FRESH_FUNCTIONS,
    FRESH_METHODS,
    FRESH_MODULES,
    INPLACE_OPERATORS,
    METADATA_ATTRS,
    METADATA_METHODS,
)

__all__ = ["alias_classes", "mutated_inputs", "reads_values"]


def _inplace_flag(fn: object, node: fx.Node) -> bool:
    """``inplace=True`` given to ``fn`` by keyword or position (``F.relu(x, True)``)."""
    if node.kwargs.get("inplace") is True:
        return True
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    if "inplace" in params:
        i = params.index("inplace")
        return len(node.args) > i and node.args[i] is True
    return False


def mutated_inputs(gm: nn.Module, node: fx.Node) -> list[fx.Node]:
    """The input nodes whose tensors ``node`` writes in place: ``x.mul_(2)``, ``F.relu(x, inplace=True)``,
    ``nn.ReLU(inplace=True)(x)``, ``x += y``, ``x[i] = v``, ``torch.add(a, b, out=c)``; empty for a pure op.

    >>> import torch.fx as fx, torch.nn.functional as F
    >>> gm = fx.symbolic_trace(lambda x: F.relu(x, inplace=True) + x.mul_(2))
    >>> [(n.name, [i.name for i in mutated_inputs(gm, n)]) for n in gm.graph.nodes if mutated_inputs(gm, n)]
    [('relu', ['x']), ('mul_', ['x'])]
    """
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    out: list[fx.Node] = []
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and not name.startswith("__") and first is not None:
            out.append(first)
    elif node.op == "call_function":
        fn = node.target
        name = getattr(fn, "__name__", "")
        if first is not None and (fn in INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("__"))
                                  or _inplace_flag(fn, node)):
            out.append(first)
    elif node.op == "call_module":
        try:
            mod = gm.get_submodule(str(node.target))
        except AttributeError:
            mod = None
        if getattr(mod, "inplace", False) is True and first is not None:
            out.append(first)
    written = node.kwargs.get("out")
    for t in written if isinstance(written, (tuple, list)) else (written,):
        if isinstance(t, fx.Node):
            out.append(t)
    return out


def _fresh(gm: nn.Module, node: fx.Node) -> bool:
    """Whether ``node``'s output is certainly new memory, not a view or the same tensor as an input."""
    if node.op in ("placeholder", "get_attr"):
        return True
    if mutated_inputs(gm, node):  # an in-place op returns the tensor it wrote
        return False
    if node.op == "call_function":
        return node.target in FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in FRESH_METHODS
    if node.op == "call_module":
        try:
            mod = gm.get_submodule(str(node.target))
        except AttributeError:
            return False
        return isinstance(mod, FRESH_MODULES)
    return False


def alias_classes(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Node → representative of the nodes whose tensors may share memory with it (views, in-place results,
    ops returning their input); conservative: an operation not known to allocate is assumed to alias.

    >>> import torch.fx as fx
    >>> gm = fx.symbolic_trace(lambda x: (x.view(-1), x + 1))
    >>> x, view, add = [n for n in gm.graph.nodes if n.op != "output"]
    >>> classes = alias_classes(gm)
    >>> classes[x] is classes[view], classes[x] is classes[add]
    (True, False)
    """
    parent: dict[fx.Node, fx.Node] = {n: n for n in gm.graph.nodes}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in gm.graph.nodes:
        if n.op == "output" or _fresh(gm, n):
            continue
        for i in n.all_input_nodes:
            parent[find(i)] = find(n)
    return {n: find(n) for n in gm.graph.nodes}


def reads_values(node: fx.Node) -> bool:
    """False for operations that read only a tensor's metadata (``x.size(0)``, ``x.shape``), True otherwise.

    >>> import torch.fx as fx
    >>> gm = fx.symbolic_trace(lambda x: x.size(0) + x.shape[1] + x.sum())
    >>> [(n.name, reads_values(n)) for n in gm.graph.nodes if n.op in ("call_method", "call_function")][:3]
    [('size', False), ('getattr_1', False), ('getitem', True)]
    """
    if node.op == "call_method" and node.target in METADATA_METHODS:
        return False
    return not (node.op == "call_function" and node.target is getattr and len(node.args) > 1
                and node.args[1] in METADATA_ATTRS)
