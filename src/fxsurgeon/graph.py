"""Small helpers over fx graphs and module trees, shared by the passes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "called_modules",
    "describe",
    "enclosing_called_module",
    "functional_calls",
    "module_aliases",
    "parent_name",
    "replace_module",
]


def parent_name(target: str) -> tuple[str, str]:
    """``"a.b.c"`` → ``("a.b", "c")``; ``"c"`` → ``("", "c")``."""
    *parent, name = target.rsplit(".", 1)
    return (parent[0] if parent else ""), name


def replace_module(root: nn.Module, target: str, new: nn.Module) -> None:
    """Put ``new`` at qualified name ``target`` in ``root`` (works inside leaf modules too)."""
    parent, name = parent_name(target)
    setattr(root.get_submodule(parent) if parent else root, name, new)


def module_aliases(root: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every module object, keyed by ``id``: a module registered twice has two."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, mod in root.named_modules(remove_duplicate=False):
        if name not in names[id(mod)]:
            names[id(mod)].append(name)
    return dict(names)


def called_modules(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """``call_module`` targets of the graph and the nodes calling them."""
    sites: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sites[str(node.target)].append(node)
    return dict(sites)


def enclosing_called_module(name: str, called: dict[str, list[fx.Node]]) -> str | None:
    """The graph-called (leaf) module that contains submodule ``name``, if any."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in called:
            return prefix
    return None


_FUNCTIONAL = {
    "conv1d": (F.conv1d,),
    "conv2d": (F.conv2d,),
    "conv3d": (F.conv3d,),
    "linear": (F.linear,),
}


def functional_calls(gm: fx.GraphModule, kind: str) -> Iterator[fx.Node]:
    """``call_function`` nodes of a functional op, e.g. ``kind="conv2d"`` finds ``F.conv2d`` / ``torch.conv2d``."""
    import torch

    targets = set(_FUNCTIONAL[kind]) | {getattr(torch, kind, None)}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in targets:
            yield node


def describe(module: nn.Module) -> str:
    """Short, stable description of a layer for records: ``"Conv2d(64→128, 3x3, s2)"``."""
    if isinstance(module, nn.modules.conv._ConvNd):
        k = "x".join(str(v) for v in module.kernel_size)
        extras = []
        if any(s != 1 for s in module.stride):
            extras.append("s" + "x".join(map(str, module.stride)) if len(set(module.stride)) > 1 else f"s{module.stride[0]}")
        if module.groups != 1:
            extras.append(f"g{module.groups}")
        if any(d != 1 for d in module.dilation):
            extras.append(f"d{module.dilation[0]}")
        tail = (", " + ", ".join(extras)) if extras else ""
        return f"{type(module).__name__}({module.in_channels}→{module.out_channels}, {k}{tail})"
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}→{module.out_features})"
    if isinstance(module, nn.Sequential):
        return " → ".join(describe(m) for m in module)
    return type(module).__name__
