"""Conv head pass: Linear classifier on globally average-pooled features → 1×1 conv (exact).

Matches the model's classifier — the ``nn.Linear`` (or timm's traced-through ``F.linear``) whose output
reaches the graph output with no other parametric layer after it — when its input comes from a global
average pool of an (N, C, H, W) map, in every form models write that pool: ``nn.AdaptiveAvgPool2d(1)``,
``F.adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3))`` / ``x.mean([-2, -1])`` with or without ``keepdim`` (also
``x.mean(3).mean(2)`` and ``x.flatten(2).mean(-1)``), any average pool whose window is the whole map
(``F.avg_pool2d(x, x.size(3))``, ``nn.AvgPool2d(7)`` on a 7×7 map; checked with ShapeProp shapes), timm's
``SelectAdaptivePool2d`` (avg / fast, flattening or not) and ``ClassifierHead`` whether traced through or
kept as leaf modules; then flatten / view / reshape / squeeze, dropout, activations and further Linears.

Emits ``Conv2d(C, K, 1)`` at the Linear's qualified name (weight reshaped to (K, C, 1, 1), same bias) applied
to the (N, C, 1, 1) pooled tensor, then ``flatten(1)``: the same (N, K) output, exactly. Norms, activations
and 1×1 convs between pool and Linear (timm ``NormMlpClassifierHead``, ConvNeXt, MobileNetV3) stay; Linears
between pool and classifier (MLP heads) become 1×1 convs too. With ``fully_convolutional=True`` the convs
move before the pool, where only linear per-position operations lie between (exact by linearity); the model
then takes any input size and :func:`fxsurgeon.class_map` returns the dense class-score map.

Token/sequence heads (ViT, MLP-Mixer), max pooling, several classifier heads combined (distillation), and
Linears not fed by a spatial average pool are skipped with the reason. Shapes come from ShapeProp when
``convert()`` had ``example_inputs``; without them they are derived from a timm model's
``pretrained_cfg["input_size"]``, and otherwise only the unambiguous forms are matched structurally.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..graph import alias_classes, describe, mutated_inputs, propagate_shapes, reads_values, replace_module
from ..graph.index import ModuleIndex, SwapWording, swap_refusal
from ..graph.ops import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    ADAPTIVE_AVG_POOL_FUNCTIONS,
    AVG_POOL_FUNCTIONS,
    DROPOUT_FUNCTIONS,
    IDENTITY_METHODS,
    INPLACE_ACTIVATION_FUNCTIONS,
    MAX_POOL_FUNCTIONS,
    MAX_POOL_WITH_INDICES_FUNCTIONS,
    MAX_REDUCTION_FUNCTIONS,
    MAX_REDUCTION_METHODS,
    PARAMETRIC_ACTIVATION_MODULES,
    RESHAPE_FUNCTIONS,
    RESHAPE_METHODS,
    SIZE_ARITHMETIC_OPERATORS,
    SIZE_ATTRS,
    SIZE_METHODS,
)
from ..heads import adopt_head_api, conv1x1_from_linear_params, linear_refusal, linear_to_conv1x1
from ..modes import eval_modes
from .base import NOMINAL_SHAPES_KEY, PassResult, Rewrite, Skip
from .options import PassOptions
from .registry import register_pass

__all__ = ["ConvHeadOptions", "Gap", "HeadMatch", "conv_head", "find_heads", "match_global_pool"]


#: how many operations the search walks back from a classifier looking for its global pool
_MAX_HEAD_DEPTH = 48

# the pool forms and the operations between pool and classifier, from the one op taxonomy (fxsurgeon.graph.ops)
_MAX_POOL_FUNCS = MAX_POOL_FUNCTIONS | MAX_POOL_WITH_INDICES_FUNCTIONS | MAX_REDUCTION_FUNCTIONS
_ELEMENTWISE_MODULES = (*ACTIVATION_MODULES, *PARAMETRIC_ACTIVATION_MODULES)  # matched by exact type
_ELEMENTWISE_FUNCS = ACTIVATION_FUNCTIONS | INPLACE_ACTIVATION_FUNCTIONS

# kinds of operation on the way from a pool to its classifier
IDENTITY, DROPOUT, SHAPE, ELEMENTWISE, LINEAR, POINTWISE, OTHER = (
    "identity", "dropout", "shape", "elementwise", "linear", "pointwise conv", "other")
_FC_KINDS = {IDENTITY, DROPOUT, SHAPE, LINEAR, POINTWISE}  # linear per position: may move before the pool


# ------------------------------------------------------------------------------------------- node helpers


def _shape(node: Any) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if isinstance(tm, TensorMetadata) else None


def _is_static(node: fx.Node) -> bool:
    """True for nodes computing Python ints from shapes (``x.size(0)``, ``x.shape[2:]``), not tensors."""
    if node.op == "call_method" and node.target in SIZE_METHODS:
        return True
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1 and node.args[1] in SIZE_ATTRS:
            return True
        if node.target in SIZE_ARITHMETIC_OPERATORS:
            ins = node.all_input_nodes
            return bool(ins) and all(_is_static(i) for i in ins)
    return False


def _data_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensor inputs of ``node``: its node arguments less parameters (get_attr) and shape arithmetic."""
    return [a for a in node.all_input_nodes if a.op != "get_attr" and not _is_static(a)]


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(str(node.target))
    except AttributeError:
        return None


