"""Global pools the conv_head pass recognises: ``AdaptiveAvgPool2d(1)``, ``mean`` over H×W, full-window
``avg_pool2d``, timm's ``SelectAdaptivePool2d`` — and the reasons others (max pools, token heads) are left alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ...graph.ops import (
    ADAPTIVE_AVG_POOL_FUNCTIONS,
    AVG_POOL_FUNCTIONS,
    MAX_REDUCTION_METHODS,
)
from ..base import NOMINAL_SHAPES_KEY
from .nodes import (
    MAX_POOL_FUNCS,
    as_pair,
    data_inputs,
    describe_node,
    is_static,
    is_timm_module,
    module_of,
    node_arg,
    node_shape,
    static_value,
)

__all__ = ["Gap", "is_max_pool", "match_global_pool", "max_pool_reason", "token_reason"]


@dataclass
class Gap:
    """A global average pool found in the graph.

    Attributes:
        node: the node whose output is the pooled tensor.
        feature: the node producing the (N, C, H, W) map it pools.
        form: description for records, e.g. ``"AdaptiveAvgPool2d(1) 'global_pool.pool'"``.
        keep4d: True when the output is (N, C, 1, 1), False for (N, C).
        structural: True when the form alone proves it global (no shapes were needed).
    """

    node: fx.Node
    feature: fx.Node
    form: str
    keep4d: bool
    structural: bool


def max_pool_reason(desc: str) -> str:
    return (f"max pooling ({desc}): only global average pooling is converted — a max does not commute with "
            "the 1×1 conv, so there is no exact fully convolutional form")


def _avg_window_gap(node: fx.Node, feature: fx.Node, desc: str, kernel: Any, stride: Any, padding: Any,
                    divisor: Any, ceil_mode: Any) -> Gap | str:
    """An average pool with an explicit window: global when, by the shapes, the window is the whole map."""
    in_shape, out_shape = node_shape(feature), node_shape(node)
    owner = node.graph.owning_module
    nominal = owner is not None and owner.meta.get(NOMINAL_SHAPES_KEY)
    if in_shape is None or out_shape is None or nominal:
        # a window is the whole map only at the model's true H×W: a nominal-size probe cannot tell
        return (f"{desc}: average pool with an explicit window; shapes are needed (at the model's input size) "
                "to tell whether the window covers the whole map (pass example_inputs to convert())")
    k = as_pair(static_value(kernel))
    pad = as_pair(static_value(padding))
    if len(in_shape) != 4:
        return f"{desc} pools a {len(in_shape)}-D tensor {list(in_shape)}, not an (N, C, H, W) map"
    if k is None or k != tuple(in_shape[2:]) or pad != (0, 0) or divisor is not None \
            or tuple(out_shape) != (*in_shape[:2], 1, 1):
        return (f"{desc} with window {k}, padding {pad}"
                + (f", divisor_override={divisor}" if divisor is not None else "")
                + f" over a {in_shape[2]}×{in_shape[3]} map is not a global average pool")
    del stride, ceil_mode  # irrelevant once the window is the map and the output 1×1
    return Gap(node, feature, f"{desc} over the whole {in_shape[2]}×{in_shape[3]} map", True, False)


def _mean_dims(node: fx.Node) -> tuple[Any, bool, Any]:
    dims = node_arg(node, 1, "dim")
    keepdim = node_arg(node, 2, "keepdim", False)
    return dims, bool(keepdim), node.kwargs.get("dtype")


def _norm_dims(dims: Any, rank: int) -> set[int] | None:
    if dims is None:
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) and -rank <= d < rank for d in dims):
        return None
    return {d % rank for d in dims}


def _mean_gap(node: fx.Node, desc: str) -> Gap | str | None:
    """``x.mean((2, 3))`` and friends: a global pool when, by the shapes, they average exactly H and W."""
    dims, _, dtype = _mean_dims(node)
    src = node.args[0]
    in_shape, out_shape = node_shape(src), node_shape(node)
    if in_shape is None or out_shape is None:
        if isinstance(dims, (tuple, list)) and len(dims) == 2:
            return (f"{desc}: a mean over dims {tuple(dims)}; shapes are needed to tell whether these are the "
                    "spatial dims of an (N, C, H, W) map (pass example_inputs to convert())")
        return None
    if dtype is not None:
        return None
    rank = len(in_shape)
    reduced = _norm_dims(dims, rank)
    if reduced is None:
        return None
    feature = src
    if rank == 3 and len(reduced) == 1 and isinstance(src, fx.Node):
        inner = src
        inner_in = node_shape(inner.args[0]) if inner.args and isinstance(inner.args[0], fx.Node) else None
        if inner_in is not None and len(inner_in) == 4 and inner.op in ("call_method", "call_function") \
                and inner.target in ("mean", torch.mean):
            # x.mean(3).mean(2): map the outer dim back to the 4-D tensor
            i_dims, i_keep, i_dtype = _mean_dims(inner)
            i_red = _norm_dims(i_dims, 4)
            if i_red is None or i_dtype is not None or i_keep:
                return None
            kept = [d for d in range(4) if d not in i_red]
            reduced, feature, rank = i_red | {kept[next(iter(reduced))]}, inner.args[0], 4
            in_shape = inner_in
        elif inner_in is not None and len(inner_in) == 4 and reduced == {2} \
                and tuple(in_shape) == (*inner_in[:2], inner_in[2] * inner_in[3]) and (
                    (inner.op == "call_method" and inner.target in ("flatten", "view", "reshape"))
                    or (inner.op == "call_function" and inner.target in (torch.flatten, torch.reshape))):
            # x.flatten(2).mean(-1) / x.view(N, C, -1).mean(2)
            reduced, feature, rank, in_shape = {2, 3}, inner.args[0], 4, inner_in
        else:
            return None
    if rank != 4:
        return None
    if reduced != {2, 3}:
        if reduced == {1, 2}:
            return (f"{desc} averages dims 1 and 2 of a {list(in_shape)} tensor: a channels-last (NHWC) pool, "
                    "which this pass does not convert")
        return None
    if len(out_shape) == 4 and tuple(out_shape) == (*in_shape[:2], 1, 1):
        return Gap(node, feature, f"{desc} over the whole {in_shape[2]}×{in_shape[3]} map", True, False)
    if tuple(out_shape) == tuple(in_shape[:2]):
        return Gap(node, feature, f"{desc} over the whole {in_shape[2]}×{in_shape[3]} map", False, False)
    return None


def match_global_pool(gm: fx.GraphModule, node: fx.Node) -> Gap | str | None:
    """A :class:`Gap` when ``node`` is a global average pool of an (N, C, H, W) map.

    Returns a reason string when ``node`` is a pool that does not qualify (max pooling, a window smaller than
    the map, shapes missing to decide), and None when it is not a pool at all.
    """
    desc = describe_node(gm, node)
    ins = data_inputs(node)
    src = ins[0] if ins else None
    if node.op == "call_module":
        mod = module_of(gm, node)
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            size = as_pair(mod.output_size)
            if size != (1, 1):
                return f"{desc} with output size {mod.output_size} is not a global pool"
            shape = node_shape(src)
            if shape is not None and len(shape) != 4:
                return f"{desc} pools a {len(shape)}-D tensor {list(shape)}, not an (N, C, H, W) map"
            return Gap(node, src, f"AdaptiveAvgPool2d(1) '{node.target}'", True, True)
        if isinstance(mod, (nn.AdaptiveMaxPool2d, nn.MaxPool2d)):
            return max_pool_reason(desc)
        if isinstance(mod, nn.AvgPool2d):
            return _avg_window_gap(node, src, desc, mod.kernel_size, mod.stride, mod.padding,
                                   mod.divisor_override, mod.ceil_mode)
        if mod is not None and is_timm_module(mod, "SelectAdaptivePool2d"):
            kind = str(mod.pool_type).lower()
            if "max" in kind:
                return max_pool_reason(f"{desc}, pool_type='{mod.pool_type}'")
            if kind not in ("avg", "fast", "fastavg"):
                return None  # pool_type '' is a pass-through
            inner = getattr(mod, "pool", None)
            if getattr(inner, "dim", (2, 3)) not in ((2, 3), [2, 3]):
                return f"{desc} pools a channels-last (NHWC) map, which this pass does not convert"
            flat = isinstance(getattr(mod, "flatten", None), nn.Flatten) or bool(getattr(inner, "flatten", False))
            return Gap(node, src, f"SelectAdaptivePool2d(pool_type='{mod.pool_type}') '{node.target}'",
                       not flat, True)
        return None
    if node.op == "call_function":
        if node.target in ADAPTIVE_AVG_POOL_FUNCTIONS:
            size = as_pair(node_arg(node, 1, "output_size"))
            if size != (1, 1):
                return f"{desc} with output size {node_arg(node, 1, 'output_size')} is not a global pool"
            shape = node_shape(src)
            if shape is not None and len(shape) != 4:
                return f"{desc} pools a {len(shape)}-D tensor {list(shape)}, not an (N, C, H, W) map"
            return Gap(node, src, f"adaptive_avg_pool2d(x, 1) (node '{node.name}')", True, True)
        if node.target in AVG_POOL_FUNCTIONS:
            kernel = node_arg(node, 1, "kernel_size")
            return _avg_window_gap(node, src, f"avg_pool2d (node '{node.name}')", kernel, node_arg(node, 2, "stride"),
                                   node_arg(node, 3, "padding", 0), node_arg(node, 6, "divisor_override"),
                                   node_arg(node, 4, "ceil_mode", False))
        if node.target in MAX_POOL_FUNCS:
            if node.target in (torch.max, torch.amax) and node_arg(node, 1, "dim") is None:
                return None
            return max_pool_reason(desc)
        if node.target is torch.mean:
            return _mean_gap(node, f"torch.mean (node '{node.name}')")
        return None
    if node.op == "call_method":
        if node.target == "mean":
            return _mean_gap(node, f".mean() (node '{node.name}')")
        if node.target in MAX_REDUCTION_METHODS and node_arg(node, 1, "dim") is not None:
            shape = node_shape(src)
            if shape is None or len(shape) == 4:
                return max_pool_reason(desc)
    return None


def is_max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    r = match_global_pool(gm, node)
    return isinstance(r, str) and r.startswith("max pooling")


def token_reason(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why ``node`` marks a token/sequence head (ViT class token, Mixer token mean), or None."""
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    src_shape = node_shape(src) if src is not None else None
    if node.op == "call_function" and node.target is operator.getitem and src is not None:
        idx = node.args[1]
        if isinstance(idx, tuple) and len(idx) >= 2 and idx[0] == slice(None) and isinstance(idx[1], (int, slice)) \
                and not is_static(src) and ((src_shape is None and len(idx) == 2 and isinstance(idx[1], int))
                                              or (src_shape is not None and len(src_shape) == 3)):
            return (f"token/sequence head (ViT-style): the classifier reads tokens x[:, {_fmt_index(idx[1])}] of a "
                    f"(N, T, C) sequence at node '{node.name}', not a global average pool of a feature map")
    if (node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean):
        dims = node_arg(node, 1, "dim")
        if (src_shape is not None and len(src_shape) == 3 and _norm_dims(dims, 3) == {1}) \
                or (src_shape is None and dims in (1, (1,), [1])):
            return (f"token/sequence head (MLP-Mixer / ViT avg-pool style): the classifier reads the mean over "
                    f"the tokens (dim 1) of a (N, T, C) sequence at node '{node.name}', not a feature map")
    shape = node_shape(node)
    if shape is not None and len(shape) == 3 and shape[1] > 1 and shape[2] > 1:  # (N, C, 1) is a squeeze on the way
        return (f"token/sequence head: the classifier's input comes from a {list(shape)} (N, T, C) sequence "
                f"at {describe_node(gm, node)}, not from a global average pool of a feature map")
    return None


def _fmt_index(i: Any) -> str:
    if isinstance(i, slice):
        return f"{'' if i.start is None else i.start}:{'' if i.stop is None else i.stop}"
    return str(i)
