"""Node helpers of the conv_head pass: static values, shapes, owners and the kinds of operation between a
global pool and its classifier.
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from ...graph.ops import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_MODULES,
    INPLACE_ACTIVATION_FUNCTIONS,
    MAX_POOL_FUNCTIONS,
    MAX_POOL_WITH_INDICES_FUNCTIONS,
    MAX_REDUCTION_FUNCTIONS,
    PARAMETRIC_ACTIVATION_MODULES,
    SIZE_ARITHMETIC_OPERATORS,
    SIZE_ATTRS,
    SIZE_METHODS,
)

__all__ = [
    "DROPOUT", "ELEMENTWISE", "ELEMENTWISE_FUNCS", "ELEMENTWISE_MODULES", "FC_KINDS", "IDENTITY", "LINEAR",
    "MAX_HEAD_DEPTH", "MAX_POOL_FUNCS", "OTHER", "POINTWISE", "SHAPE", "as_pair", "data_inputs", "describe_node",
    "is_batch_size", "is_static", "is_timm_module", "module_of", "node_arg", "node_shape", "static_value",
]


#: how many operations the search walks back from a classifier looking for its global pool
MAX_HEAD_DEPTH = 48


# the pool forms and the operations between pool and classifier, from the one op taxonomy (fxsurgeon.graph.ops)
MAX_POOL_FUNCS = MAX_POOL_FUNCTIONS | MAX_POOL_WITH_INDICES_FUNCTIONS | MAX_REDUCTION_FUNCTIONS


ELEMENTWISE_MODULES = (*ACTIVATION_MODULES, *PARAMETRIC_ACTIVATION_MODULES)  # matched by exact type


ELEMENTWISE_FUNCS = ACTIVATION_FUNCTIONS | INPLACE_ACTIVATION_FUNCTIONS


# kinds of operation on the way from a pool to its classifier
IDENTITY, DROPOUT, SHAPE, ELEMENTWISE, LINEAR, POINTWISE, OTHER = (
    "identity", "dropout", "shape", "elementwise", "linear", "pointwise conv", "other")


FC_KINDS = {IDENTITY, DROPOUT, SHAPE, LINEAR, POINTWISE}  # linear per position: may move before the pool


def node_shape(node: Any) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if isinstance(tm, TensorMetadata) else None


def is_static(node: fx.Node) -> bool:
    """True for nodes computing Python ints from shapes (``x.size(0)``, ``x.shape[2:]``), not tensors."""
    if node.op == "call_method" and node.target in SIZE_METHODS:
        return True
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1 and node.args[1] in SIZE_ATTRS:
            return True
        if node.target in SIZE_ARITHMETIC_OPERATORS:
            ins = node.all_input_nodes
            return bool(ins) and all(is_static(i) for i in ins)
    return False


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensor inputs of ``node``: its node arguments less parameters (get_attr) and shape arithmetic."""
    return [a for a in node.all_input_nodes if a.op != "get_attr" and not is_static(a)]


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(str(node.target))
    except AttributeError:
        return None


def is_timm_module(module: nn.Module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith("timm.")


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def as_pair(v: Any) -> tuple | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return tuple(v)
    if isinstance(v, (tuple, list)) and len(v) == 1:
        return (v[0], v[0])
    return None


_UNKNOWN = object()


def static_value(arg: Any) -> Any:
    """Value of a shape expression (``x.size(3)``, ``x.shape[2:]``) from ShapeProp shapes, else ``_UNKNOWN``."""
    if isinstance(arg, (tuple, list)):
        vals = [static_value(a) for a in arg]
        return _UNKNOWN if any(v is _UNKNOWN for v in vals) else type(arg)(vals)
    if not isinstance(arg, fx.Node):
        return arg
    if arg.op == "call_method" and arg.target == "size":
        shape = node_shape(arg.args[0])
        dim = node_arg(arg, 1, "dim")
        if shape is None:
            return _UNKNOWN
        return shape if dim is None else shape[dim]
    if arg.op == "call_function" and arg.target is getattr and arg.args[1] == "shape":
        shape = node_shape(arg.args[0])
        return _UNKNOWN if shape is None else shape
    if arg.op == "call_function" and arg.target is operator.getitem:
        base, idx = static_value(arg.args[0]), static_value(arg.args[1])
        return _UNKNOWN if base is _UNKNOWN or idx is _UNKNOWN else base[idx]
    return _UNKNOWN


def is_batch_size(arg: Any) -> bool:
    """``x.size(0)`` / ``x.shape[0]``: the batch size, whatever the shapes."""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_method" and arg.target == "size":
        return node_arg(arg, 1, "dim") == 0
    if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0:
        src = arg.args[0]
        return isinstance(src, fx.Node) and (
            (src.op == "call_method" and src.target == "size" and node_arg(src, 1, "dim") is None)
            or (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
        )
    return False


def _owner_of_params(node: fx.Node) -> str | None:
    for a in node.all_input_nodes:
        if a.op == "get_attr" and "." in str(a.target):
            return str(a.target).rsplit(".", 1)[0]
    return None


def describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    """Short description of a node for records: ``LayerNorm 'head.norm'``, ``layer_norm ('norm')``."""
    mod = module_of(gm, node)
    if mod is not None:
        return f"{type(mod).__name__} '{node.target}'"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        owner = _owner_of_params(node)
        return f"{name} ('{owner}')" if owner else f"{name} (node '{node.name}')"
    if node.op == "call_method":
        return f".{node.target}() (node '{node.name}')"
    if node.op == "placeholder":
        return f"model input '{node.target}'"
    return f"{node.op} '{node.name}'"