def _is_timm(module: nn.Module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith("timm.")


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pair(v: Any) -> tuple | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return tuple(v)
    if isinstance(v, (tuple, list)) and len(v) == 1:
        return (v[0], v[0])
    return None


_UNKNOWN = object()


def _static_value(arg: Any) -> Any:
    """Value of a shape expression (``x.size(3)``, ``x.shape[2:]``) from ShapeProp shapes, else ``_UNKNOWN``."""
    if isinstance(arg, (tuple, list)):
        vals = [_static_value(a) for a in arg]
        return _UNKNOWN if any(v is _UNKNOWN for v in vals) else type(arg)(vals)
    if not isinstance(arg, fx.Node):
        return arg
    if arg.op == "call_method" and arg.target == "size":
        shape = _shape(arg.args[0])
        dim = _arg(arg, 1, "dim")
        if shape is None:
            return _UNKNOWN
        return shape if dim is None else shape[dim]
    if arg.op == "call_function" and arg.target is getattr and arg.args[1] == "shape":
        shape = _shape(arg.args[0])
        return _UNKNOWN if shape is None else shape
    if arg.op == "call_function" and arg.target is operator.getitem:
        base, idx = _static_value(arg.args[0]), _static_value(arg.args[1])
        return _UNKNOWN if base is _UNKNOWN or idx is _UNKNOWN else base[idx]
    return _UNKNOWN


def _is_batch_size(arg: Any) -> bool:
    """``x.size(0)`` / ``x.shape[0]``: the batch size, whatever the shapes."""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_method" and arg.target == "size":
        return _arg(arg, 1, "dim") == 0
    if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0:
        src = arg.args[0]
        return isinstance(src, fx.Node) and (
            (src.op == "call_method" and src.target == "size" and _arg(src, 1, "dim") is None)
            or (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
        )
    return False


def _owner_of_params(node: fx.Node) -> str | None:
    for a in node.all_input_nodes:
        if a.op == "get_attr" and "." in str(a.target):
            return str(a.target).rsplit(".", 1)[0]
    return None


def _desc(gm: fx.GraphModule, node: fx.Node) -> str:
    """Short description of a node for records: ``LayerNorm 'head.norm'``, ``layer_norm ('norm')``."""
    mod = _module(gm, node)
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


# ------------------------------------------------------------------------------------------ global pools


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


def _max_reason(desc: str) -> str:
    return (f"max pooling ({desc}): only global average pooling is converted — a max does not commute with "
            "the 1×1 conv, so there is no exact fully convolutional form")


def _avg_window_gap(node: fx.Node, feature: fx.Node, desc: str, kernel: Any, stride: Any, padding: Any,
                    divisor: Any, ceil_mode: Any) -> Gap | str:
    """An average pool with an explicit window: global when, by the shapes, the window is the whole map."""
    in_shape, out_shape = _shape(feature), _shape(node)
    owner = node.graph.owning_module
    nominal = owner is not None and owner.meta.get(NOMINAL_SHAPES_KEY)
    if in_shape is None or out_shape is None or nominal:
        # a window is the whole map only at the model's true H×W: a nominal-size probe cannot tell
        return (f"{desc}: average pool with an explicit window; shapes are needed (at the model's input size) "
                "to tell whether the window covers the whole map (pass example_inputs to convert())")
    k = _pair(_static_value(kernel))
    pad = _pair(_static_value(padding))
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
    dims = _arg(node, 1, "dim")
    keepdim = _arg(node, 2, "keepdim", False)
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
    in_shape, out_shape = _shape(src), _shape(node)
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
        inner_in = _shape(inner.args[0]) if inner.args and isinstance(inner.args[0], fx.Node) else None
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
    desc = _desc(gm, node)
    ins = _data_inputs(node)
    src = ins[0] if ins else None
    if node.op == "call_module":
        mod = _module(gm, node)
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            size = _pair(mod.output_size)
            if size != (1, 1):
                return f"{desc} with output size {mod.output_size} is not a global pool"
            shape = _shape(src)
            if shape is not None and len(shape) != 4:
                return f"{desc} pools a {len(shape)}-D tensor {list(shape)}, not an (N, C, H, W) map"
            return Gap(node, src, f"AdaptiveAvgPool2d(1) '{node.target}'", True, True)
        if isinstance(mod, (nn.AdaptiveMaxPool2d, nn.MaxPool2d)):
            return _max_reason(desc)
        if isinstance(mod, nn.AvgPool2d):
            return _avg_window_gap(node, src, desc, mod.kernel_size, mod.stride, mod.padding,
                                   mod.divisor_override, mod.ceil_mode)
        if mod is not None and _is_timm(mod, "SelectAdaptivePool2d"):
            kind = str(mod.pool_type).lower()
            if "max" in kind:
                return _max_reason(f"{desc}, pool_type='{mod.pool_type}'")
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
            size = _pair(_arg(node, 1, "output_size"))
            if size != (1, 1):
                return f"{desc} with output size {_arg(node, 1, 'output_size')} is not a global pool"
            shape = _shape(src)
            if shape is not None and len(shape) != 4:
                return f"{desc} pools a {len(shape)}-D tensor {list(shape)}, not an (N, C, H, W) map"
            return Gap(node, src, f"adaptive_avg_pool2d(x, 1) (node '{node.name}')", True, True)
        if node.target in AVG_POOL_FUNCTIONS:
            kernel = _arg(node, 1, "kernel_size")
            return _avg_window_gap(node, src, f"avg_pool2d (node '{node.name}')", kernel, _arg(node, 2, "stride"),
                                   _arg(node, 3, "padding", 0), _arg(node, 6, "divisor_override"),
                                   _arg(node, 4, "ceil_mode", False))
        if node.target in _MAX_POOL_FUNCS:
            if node.target in (torch.max, torch.amax) and _arg(node, 1, "dim") is None:
                return None
            return _max_reason(desc)
        if node.target is torch.mean:
            return _mean_gap(node, f"torch.mean (node '{node.name}')")
        return None
    if node.op == "call_method":
        if node.target == "mean":
            return _mean_gap(node, f".mean() (node '{node.name}')")
        if node.target in MAX_REDUCTION_METHODS and _arg(node, 1, "dim") is not None:
            shape = _shape(src)
            if shape is None or len(shape) == 4:
                return _max_reason(desc)
    return None


def _is_max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    r = match_global_pool(gm, node)
    return isinstance(r, str) and r.startswith("max pooling")


def _token_reason(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why ``node`` marks a token/sequence head (ViT class token, Mixer token mean), or None."""
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    src_shape = _shape(src) if src is not None else None
    if node.op == "call_function" and node.target is operator.getitem and src is not None:
        idx = node.args[1]
        if isinstance(idx, tuple) and len(idx) >= 2 and idx[0] == slice(None) and isinstance(idx[1], (int, slice)) \
                and not _is_static(src) and ((src_shape is None and len(idx) == 2 and isinstance(idx[1], int))
                                              or (src_shape is not None and len(src_shape) == 3)):
            return (f"token/sequence head (ViT-style): the classifier reads tokens x[:, {_fmt_index(idx[1])}] of a "
                    f"(N, T, C) sequence at node '{node.name}', not a global average pool of a feature map")
    if (node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean):
        dims = _arg(node, 1, "dim")
        if (src_shape is not None and len(src_shape) == 3 and _norm_dims(dims, 3) == {1}) \
                or (src_shape is None and dims in (1, (1,), [1])):
            return (f"token/sequence head (MLP-Mixer / ViT avg-pool style): the classifier reads the mean over "
                    f"the tokens (dim 1) of a (N, T, C) sequence at node '{node.name}', not a feature map")
    shape = _shape(node)
    if shape is not None and len(shape) == 3 and shape[1] > 1 and shape[2] > 1:  # (N, C, 1) is a squeeze on the way
        return (f"token/sequence head: the classifier's input comes from a {list(shape)} (N, T, C) sequence "
                f"at {_desc(gm, node)}, not from a global average pool of a feature map")
    return None


def _fmt_index(i: Any) -> str:
    if isinstance(i, slice):
        return f"{'' if i.start is None else i.start}:{'' if i.stop is None else i.stop}"
    return str(i)


# ----------------------------------------------------------------------------------------- classification


def _linear_module_name(gm: fx.GraphModule, node: fx.Node) -> tuple[str | None, str | None]:
    """(qualified name of the nn.Linear computed by ``node``, None) or (None, why it is not one we can swap).

    ``(None, None)`` means ``node`` is not a Linear at all.
    """
    if node.op == "call_module":
        mod = _module(gm, node)
        return (str(node.target), None) if isinstance(mod, nn.Linear) else (None, None)
    if node.op == "call_function" and node.target is F.linear:
        weight, bias = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and str(weight.target).endswith("weight")):
            return None, f"F.linear at node '{node.name}' computes its weight: only nn.Linear layers are swapped"
        owner = str(weight.target).rpartition(".")[0]
        if not owner or str(weight.target) != f"{owner}.weight":
            return None, f"F.linear at node '{node.name}' reads weight '{weight.target}', not a layer's weight"
        mod = gm.get_submodule(owner)
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"
                                     and str(bias.target) == f"{owner}.bias"):
            return None, f"F.linear at node '{node.name}' adds a bias that is not '{owner}.bias'"
        if not isinstance(mod, nn.Linear):
            # a layer fx traced through (timm's Linear): the graph module keeps a bare container of its tensors
            extra = [k for k, _ in mod.named_parameters() if k not in ("weight", "bias")]
            extra += [k for k, _ in mod.named_buffers()] + [k for k, _ in mod.named_children()]
            if extra:
                return None, f"'{owner}' holds more than a linear layer's weight and bias ({', '.join(extra[:3])})"
            if (bias is None) != (getattr(mod, "bias", None) is None):
                return None, f"F.linear at node '{node.name}' does not use '{owner}.bias'"
        elif (bias is None) != (mod.bias is None):
            return None, f"F.linear at node '{node.name}' does not use '{owner}.bias'"
        return owner, None
    return None, None


def _linear_desc(mod: nn.Module) -> str:
    if isinstance(mod, nn.Linear):
        return describe(mod)
    k, c = mod.weight.shape
    return f"Linear({c}→{k})"


# the head is swapped at the classifier's one name, and a conv takes other inputs than the Linear did
_HEAD_WORDING = SwapWording(
    aliases="registered under several names ({names}): swapping it would untie them",
    call_sites="called at {sites} places in the graph: a conv would not fit the other calls",
    read="its parameters are also read directly by graph node(s) {nodes}",
    read_elsewhere="'{target}' is read elsewhere in the graph (weights tied or reused)",
    also_called="'{name}' is also called as a module in the graph",
    tied="weights tied with {owners}: swapping it would untie them",
)


def _linear_refusal(ctx: ModuleIndex, node: fx.Node, name: str) -> str | None:
    """Why the Linear computed by ``node`` (module ``name``) cannot be swapped for a conv, or None."""
    mod = ctx.gm.get_submodule(name)  # not the index's: a module swapped since has no refusal of its own
    why = linear_refusal(mod) if isinstance(mod, nn.Linear) else None
    if why:
        return why
    return swap_refusal(ctx, name, mod, node=node, single_name=True, single_call=True, wording=_HEAD_WORDING)


def _kind(ctx: ModuleIndex, node: fx.Node) -> str:
    """What an operation between a pool and a classifier does to the (N, C[, 1, 1]) tensor."""
    if node.op == "call_module":
        mod = _module(ctx.gm, node)
        if isinstance(mod, nn.Identity):
            return IDENTITY
        if type(mod) is nn.Dropout:
            return DROPOUT
        if isinstance(mod, nn.Flatten):
            return SHAPE
        if type(mod) in _ELEMENTWISE_MODULES:  # exact types: a subclass may compute something else
            return ELEMENTWISE
        if isinstance(mod, nn.Linear):
            name, _ = _linear_module_name(ctx.gm, node)
            return LINEAR if name and not _linear_refusal(ctx, node, name) and len(node.users) == 1 else OTHER
        if type(mod) is nn.Conv2d and mod.kernel_size == (1, 1) and mod.stride == (1, 1) \
                and mod.padding in ((0, 0), "valid") and mod.dilation == (1, 1):
            return POINTWISE
        return OTHER
    if node.op == "call_function":
        if node.target in DROPOUT_FUNCTIONS:
            return DROPOUT
        if node.target in _ELEMENTWISE_FUNCS:
            return ELEMENTWISE
        if node.target in RESHAPE_FUNCTIONS:
            return SHAPE
        if node.target is operator.getitem and node.args[1] == (slice(None), slice(None), 0, 0):
            return SHAPE
        if node.target is F.linear:
            name, _ = _linear_module_name(ctx.gm, node)
            return LINEAR if name and not _linear_refusal(ctx, node, name) and len(node.users) == 1 else OTHER
        return OTHER
    if node.op == "call_method":
        if node.target in RESHAPE_METHODS:
            return SHAPE
        if node.target in ACTIVATION_METHODS:
            return ELEMENTWISE
        if node.target in IDENTITY_METHODS:
            return IDENTITY
    return OTHER


def _unambiguous_flatten(ctx: ModuleIndex, node: fx.Node) -> bool:
    """Without shapes: an op that maps (N, C, 1, 1) to (N, C) whatever N and C are."""
    if node.op == "call_module":
        mod = _module(ctx.gm, node)
        return isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        return _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = node.args[1:] if len(node.args) > 2 else (node.args[1] if len(node.args) == 2 else ())
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        return len(shape) == 2 and _is_batch_size(shape[0]) and shape[1] == -1
    if node.op == "call_function" and node.target is torch.reshape:
        shape = _arg(node, 1, "shape")
        return isinstance(shape, (tuple, list)) and len(shape) == 2 and _is_batch_size(shape[0]) and shape[1] == -1
    return False


def _is_bare_squeeze(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target == "squeeze") or (
        node.op == "call_function" and node.target is torch.squeeze)) and len(node.args) == 1 and not node.kwargs


# --------------------------------------------------------------------------------------------- matching


@dataclass
class HeadMatch:
    """A classifier Linear and the global average pool feeding it.

    Attributes:
        linear: the node computing the classifier (``call_module`` Linear or ``F.linear``).
        name: the Linear module's qualified name.
        gap: the pool.
        chain: the nodes strictly between pool and classifier, in graph order.
    """

    linear: fx.Node
    name: str
    gap: Gap
    chain: list[fx.Node] = field(default_factory=list)


def _is_parametric(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        mod = _module(gm, node)
        return mod is not None and (any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()))
    if node.op == "get_attr":
        return True
    return any(a.op == "get_attr" for a in node.all_input_nodes)


def _output_frontier(gm: fx.GraphModule) -> list[fx.Node]:
    """The parametric nodes nearest the output: walking back from it, the first layer with weights on each path."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    seen: set[fx.Node] = set()
    frontier: list[fx.Node] = []
    stack = list(output.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _is_parametric(gm, n):
            frontier.append(n)
        else:
            stack.extend(n.all_input_nodes)
    return sorted(frontier, key=order.__getitem__)


def _walk_to_pool(ctx: ModuleIndex, linear: fx.Node) -> tuple[Gap | None, list[fx.Node], str | None]:
    """From the classifier back to its global average pool: (pool, nodes between in graph order, None) or a reason."""
    gm = ctx.gm
    chain: list[fx.Node] = []
    ins = _data_inputs(linear)
    if len(ins) != 1:
        return None, [], f"the classifier at node '{linear.name}' takes {len(ins)} tensor inputs"
    cur = ins[0]
    for _ in range(_MAX_HEAD_DEPTH):
        gap = match_global_pool(gm, cur)
        if isinstance(gap, Gap):
            if gap.feature is None:
                return None, chain[::-1], f"{gap.form} has no tensor input"
            return gap, chain[::-1], None
        if isinstance(gap, str):
            return None, chain[::-1], gap
        token = _token_reason(gm, cur)
        if token:
            return None, chain[::-1], token
        if cur.op == "placeholder":
            return None, chain[::-1], f"fed by the {_desc(gm, cur)}, not by a global average pool of a feature map"
        ins = _data_inputs(cur)
        in_shape, out_shape = (_shape(ins[0]) if len(ins) == 1 else None), _shape(cur)
        if _kind(ctx, cur) == SHAPE and in_shape is not None and out_shape is not None and len(in_shape) == 4 \
                and len(out_shape) == 2 and in_shape[2] * in_shape[3] > 1:
            pool = match_global_pool(gm, ins[0])
            if isinstance(pool, str):  # a pool that is not global (VGG's AdaptiveAvgPool2d((7, 7))): say that
                return None, chain[::-1], pool
            return None, chain[::-1], (
                f"the classifier reads a flattened {list(in_shape)} map ({_desc(gm, cur)} of {_desc(gm, ins[0])}): "
                "there is no global pool before it")
        if len(ins) != 1:
            maxed = [i for i in ins if _is_max_pool(gm, i)]
            if maxed:
                return None, chain[::-1], _max_reason(f"{_desc(gm, maxed[0])} combined by {_desc(gm, cur)}, e.g. "
                                                      "avg+max pooling")
            what = f"combines {len(ins)} tensors" if ins else "has no tensor input"
            return None, chain[::-1], f"not fed by a global average pool: {_desc(gm, cur)} {what} on the way"
        chain.append(cur)
        cur = ins[0]
    return None, chain[::-1], f"no global average pool within {_MAX_HEAD_DEPTH} operations before the classifier"


def _contains_linear(mod: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in mod.modules())


def _expand_classifier_head(gm: fx.GraphModule) -> None:
    """Inline timm ``ClassifierHead`` leaf modules with an average pool and a Linear, so the Linear is visible.

    ``ClassifierHead.forward`` is ``flatten(fc(drop(global_pool(x))))``; calling those four submodules in turn
    computes the same thing, and the graph then shows the pool and the Linear to the matcher.
    """
    for node in _output_frontier(gm):
        mod = _module(gm, node)
        if mod is None or not _is_timm(mod, "ClassifierHead") or node.kwargs or len(node.args) != 1:
            continue
        pool = getattr(mod, "global_pool", None)
        if not isinstance(getattr(mod, "fc", None), nn.Linear) or pool is None \
                or str(getattr(pool, "pool_type", "")).lower() not in ("avg", "fast", "fastavg"):
            continue
        cur = node.args[0]
        with gm.graph.inserting_before(node):
            for child in ("global_pool", "drop", "fc", "flatten"):
                cur = gm.graph.call_module(f"{node.target}.{child}", (cur,))
        node.replace_all_uses_with(cur)
        gm.graph.erase_node(node)


def find_heads(gm: fx.GraphModule, ctx: ModuleIndex | None = None) -> tuple[list[HeadMatch], list[Skip]]:
    """The classifier heads of ``gm`` this pass can convert, and the others with the reason.

    A classifier is a Linear whose output reaches the graph output with no other layer with weights after it
    (dropout, flatten, softmax, averaging may follow). Several of them (distillation, auxiliary heads) are
    left alone; a single one is matched back to its global average pool. ``ctx``: the graph's module
    bookkeeping (:class:`~fxsurgeon.graph.index.ModuleIndex`) when the caller has it for this graph already.
    """
    ctx = ctx or ModuleIndex(gm)
    frontier = _output_frontier(gm)
    linears: list[tuple[fx.Node, str]] = []
    skipped: list[Skip] = []
    for n in frontier:
        name, why = _linear_module_name(gm, n)
        if name:
            linears.append((n, name))
        elif why:
            skipped.append(Skip(n.name, why))
        else:
            mod = _module(gm, n)
            if mod is not None and not isinstance(mod, nn.Linear) and _contains_linear(mod) \
                    and not isinstance(mod, nn.modules.conv._ConvNd):
                skipped.append(Skip(str(n.target), (
                    f"the classifier sits inside leaf module '{n.target}' ({type(mod).__qualname__}), which the "
                    "graph calls as a whole: trace through it (do not make it a leaf module) to convert it")))
    if len(linears) > 1:
        names = ", ".join(name for _, name in linears)
        for n, name in linears:
            skipped.append(Skip(name, (
                f"one of {len(linears)} classifier heads ({names}) whose outputs are combined or returned together "
                "(a distillation or auxiliary head): only single-head classifiers are converted"),
                details={"node": n.name}))
        return [], skipped
    if not linears:
        if not skipped and any(_linear_module_name(gm, n)[0] for n in gm.graph.nodes):
            skipped.append(Skip("", (
                "no classifier: every Linear in the graph has another layer with weights after it ("
                + ", ".join(_desc(gm, n) for n in frontier[:3]) + " reach the output)")))
        return [], skipped
    node, name = linears[0]
    why = _linear_refusal(ctx, node, name)
    if why:
        return [], [*skipped, Skip(name, why, details={"module": _linear_desc(gm.get_submodule(name))})]
    gap, chain, reason = _walk_to_pool(ctx, node)
    if gap is None:
        return [], [*skipped, Skip(name, reason or "not fed by a global average pool",
                                   details={"module": _linear_desc(gm.get_submodule(name))})]
    return [HeadMatch(node, name, gap, chain)], skipped


# --------------------------------------------------------------------------------------------- rewriting


def _segment(ctx: ModuleIndex, linear: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The nodes right before ``linear`` that commute with flattening (N, C, 1, 1) → (N, C), and where they start."""
    seg: list[fx.Node] = []
    cur = _data_inputs(linear)[0]
    while _kind(ctx, cur) in (IDENTITY, DROPOUT, SHAPE, ELEMENTWISE, LINEAR) and len(_data_inputs(cur)) == 1 \
            and not isinstance(match_global_pool(ctx.gm, cur), Gap):
        seg.append(cur)
        cur = _data_inputs(cur)[0]
    return cur, seg[::-1]


def _pooled_like(shape: tuple[int, ...]) -> bool:
    """(N, C) followed only by singleton dims: (N, C), (N, C, 1), (N, C, 1, 1)."""
    return 2 <= len(shape) <= 4 and all(d == 1 for d in shape[2:])


def _check_ranks(ctx: ModuleIndex, source: fx.Node, source_rank: int | None, nodes: list[fx.Node],
                 linear: fx.Node) -> tuple[str | None, bool]:
    """Check that ``nodes`` take the pooled (N, C[, 1, 1]) tensor ``source`` to the classifier's (N, C) input.

    Returns (why not, None if fine; whether a bare ``squeeze()`` also drops the batch dim when N = 1).
    """
    rank = source_rank
    squeeze_batch = False
    for n in nodes:
        kind = _kind(ctx, n)
        if kind == SHAPE:
            src = _data_inputs(n)[0]
            i, o = _shape(src), _shape(n)
            if i is not None and o is not None:
                bare = _is_bare_squeeze(n)
                if not _pooled_like(i) or (bare and i[1] == 1):
                    return f"{_desc(ctx.gm, n)} reshapes a {list(i)} tensor, not a pooled (N, C, 1, 1) one", False
                if _pooled_like(o) and tuple(o[:2]) == tuple(i[:2]):
                    rank = len(o)
                elif bare and i[0] == 1 and tuple(o) == (i[1],):  # squeeze() of a batch of one
                    rank = 2
                else:
                    return f"{_desc(ctx.gm, n)} maps {list(i)} to {list(o)}, not (N, C, 1, 1) to (N, C)", False
                squeeze_batch = squeeze_batch or bare
            elif rank == 4 and _unambiguous_flatten(ctx, n):
                rank = 2
            else:
                return (f"{_desc(ctx.gm, n)}: shapes are needed to tell what it does (pass example_inputs to "
                        "convert())"), False
        elif kind == LINEAR and rank != 2:
            return f"{_desc(ctx.gm, n)} does not see an (N, C) tensor", False
        elif kind == POINTWISE and rank != 4:
            return f"{_desc(ctx.gm, n)} does not see an (N, C, 1, 1) tensor", False
    if rank is None:
        return (f"the shape of {_desc(ctx.gm, source)} is unknown: shapes are needed (pass example_inputs to "
                "convert())"), False
    if rank != 2:
        return f"the classifier at node '{linear.name}' does not see an (N, C) tensor", False
    return None, squeeze_batch


def _rank(ctx: ModuleIndex, node: fx.Node, gap: Gap | None) -> int | None:
    """2, 3 or 4 for a pooled (N, C[, 1[, 1]]) tensor, -1 for anything else, None when unknown.

    From ShapeProp shapes when there are any, else followed structurally from the pool (:func:`_layout`).
    """
    shape = _shape(node)
    if shape is not None:
        return len(shape) if _pooled_like(shape) else -1
    layout = _layout(ctx, node, gap)
    if layout is None:
        return None
    return len(layout) if layout[:2] == ("N", "C") and set(layout[2:]) <= {"1"} else -1


def _permutation(node: fx.Node, rank: int) -> tuple[int, ...] | None:
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if len(dims) != rank or not all(isinstance(d, int) for d in dims):
        return None
    dims = tuple(d % rank for d in dims)
    return dims if sorted(dims) == list(range(rank)) else None


def _layout(ctx: ModuleIndex, node: fx.Node, gap: Gap | None, depth: int = 0) -> tuple[str, ...] | None:
    """Without shapes: where batch ("N"), channels ("C") and singleton ("1") dims of a pooled tensor sit.

    Followed from a structural pool through operations that act per position and keep the rank — identity,
    dropout, activations, 1×1 convs, norms over the channels (BatchNorm, timm ``LayerNorm2d``, ``F.layer_norm``
    over a channels-last last dim) — and ``permute``; None as soon as anything else (or an unknown) comes.
    """
    if gap is None or depth > _MAX_HEAD_DEPTH or _shape(node) is not None:
        return None
    if node is gap.node:
        return (("N", "C", "1", "1") if gap.keep4d else ("N", "C")) if gap.structural else None
    ins = _data_inputs(node)
    if len(ins) != 1:
        return None
    src = _layout(ctx, ins[0], gap, depth + 1)
    if src is None:
        return None
    kind = _kind(ctx, node)
    if kind in (IDENTITY, DROPOUT, ELEMENTWISE):
        return src
    if kind == POINTWISE:
        return src if src == ("N", "C", "1", "1") else None
    if node.op == "call_method" and node.target == "permute":
        dims = _permutation(node, len(src))
        return tuple(src[d] for d in dims) if dims is not None else None
    if node.op == "call_function" and node.target is F.layer_norm:
        normalized = _arg(node, 1, "normalized_shape")
        ok = (isinstance(normalized, (tuple, list)) and len(normalized) == 1) or isinstance(normalized, int)
        return src if ok and src[-1] == "C" else None
    if node.op == "call_module":
        mod = _module(ctx.gm, node)
        if type(mod) is nn.BatchNorm2d or _is_timm(mod, "LayerNorm2d") or _is_timm(mod, "BatchNormAct2d"):
            return src if src == ("N", "C", "1", "1") else None
        if type(mod) is nn.LayerNorm and len(mod.normalized_shape) == 1:
            return src if src[-1] == "C" else None
    return None


def _swap_linear(ctx: ModuleIndex, node: fx.Node) -> tuple[str, str, nn.Conv2d]:
    """Put the 1×1 conv at the Linear's qualified name: (name, description of the Linear, the conv)."""
    name, _ = _linear_module_name(ctx.gm, node)
    mod = ctx.gm.get_submodule(name)
    if isinstance(mod, nn.Linear):
        conv = linear_to_conv1x1(mod)
    else:  # the tensors of a Linear fx traced through (F.linear)
        conv = conv1x1_from_linear_params(mod.weight, getattr(mod, "bias", None))
        conv.train(mod.training)
    before = _linear_desc(mod)
    replace_module(ctx.gm, name, conv)
    return name, before, conv


def _copy_on(graph: fx.Graph, node: fx.Node, new_input: fx.Node) -> fx.Node:
    """The operation of ``node`` applied to ``new_input`` instead of its tensor input."""
    old = _data_inputs(node)[0]
    args = fx.node.map_arg(node.args, lambda a: new_input if a is old else a)
    kwargs = fx.node.map_arg(node.kwargs, lambda a: new_input if a is old else a)
    return graph.create_node(node.op, node.target, args, kwargs)


def _channel_dropout(ctx: ModuleIndex, node: fx.Node, cur: fx.Node, plan: dict[str, Any]) -> fx.Node:
    """Dropout of the pooled (N, C) vector, done on the (N, C, H, W) map: drop whole channels (Dropout2d).

    Zeroing channel c of the map and scaling by 1/(1-p) zeroes and scales its spatial mean the same way, so
    the pooled result has exactly the original's distribution, in training too.
    """
    graph = ctx.gm.graph
    if node.op == "call_module":
        mod = _module(ctx.gm, node)
        if mod.p == 0:
            return cur
        new = nn.Dropout2d(mod.p)
        new.train(mod.training)
        replace_module(ctx.gm, str(node.target), new)
        plan.setdefault("dropout", []).append(str(node.target))
        return graph.call_module(str(node.target), (cur,))
    p = _arg(node, 1, "p", 0.5)
    training = _arg(node, 2, "training" if node.target is F.dropout else "train", True)
    if p == 0 or training is False:
        return cur
    return graph.call_function(F.dropout2d, (cur,), {"p": p, "training": training})


def _fc_refusal(ctx: ModuleIndex, match: HeadMatch) -> str | None:
    """Why the classifier cannot move before the pool exactly, or None."""
    blockers = [n for n in match.chain if _kind(ctx, n) not in _FC_KINDS]
    # name the operations that matter: permutes around a channels-last norm only come with it
    named = [n for n in blockers if not (n.op == "call_method" and n.target in ("permute", "transpose"))] or blockers
    if blockers:
        blockers = named
        what = ", ".join(_desc(ctx.gm, n) for n in blockers[:4]) + (" …" if len(blockers) > 4 else "")
        return (f"{what} between the pool and the classifier "
                + ("is not a linear per-position operation" if len(blockers) == 1 else
                   "are not all linear per-position operations")
                + " (a norm or a nonlinearity does not commute with averaging)")
    for n in match.chain:
        if _kind(ctx, n) == DROPOUT and n.op == "call_module":
            mod = _module(ctx.gm, n)
            if mod.p > 0 and len(ctx.calls.get(str(n.target), [])) > 1:
                return f"dropout '{n.target}' is shared with other call sites: it cannot become channel dropout"
    shape = _shape(match.gap.feature)
    if shape is not None and len(shape) != 4:
        return f"the pooled tensor {list(shape)} is not an (N, C, H, W) map"
    return None


def _mutation_refusal(ctx: ModuleIndex, root: fx.Node, moved: list[fx.Node], linear: fx.Node) -> str | None:
    """Why re-running ``moved`` on ``root`` at the classifier could change what some reader sees, or None.

    The rewrite recomputes the nodes between pool and classifier where the classifier runs (after ``root``,
    the pooled tensor or, fully convolutional, the map), so it is exact only when (a) nothing writes in place,
    between ``root`` and the classifier, to a tensor those nodes read or produce (or a view of one), and (b) no
    in-place op among them writes to a tensor (or a view of one) that any other node reads.
    """
    gm = ctx.gm
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    classes = alias_classes(gm)
    inside = set(moved) | {linear}
    region = {classes[n] for n in (root, *moved)}
    for n in gm.graph.nodes:
        if not order[root] < order[n] < order[linear] or n in inside:
            continue
        hit = [t for t in mutated_inputs(gm, n) if classes[t] in region]
        if hit:
            return (f"{_desc(gm, n)} writes in place to '{hit[0].name}', which the head reads (or a view of it): "
                    "moving the head's operations across it would change the result")
    for n in moved:
        for t in mutated_inputs(gm, n):
            readers = [u for m, c in classes.items() if c is classes[t] for u in m.users
                       if u not in inside and reads_values(u)]
            if readers:
                return (f"{_desc(gm, n)} in the head writes in place to '{t.name}', which "
                        f"{_desc(gm, readers[0])} also reads (or a view of it): moving it would change what that "
                        "reader sees")
    return None


def _erase_dead(gm: fx.GraphModule, nodes: list[fx.Node]) -> set[str]:
    """Erase those of ``nodes`` nothing uses any more, with the parameter reads and shape arithmetic only they
    used; returns the module targets of the erased ``call_module`` nodes."""
    erased_targets: set[str] = set()
    todo = list(dict.fromkeys(nodes))
    changed = True
    while changed:  # to a fixpoint: erasing a node may free the ones before it (a pool used by a .size())
        changed = False
        for n in list(todo):
            if getattr(n, "_erased", False):
                todo.remove(n)
                continue
            if n.users or n.op in ("placeholder", "output"):
                continue
            ins = n.all_input_nodes
            if n.op == "call_module":
                erased_targets.add(str(n.target))
            gm.graph.erase_node(n)
            todo.remove(n)
            todo += [i for i in ins if (i.op == "get_attr" or _is_static(i)) and i not in todo]
            changed = True
    return erased_targets


def _delete_orphans(gm: fx.GraphModule, targets: set[str]) -> None:
    """Drop parameter-free submodules the rewrite stopped calling (fx keeps only modules the graph uses)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for t in sorted(targets, key=lambda s: -s.count(".")):
        if any(u == t or u.startswith(t + ".") for u in used):
            continue
        try:
            mod = gm.get_submodule(t)
        except AttributeError:
            continue
        if not any(True for _ in mod.parameters()) and not any(True for _ in mod.buffers()):
            gm.delete_submodule(t)


def _rewrite(ctx: ModuleIndex, match: HeadMatch, fully_convolutional: bool,
             shapes: str) -> tuple[list[Rewrite], list[Skip], dict[str, Any] | None]:
    """Swap the classifier (and the Linears of an MLP head) for 1×1 convs; the head description or None."""
    gm, graph = ctx.gm, ctx.gm.graph
    rewrites: list[Rewrite] = []
    skipped: list[Skip] = []
    gap, linear = match.gap, match.linear
    classifier = match.name
    num_classes, in_channels = ctx.gm.get_submodule(classifier).weight.shape
    between = [_desc(gm, n) for n in match.chain if _kind(ctx, n) not in (IDENTITY, SHAPE, DROPOUT)]
    details = {"pool": gap.form, "between": between, "shapes": shapes}

    if _shape(linear) is None and in_channels == 1:
        # matched without shapes: only C > 1 proves the pooled tensor was (N, C, 1, 1) and not an unbatched map
        return [], [Skip(classifier, "a 1-feature classifier matched without shapes is ambiguous: pass "
                                     "example_inputs to convert()", details={"pool": gap.form})], None
    moving = _mutation_refusal(ctx, gap.node, match.chain, linear)
    if moving:
        return [], [Skip(classifier, f"cannot rewrite the classifier: {moving}; make that operation out of place "
                                     "to convert the head", details={"pool": gap.form})], None
    refused = None
    squeeze_batch = False
    if fully_convolutional:
        refused = _fc_refusal(ctx, match) or _mutation_refusal(ctx, gap.feature, [gap.node, *match.chain], linear)
        if refused is None:
            why, squeeze_batch = _check_ranks(ctx, gap.node, _rank(ctx, gap.node, gap), match.chain, linear)
            if why:
                refused = why
        if refused is not None:
            skipped.append(Skip(classifier, f"fully_convolutional refused: {refused}; the classifier was converted "
                                            "after the pool instead (exact)",
                                details={"pool": gap.form}))
    fc = fully_convolutional and refused is None

    # the Linears to swap: the classifier, and hidden Linears of an MLP head, classifier-side first
    hidden = [n for n in match.chain if _kind(ctx, n) == LINEAR]
    plan: dict[str, Any] = {}
    old_nodes: list[fx.Node] = []
    swapped: list[tuple[str, str, nn.Conv2d, str]] = []
    if fc:
        with graph.inserting_before(linear):
            cur = gap.feature
            for n in match.chain:
                kind = _kind(ctx, n)
                if kind == DROPOUT:
                    cur = _channel_dropout(ctx, n, cur, plan)
                elif kind == POINTWISE:
                    cur = _copy_on(graph, n, cur)
                elif kind == LINEAR:
                    name, lin, conv = _swap_linear(ctx, n)
                    swapped.append((name, lin, conv, "hidden"))
                    cur = graph.call_module(name, (cur,))
            name, lin, conv = _swap_linear(ctx, linear)
            swapped.append((name, lin, conv, "classifier"))
            cur = graph.call_module(name, (cur,))
            pool_mod = _module(gm, gap.node)
            if isinstance(pool_mod, nn.AdaptiveAvgPool2d):
                pooled = graph.call_module(str(gap.node.target), (cur,))
            else:
                pooled = graph.call_function(F.adaptive_avg_pool2d, (cur, 1))
            out = graph.call_function(torch.flatten, (pooled, 1))
            if squeeze_batch:
                out = graph.call_method("squeeze", (out, 0))
        linear.replace_all_uses_with(out)
        old_nodes = [linear, *match.chain[::-1], gap.node]
    else:
        todo = [linear, *hidden[::-1]]
        done: set[fx.Node] = set()
        for target in todo:
            if target in done:
                continue
            source, seg = _segment(ctx, target)
            why, squeeze = _check_ranks(ctx, source, _rank(ctx, source, gap), seg, target)
            if why:
                if target is linear:
                    return [], [Skip(classifier, f"cannot rewrite the classifier: {why}",
                                     details={"pool": gap.form})], None
                skipped.append(Skip(_linear_module_name(gm, target)[0] or target.name,
                                    f"hidden Linear of the head left as it is: {why}"))
                continue
            with graph.inserting_before(target):
                cur = source
                rank = _rank(ctx, source, gap)
                if rank in (2, 3):  # (N, C) or (N, C, 1) → (N, C, 1, 1) for the conv
                    index = (slice(None),) * rank + (None,) * (4 - rank)
                    cur = graph.call_function(operator.getitem, (source, index))
                for n in seg:
                    kind = _kind(ctx, n)
                    if kind in (DROPOUT, ELEMENTWISE):
                        cur = _copy_on(graph, n, cur)
                    elif kind == LINEAR:
                        name, lin, conv = _swap_linear(ctx, n)
                        swapped.append((name, lin, conv, "hidden"))
                        cur = graph.call_module(name, (cur,))
                        done.add(n)
                name, lin, conv = _swap_linear(ctx, target)
                swapped.append((name, lin, conv, "classifier" if target is linear else "hidden"))
                cur = graph.call_module(name, (cur,))
                out = graph.call_function(torch.flatten, (cur, 1))
                if squeeze:
                    out = graph.call_method("squeeze", (out, 0))
            target.replace_all_uses_with(out)
            old_nodes += [target, *seg[::-1]]
            done.add(target)
    erased = _erase_dead(gm, old_nodes)
    _delete_orphans(gm, erased)

    for name, lin, conv, role in swapped:
        d = {**details, "role": role, "fully_convolutional": fc}
        if plan.get("dropout"):
            d["channel_dropout"] = plan["dropout"]
        rewrites.append(Rewrite(name, lin, describe(conv), True, details=d))
    info = {"classifier": classifier, "in_channels": in_channels, "num_classes": num_classes,
            "fully_convolutional": fc, "fully_convolutional_refused": refused, "pool": gap.form,
            "global_pool": "avg"}
    return rewrites, skipped, info


# ------------------------------------------------------------------------------------------------ shapes


def _has_shapes(gm: fx.GraphModule) -> bool:
    return any(_shape(n) is not None for n in gm.graph.nodes if n.op == "placeholder")


def _shapes_would_decide(ctx: ModuleIndex, matches: list[HeadMatch], skipped: list[Skip],
                         fully_convolutional: bool) -> bool:
    """Whether derived shapes could change the outcome: a head waits for shapes, or a match is ambiguous without.

    A match whose every check passes structurally (timm's ``ClassifierHead``, ``AdaptiveAvgPool2d(1)`` then
    ``flatten(1)``, ...) is converted the same with or without shapes, so the shape derivation — a pass over the
    whole model, the bulk of this pass's time — is left out for it.
    """
    if any("shapes are needed" in s.reason for s in skipped):
        return True
    for match in matches:
        if _shape(match.linear) is None and ctx.gm.get_submodule(match.name).weight.shape[1] == 1:
            return True
        if fully_convolutional and _fc_refusal(ctx, match) is None and _check_ranks(
                ctx, match.gap.node, _rank(ctx, match.gap.node, match.gap), match.chain, match.linear)[0]:
            return True
        for target in (match.linear, *(n for n in match.chain if _kind(ctx, n) == LINEAR)):
            source, seg = _segment(ctx, target)
            if _check_ranks(ctx, source, _rank(ctx, source, match.gap), seg, target)[0]:
                return True
    return False


def _derive_shapes(gm: fx.GraphModule) -> tuple[str | None, str | None]:
    """Run ShapeProp on an input of a timm model's ``pretrained_cfg["input_size"]``: (how, None) or (None, why not)."""
    cfg = getattr(gm, "pretrained_cfg", None) or getattr(gm, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if not (isinstance(size, (tuple, list)) and len(size) == 3 and all(isinstance(s, int) for s in size)):
        return None, "no example_inputs and no timm pretrained_cfg input_size to derive shapes from"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None, f"no example_inputs, and the model takes {len(placeholders)} inputs"
    ref = next((t for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    if device.type == "meta":
        return None, "no example_inputs, and the model is on the meta device"
    gen = torch.Generator().manual_seed(0)
    # batch 2: a batch of 1 would hide what a bare squeeze() does to the batch dimension
    x = torch.randn(2, *size, generator=gen).to(device=device, dtype=ref.dtype if ref is not None else None)
    try:
        with eval_modes(gm):
            propagate_shapes(gm, x)
    except Exception as exc:  # the model may not accept that size: fall back to structural matching
        for n in gm.graph.nodes:
            n.meta.pop("tensor_meta", None)
        return None, (f"no example_inputs, and running it at pretrained_cfg input_size {list(size)} failed: "
                      f"{type(exc).__name__}: {exc}")
    return f"derived: ShapeProp at pretrained_cfg input_size {list(size)} (no example_inputs)", None


# -------------------------------------------------------------------------------------------------- pass


@dataclass(frozen=True)
class ConvHeadOptions(PassOptions):
    """Options of the :func:`conv_head` pass.

    Attributes:
        fully_convolutional: move the convs before the pool (pool → conv becomes conv → pool), exact by
            linearity where only linear per-position operations lie between (dropout becomes channel
            dropout, which pools to exactly the original's distribution). Refused with the reason, and the
            plain form used, where a norm or nonlinearity sits between pool and classifier.
    """

    pass_name: ClassVar[str] = "conv_head"

    fully_convolutional: bool = False


@register_pass(order=100, needs_shapes=True, default=True, options=ConvHeadOptions)
def conv_head(gm: fx.GraphModule, options: ConvHeadOptions | None = None, /, **kwargs: Any) -> PassResult:
    """Swap a Linear classifier after global average pooling for a 1×1 conv (exact).

    Matches: the model's single classifier (a Linear with no layer with weights after it) whose input comes
    from a global average pool (every form: see the module docstring), through flatten / view / reshape /
    squeeze, dropout, and possibly norms, activations, 1×1 convs and hidden Linears.

    Emits: ``Conv2d(C, K, 1)`` at the Linear's qualified name (weight (K, C, 1, 1), same bias) on the
    (N, C, 1, 1) pooled tensor, then ``flatten(1)``; Linears of an MLP head likewise. Exact (float rounding
    only). The model becomes a :class:`fxsurgeon.heads.ConvHeadGraphModule` answering ``get_classifier()``
    / ``reset_classifier()`` / ``class_map()``.

    Args:
        gm: the traced model, edited in place.
        options: a :class:`ConvHeadOptions` (``fully_convolutional``), or its fields as keywords (not both).

    Needs: shapes from ShapeProp to confirm window/mean pools and squeezes (``convert()`` provides them with
    ``example_inputs``; for timm models they are derived from ``pretrained_cfg``); ``AdaptiveAvgPool2d(1)`` /
    ``F.adaptive_avg_pool2d(x, 1)`` followed by ``flatten(1)`` or ``view(x.size(0), -1)`` are matched
    without. The record says which (``details["shapes"]``).

    >>> import torch, torch.nn as nn
    >>> from fxsurgeon.tracing import trace
    >>> gm = trace(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)))
    >>> res = conv_head(gm)
    >>> res.rewrites[0].after, res.rewrites[0].exact
    ('Conv2d(128→10, 1x1)', True)
    >>> gm(torch.randn(4, 128, 7, 7)).shape
    torch.Size([4, 10])
    """
    fully_convolutional = ConvHeadOptions.coerce(options, kwargs).fully_convolutional
    _expand_classifier_head(gm)
    shapes, no_shapes = ("shape_prop", None) if _has_shapes(gm) else (None, None)
    ctx = ModuleIndex(gm)
    matches, skipped = find_heads(gm, ctx)
    if not shapes and _shapes_would_decide(ctx, matches, skipped, fully_convolutional):
        shapes, no_shapes = _derive_shapes(gm)
        if shapes:
            matches, skipped = find_heads(gm, ctx)
    elif not shapes:
        no_shapes = "the head's form needs none"
    label = shapes or f"none: matched structurally ({no_shapes})"
    if not shapes:
        for s in skipped:
            if "shapes are needed" in s.reason:
                s.details["shapes"] = label
    rewrites: list[Rewrite] = []
    infos = []
    for i, match in enumerate(matches):
        done, skips, info = _rewrite(ctx if i == 0 else ModuleIndex(gm), match, fully_convolutional, label)
        rewrites += done
        skipped += skips
        if info is not None:
            infos.append(info)
    if rewrites:
        gm.graph.lint()
        for info in infos:
            adopt_head_api(gm, info, recompile=False)
        gm.recompile()
    return PassResult(gm, rewrites, skipped, "conv_head")
