"""Small helpers over fx graphs and module trees, shared by the passes."""

from __future__ import annotations

import copy
import inspect
import operator
from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

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


# ------------------------------------------------------------------------------- in-place ops and aliasing

_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift}
# outputs that never share memory with an input (anything not listed is assumed to possibly be a view)
_FRESH_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
                operator.matmul, operator.neg, operator.mod, torch.add, torch.sub, torch.mul, torch.div, torch.cat,
                torch.stack, torch.sum, torch.mean, torch.matmul, torch.bmm, F.linear, F.conv1d, F.conv2d,
                F.conv3d, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.softmax, F.layer_norm,
                F.batch_norm, F.group_norm, torch.sigmoid, torch.tanh, torch.relu, F.relu, F.gelu, F.silu,
                F.hardswish, F.sigmoid, F.tanh, F.relu6, F.leaky_relu, F.elu, F.mish, F.hardsigmoid}
_FRESH_METHODS = {"add", "sub", "mul", "div", "matmul", "sum", "mean", "amax", "softmax", "sigmoid", "tanh",
                  "relu", "exp", "log", "pow", "clone", "neg", "abs", "sqrt", "norm"}
_FRESH_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
                  nn.GroupNorm, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d, nn.AvgPool2d, nn.MaxPool2d,
                  nn.AdaptiveMaxPool2d)
_METADATA_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "stride", "is_contiguous", "get_device"}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}


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
        if first is not None and (fn in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("__"))
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
        return node.target in _FRESH_FUNCS
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    if node.op == "call_module":
        try:
            mod = gm.get_submodule(str(node.target))
        except AttributeError:
            return False
        return isinstance(mod, _FRESH_MODULES)
    return False


def alias_classes(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Node → representative of the nodes whose tensors may share memory with it (views, in-place results,
    ops returning their input); conservative: an operation not known to allocate is assumed to alias."""
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
    """False for operations that read only a tensor's metadata (``x.size(0)``, ``x.shape``), True otherwise."""
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return False
    return not (node.op == "call_function" and node.target is getattr and len(node.args) > 1
                and node.args[1] in _METADATA_ATTRS)
