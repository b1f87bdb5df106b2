"""Small helpers over fx graphs and module trees, shared by the passes."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = [
    "called_modules",
    "describe",
    "enclosing_called_module",
    "functional_calls",
    "module_aliases",
    "parent_name",
    "propagate_shapes",
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


def _meta_twin(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose parameters and buffers live on the meta device: no data is copied."""
    memo: dict[int, object] = {}
    for t in (*gm.parameters(), *gm.buffers()):
        twin = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else twin
    return copy.deepcopy(gm, memo)


def propagate_shapes(gm: fx.GraphModule, *inputs: object) -> str:
    """Fill ``node.meta["tensor_meta"]`` (ShapeProp) for ``inputs``; returns ``"meta"`` or ``"real"``.

    Shapes need no arithmetic: ShapeProp first runs on a twin of the model whose weights are on the meta
    device (no compute, no copy of the weights — a ResNet-50 at 224 takes a fraction of a real forward on a
    CPU) and the shapes are copied back node by node. Ops the meta device cannot run fall back to a real
    forward under ``no_grad``. The caller sets eval mode when it matters (BatchNorm in train mode would update
    its statistics on the real path).
    """
    def channels_last(t: torch.Tensor) -> bool:
        return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)

    # meta kernels do not carry channels_last through every op, and memory format is part of the shapes
    # (latency-aware timing reads it): such models take the real path
    real = any(isinstance(x, torch.Tensor) and channels_last(x) for x in inputs) or any(
        channels_last(p) for p in gm.parameters()
    )
    try:
        if real:
            raise RuntimeError("channels_last model or inputs")
        twin = _meta_twin(gm)
        meta_inputs = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs]
        ShapeProp(twin).propagate(*meta_inputs)
        metas = [n.meta.get("tensor_meta") for n in twin.graph.nodes]
        if len(metas) != len(gm.graph.nodes):
            raise RuntimeError("graph changed while copying")
        for node, tm in zip(gm.graph.nodes, metas):
            if tm is None:
                node.meta.pop("tensor_meta", None)
            else:
                node.meta["tensor_meta"] = tm
        return "meta"
    except Exception:  # data-dependent ops, kernels without meta support: measure for real
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
        return "real"
