"""Where each module of a traced graph is registered and used: names, call sites, parameter reads."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch.fx as fx
from torch import nn

from .ops import FUNCTIONAL_LAYERS

__all__ = ["called_modules", "enclosing_called_module", "functional_calls", "module_aliases"]


def module_aliases(root: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every module object, keyed by ``id``: a module registered twice has two.

    >>> relu = nn.ReLU()
    >>> net = nn.Sequential(relu, nn.Linear(2, 2), relu)
    >>> module_aliases(net)[id(relu)]
    ['0', '2']
    """
    names: dict[int, list[str]] = defaultdict(list)
    for name, mod in root.named_modules(remove_duplicate=False):
        if name not in names[id(mod)]:
            names[id(mod)].append(name)
    return dict(names)


def called_modules(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """``call_module`` targets of the graph and the nodes calling them.

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    >>> {t: [n.name for n in ns] for t, ns in called_modules(gm).items()}
    {'0': ['_0'], '1': ['_1']}
    """
    sites: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sites[str(node.target)].append(node)
    return dict(sites)


def enclosing_called_module(name: str, called: dict[str, list[fx.Node]]) -> str | None:
    """The graph-called (leaf) module that contains submodule ``name``, if any.

    >>> enclosing_called_module("stem.conv.weight_gen", {"stem.conv": []}), enclosing_called_module("fc", {})
    ('stem.conv', None)
    """
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in called:
            return prefix
    return None


def functional_calls(gm: fx.GraphModule, kind: str) -> Iterator[fx.Node]:
    """``call_function`` nodes of a functional op, e.g. ``kind="conv2d"`` finds ``F.conv2d`` / ``torch.conv2d``.

    >>> import torch.nn.functional as F
    >>> gm = fx.symbolic_trace(lambda x, w: F.relu(F.conv2d(x, w)))
    >>> [n.name for n in functional_calls(gm, "conv2d")]
    ['conv2d']
    """
    targets = FUNCTIONAL_LAYERS[kind]
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in targets:
            yield node
