"""Concat fusion pass: a 1×1 fusion conv after channel concatenation, exact or channel-reducing.

Matches ``torch.cat`` / ``torch.concat`` / ``torch.concatenate`` (and ``aten.cat``) nodes of two or more
tensors along the channel axis of 4-D tensors (``dim=1`` or ``dim=-3``, read from ``ShapeProp`` shapes):
U-Net skip connections, DenseNet layers, Inception/GoogLeNet branches, CSP/DLA/VoVNet aggregation, FPN fusion.
Every other concat is accounted for as a skip with its reason.

* ``mode="identity"`` (default): ``Conv2d(C, C, 1, bias=False)`` initialised to the identity right after the
  concat. Exact for finite activations (an ±Inf channel turns every output channel NaN, 0·Inf; the record's
  ``details["exact_for"]`` says so and verification flags it); it adds C² parameters and C²·H·W MACs per sample (in the record), a trainable mixing point.
* ``mode="reduce"`` (``out_channels=`` or ``ratio=``): walks forward from the concat through ops that act on
  each channel alone (BatchNorm, activations, dropout, pooling, upsampling, spatial padding, reshapes of
  1×1 maps) to the first channel-mixing consumers (``Conv2d`` with ``groups=1``, ``Linear``), and puts a
  ``Conv2d(C, r, 1, bias=False)`` right before them (after the per-channel ops: channel mixing does not
  commute with a per-channel nonlinearity), narrowing the consumers to r input channels. Weights come from
  :func:`fxsurgeon.forms.fusion_math.fusion_factors`: a truncated SVD of the consumers' stacked weights (exact when
  r reaches its rank; otherwise the discarded energy is recorded), or, with ``calibration=`` batches, the
  subspace that keeps the most of the consumers' output on that data.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import SurgeryError
from ..forms.fusion_math import (
    FusionFactors,
    fusion_factors,
    numerical_rank,
    stack_consumer_weights,
    unstack_consumer_weights,
)
from ..graph import describe, mutated_inputs, reads_values, replace_module
from ..graph.index import ModuleIndex, SwapWording, swap_refusal
from ..graph.ops import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    ADAPTIVE_AVG_POOL_FUNCTIONS,
    ARITHMETIC_FUNCTIONS,
    ARITHMETIC_METHODS,
    AVG_POOL_FUNCTIONS,
    AVG_POOL_MODULES,
    BATCH_NORM_FUNCTIONS,
    CONCAT_FUNCTIONS,
    DROPOUT_FUNCTIONS,
    DROPOUT_MODULES,
    DROPOUT_VARIANT_FUNCTIONS,
    FUNCTIONAL_LAYERS,
    IDENTITY_METHODS,
    IDENTITY_MODULES,
    INPLACE_ACTIVATION_FUNCTIONS,
    INPLACE_ARITHMETIC_METHODS,
    INPLACE_ARITHMETIC_OPERATORS,
    LP_POOL_FUNCTIONS,
    LP_POOL_MODULES,
    MAX_POOL_FUNCTIONS,
    MAX_POOL_MODULES,
    PAD_FUNCTIONS,
    PAD_MODULES,
    PARAMETRIC_ACTIVATION_MODULES,
    REDUCTION_FUNCTIONS,
    REDUCTION_METHODS,
    RESHAPE_FUNCTIONS,
    RESHAPE_METHODS,
    SPLIT_FUNCTIONS,
    SPLIT_METHODS,
    UNARY_MATH_FUNCTIONS,
    UNARY_MATH_METHODS,
    UPSAMPLE_FUNCTIONS,
    UPSAMPLE_MODULES,
)
from ..modes import eval_modes
from ..modules import depthwise_conv_class
from ..runtime import device_or_cpu
from .base import PassResult, Rewrite, Skip
from .options import OptionError, PassOptions
from .registry import register_pass

# CONCAT_FUNCTIONS lives in fxsurgeon.graph.ops with the other op tables; it stays importable from here
__all__ = ["CONCAT_FUNCTIONS", "Concat", "ConcatFusionOptions", "FusionSite", "concat_fusion", "find_concats",
           "second_moments"]


# ----------------------------------------------------------------------------------------------- matching


@dataclass
class Concat:
    """A channel concatenation the pass may rewrite."""

    node: fx.Node
    target: str  # "<enclosing module>:<node name>", stable for records and `exclude`
    scope: str  # qualified name of the module whose forward concatenates ("" at the root)
    channels: int
    inputs: list[int]  # channels of each concatenated tensor
    shape: tuple[int, ...]  # (B, C, H, W)
    dtype: torch.dtype


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return str(path[0] if isinstance(path, tuple) else path)


def _target(node: fx.Node) -> str:
    scope = _scope(node)
    return f"{scope}:{node.name}" if scope else node.name


def _meta_shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _cat_args(node: fx.Node) -> tuple[Any, Any, str | None]:
    """(tensors, dim, reason-to-skip) of a concat node, whatever the calling form."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
    if node.kwargs.get("out") is not None:
        return tensors, dim, "writes into an out= tensor"
    if not isinstance(tensors, (tuple, list)):
        return tensors, dim, "the tensor sequence is built at run time (not a literal tuple/list in the graph)"
    if not isinstance(dim, int) or isinstance(dim, bool):
        return tensors, dim, f"dim is not a constant ({dim!r})"
    return tensors, dim, None


def find_concats(gm: fx.GraphModule, *, exclude: Iterable[str] = ()) -> tuple[list[Concat], list[Skip]]:
    """Channel concatenations of 4-D tensors in ``gm``, and every other concat with the reason it is skipped.

    Needs ``node.meta["tensor_meta"]`` from ``ShapeProp``.

    >>> import torch, torch.nn as nn
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> class Cat(nn.Module):
    ...     def forward(self, a, b):
    ...         return torch.cat([a, b], dim=-3)
    >>> gm = torch.fx.symbolic_trace(Cat())
    >>> _ = ShapeProp(gm).propagate(torch.randn(1, 32, 16, 16), torch.randn(1, 64, 16, 16))
    >>> found, skipped = find_concats(gm)
    >>> found[0].channels, found[0].inputs
    (96, [32, 64])
    """
    patterns = list(exclude)
    found: list[Concat] = []
    skipped: list[Skip] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in CONCAT_FUNCTIONS:
            continue
        target, scope = _target(node), _scope(node)

        def skip(reason: str, **details: Any) -> None:
            skipped.append(Skip(target, reason, details={"node": node.name, **details}))  # noqa: B023

        tensors, dim, why = _cat_args(node)
        if why:
            skip(why)
            continue
        shape = _meta_shape(node)
        meta = node.meta.get("tensor_meta")
        if shape is None:
            skip("no shape recorded for this node: concat_fusion needs ShapeProp shapes "
                 "(convert(..., example_inputs=...))")
            continue
        rank = len(shape)
        if rank != 4:
            skip(f"concatenates {rank}-D tensors (shape {list(shape)}): only 4-D (N, C, H, W) maps are fused",
                 shape=list(shape))
            continue
        if not -rank <= dim < rank or dim % rank != 1:
            skip(f"concatenates along dim={dim} of a 4-D tensor, not the channel axis (dim=1 or -3)",
                 shape=list(shape), dim=dim)
            continue
        parts = [_meta_shape(t) for t in tensors]
        if any(p is None or len(p) != 4 for p in parts):
            skip("an input of the concat has no recorded 4-D shape", shape=list(shape))
            continue
        inputs = [p[1] for p in parts]  # type: ignore[index]
        nonempty = [c for c in inputs if c > 0]
        if len(nonempty) < 2:
            skip(f"concatenates a single non-empty tensor ({shape[1]} channels): nothing to fuse",
                 shape=list(shape))
            continue
        if not meta.dtype.is_floating_point:
            skip(f"concatenates {meta.dtype} tensors: only floating-point maps get a conv")
            continue
        if not node.users:
            skip("its result is never used")
            continue
        if any(fnmatch.fnmatchcase(name, p) for name in (target, scope, node.name) for p in patterns if name):
            skip("excluded by the `exclude` option")
            continue
        found.append(Concat(node, target, scope, int(shape[1]), inputs, shape, meta.dtype))
    return found, skipped


# ------------------------------------------------------------------------ walking to the channel mixers

# The walk's classes of operations, built from the one op taxonomy (fxsurgeon.graph.ops).
# ops that act on each channel alone and keep the channel count
_PER_CHANNEL_MODULES = (*ACTIVATION_MODULES, *IDENTITY_MODULES, *DROPOUT_MODULES, *AVG_POOL_MODULES,
                        *MAX_POOL_MODULES, *LP_POOL_MODULES, *UPSAMPLE_MODULES, *PAD_MODULES)
_PER_CHANNEL_FUNCTIONS = (
    ACTIVATION_FUNCTIONS | INPLACE_ACTIVATION_FUNCTIONS | UNARY_MATH_FUNCTIONS | DROPOUT_FUNCTIONS
    | DROPOUT_VARIANT_FUNCTIONS | BATCH_NORM_FUNCTIONS | AVG_POOL_FUNCTIONS | ADAPTIVE_AVG_POOL_FUNCTIONS
    | MAX_POOL_FUNCTIONS | LP_POOL_FUNCTIONS | UPSAMPLE_FUNCTIONS | PAD_FUNCTIONS
)
_PER_CHANNEL_METHODS = ACTIVATION_METHODS | UNARY_MATH_METHODS | IDENTITY_METHODS
# reshapes that keep (N, C): allowed when the spatial size is 1×1 (or the op averages/sums it away)
_RESHAPE_FUNCTIONS = RESHAPE_FUNCTIONS | REDUCTION_FUNCTIONS
_RESHAPE_METHODS = RESHAPE_METHODS | REDUCTION_METHODS
# arithmetic between tensors: foldable only when every operand comes from the concat
_ARITHMETIC_FUNCTIONS = ARITHMETIC_FUNCTIONS | INPLACE_ARITHMETIC_OPERATORS
_ARITHMETIC_METHODS = ARITHMETIC_METHODS | INPLACE_ARITHMETIC_METHODS
# functional layers: only modules can be narrowed
_FUNCTIONAL_MIXERS = FUNCTIONAL_LAYERS["conv2d"] | FUNCTIONAL_LAYERS["linear"]


def _name_of(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_function":
        return f"'{getattr(node.target, '__name__', node.target)}' at node '{node.name}'"
    return f"'{node.target}' at node '{node.name}'"


def _is_tensor_node(a: Any) -> bool:
    return isinstance(a, fx.Node) and "tensor_meta" in a.meta and hasattr(a.meta["tensor_meta"], "shape")


def _per_channel_module(mod: nn.Module, channels: int) -> bool:
    if isinstance(mod, _PER_CHANNEL_MODULES):
        return True
    if isinstance(mod, PARAMETRIC_ACTIVATION_MODULES):
        return mod.num_parameters in (1, channels)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        # timm's BatchNormAct2d & co. are BN subclasses adding an activation / dropout as children
        return all(_per_channel_module(c, channels) for c in mod.children())
    if isinstance(mod, nn.Flatten):
        return True  # the shape check decides
    if isinstance(mod, nn.Sequential):
        return all(_per_channel_module(c, channels) for c in mod)
    return False


def _reduced_dims(node: fx.Node, rank: int) -> set[int] | None:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    return {d % rank for d in dims}


@dataclass
class Consumer:
    """A channel-mixing layer reading the concat's channels: its node, every name of its module, the module,
    and the node it reads (the concat, or a per-channel function of it)."""

    node: fx.Node
    names: list[str]
    module: nn.Module
    reads: fx.Node

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass
class FusionSite:
    """Where one fusion conv goes: after ``feed`` (a concat, or a per-channel function of it), for ``consumers``.

    A consumer may read ``feed`` itself, or ``feed`` through ops that commute with channel mixing (average
    pooling, resampling, padding, spatial means): those are replayed on the fusion's output.
    """

    feed: fx.Node
    consumers: list[Consumer] = field(default_factory=list)

    @property
    def positions(self) -> int:
        return _positions(self.feed)


def _positions(node: fx.Node) -> int:
    shape = _meta_shape(node) or ()
    return math.prod(shape[2:]) if len(shape) > 2 else 1


# linear ops identical on every channel: a 1×1 conv without bias commutes with them (view/reshape are left out:
# they may spell the channel count out, which a replay on r channels breaks; amax is not linear)
_COMMUTING_MODULES = (*AVG_POOL_MODULES, *UPSAMPLE_MODULES, *PAD_MODULES, *IDENTITY_MODULES, nn.Flatten)
_COMMUTING_FUNCTIONS = (AVG_POOL_FUNCTIONS | ADAPTIVE_AVG_POOL_FUNCTIONS | UPSAMPLE_FUNCTIONS
                        | RESHAPE_FUNCTIONS - {torch.reshape} | REDUCTION_FUNCTIONS - {torch.amax})
_COMMUTING_METHODS = IDENTITY_METHODS | RESHAPE_METHODS - {"view", "reshape"} | REDUCTION_METHODS - {"amax"}


def _commutes(node: fx.Node, mod: nn.Module | None) -> bool:
    """True for ops that are linear and identical on every channel, so a 1×1 conv without bias commutes with them.

    (view/reshape are left out: they may spell the channel count out, which a replay on r channels breaks.)
    """
    if node.op == "call_module":
        if isinstance(mod, nn.ConstantPad2d):  # ZeroPad2d too
            return mod.value == 0
        return isinstance(mod, _COMMUTING_MODULES)
    if node.op == "call_function":
        if node.target is F.pad:
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
            return mode != "constant" or not value
        return node.target in _COMMUTING_FUNCTIONS
    return node.op == "call_method" and node.target in _COMMUTING_METHODS


@dataclass
class _Walk:
    """What a walk from a concat found: consumers in graph order, and for every per-channel node its input
    (``parent``) and the earliest node it can be computed from by commuting ops only (``anchor``)."""

    consumers: list[Consumer]
    parent: dict[fx.Node, fx.Node]
    anchor: dict[fx.Node, fx.Node]


# how a consumer's refusal to be narrowed reads (after "<consumer description> ")
_CONSUMER_WORDING = SwapWording(
    call_sites="is called at {sites} places in the graph: narrowing it would break the others",
    read="has parameters read directly by the graph",
    tied="shares its weights with {owners}",
)


def _consumer_problem(index: ModuleIndex, node: fx.Node, mod: nn.Module, feed: fx.Node, channels: int) -> str | None:
    """Why this conv/linear consumer cannot be narrowed, or None when it can."""
    what = f"{describe(mod)} '{node.target}'"
    if node.args[:1] != (feed,) or len(node.args) != 1 or node.kwargs:
        return f"{what} is called with other arguments than the fused tensor"
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            kind = "depthwise" if mod.groups == mod.in_channels else "grouped"
            return f"{what} is {kind} (groups={mod.groups}): it does not mix channels, so it cannot be narrowed"
        if depthwise_conv_class(mod) is None:
            return f"{what}: {type(mod).__qualname__} overrides forward (not a plain conv)"
        if mod.in_channels != channels:
            return f"{what} expects {mod.in_channels} input channels, the fused tensor has {channels}"
        if len(_meta_shape(feed) or ()) != 4:
            return f"{what} reads an unbatched or non-4-D tensor"
    else:
        if type(mod).forward is not nn.Linear.forward:
            return f"{what}: {type(mod).__qualname__} overrides forward (not a plain linear)"
        if len(_meta_shape(feed) or ()) != 2:
            return f"{what} acts on the last axis of a {len(_meta_shape(feed) or ())}-D tensor, not on channels"
        if mod.in_features != channels:
            return f"{what} expects {mod.in_features} features, the fused tensor has {channels}"
    if isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params():
        return f"{what} is a lazy module with uninitialised parameters"
    # narrowed at every name, so several names are fine; several calls are not
    shared = swap_refusal(index, str(node.target), mod, node=node, single_call=True, wording=_CONSUMER_WORDING)
    if shared:
        return f"{what} {shared}"
    if mod.weight.is_meta:
        return f"{what} has weights on the meta device: load real weights first"
    return None


def _walk(index: ModuleIndex, concat: Concat) -> tuple[_Walk | None, str | None]:
    """Consumers of ``concat`` reached through per-channel ops, or the reason it cannot be reduced.

    Scans the nodes after the concat in graph (topological) order; ``region`` holds the concat and the
    per-channel functions of it. Every user of the region must be a per-channel op, a shape query, or a
    foldable channel mixer; anything else stops the concat with the exact reason.
    """
    c, batch = concat.channels, concat.shape[0]
    region: set[fx.Node] = {concat.node}
    walk = _Walk([], {}, {concat.node: concat.node})
    pending = len(concat.node.users)
    node = concat.node.next
    while pending and node.op != "root":
        ins = [a for a in node.all_input_nodes if a in region]
        if not ins:
            node = node.next
            continue
        pending -= len(ins)
        src = ins[0]
        where = f"(via node '{src.name}')" if src is not concat.node else ""
        if node.op == "output":
            return None, f"its result reaches the model's output {where}: a consumer outside the graph".strip()
        mod = index.modules.get(str(node.target)) if node.op == "call_module" else None
        target = node.target
        if not reads_values(node):  # shape queries read no channel values
            node = node.next
            continue
        if node.op == "call_function" and target in CONCAT_FUNCTIONS:
            return None, f"feeds another concat at node '{node.name}' {where}".rstrip()
        if (node.op == "call_function" and target in SPLIT_FUNCTIONS) or (
                node.op == "call_method" and target in SPLIT_METHODS):
            return None, f"split/sliced by {_name_of(node)} {where}".rstrip()
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            problem = _consumer_problem(index, node, mod, src, c)
            if problem:
                return None, f"consumer {problem}"
            walk.consumers.append(Consumer(node, index.names(mod, str(target)), mod, src))
            node = node.next
            continue
        if mod is not None and isinstance(mod, nn.modules.conv._ConvNd):
            return None, f"consumer {describe(mod)} '{target}' is not a Conv2d (1-D/3-D/transposed conv)"
        if node.op == "call_function" and target in _FUNCTIONAL_MIXERS:
            return None, f"consumed by a functional {getattr(target, '__name__', target)} at node '{node.name}': " \
                         "only Conv2d/Linear modules can be narrowed"
        why = _per_channel_problem(node, mod, ins, region, c, batch)
        if why:
            return None, why
        if mutated_inputs(index.gm, node) and len(src.users) > 1:
            return None, f"in-place {_name_of(node)} mutates a tensor that other nodes also read"
        region.add(node)
        walk.parent[node] = src
        walk.anchor[node] = walk.anchor[src] if len(ins) == 1 and _commutes(node, mod) else node
        pending += len(node.users)
        node = node.next
    return walk, None


def _placements(walk: _Walk) -> list[FusionSite]:
    """Where the fusion convs go: one per tensor the consumers read, or one shared at their common anchor.

    Consumers reading tensors that are commuting functions of one anchor (Inception's pooling branch:
    ``conv(cat)`` and ``conv(avg_pool(cat))``) can share one fusion at the anchor. It is shared when that
    costs fewer MACs than separate fusions (an upsample after the concat makes even one consumer cheaper
    to serve from the anchor; a strided pool makes it dearer).
    """
    by_feed: dict[fx.Node, list[Consumer]] = {}
    for k in walk.consumers:
        by_feed.setdefault(k.reads, []).append(k)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for feed in by_feed:
        groups.setdefault(walk.anchor.get(feed, feed), []).append(feed)
    sites = []
    for anchor, feeds in groups.items():
        separate = sum(_positions(f) for f in feeds)
        shared = _positions(anchor)
        if feeds != [anchor] and (shared < separate or (shared == separate and len(feeds) > 1)):
            sites.append(FusionSite(anchor, [k for f in feeds for k in by_feed[f]]))
        else:
            sites.extend(FusionSite(f, by_feed[f]) for f in feeds)
    return sites


def _per_channel_problem(
    node: fx.Node, mod: nn.Module | None, ins: list[fx.Node], region: set[fx.Node], c: int, batch: int
) -> str | None:
    """None when ``node`` acts on each channel of the region alone and keeps (N, C); else the reason."""
    target = node.target
    src = ins[0]
    in_shape = _meta_shape(src) or ()
    out_shape = _meta_shape(node)
    label = _name_of(node)
    elementwise = (node.op == "call_function" and target in _ARITHMETIC_FUNCTIONS) or (
        node.op == "call_method" and target in _ARITHMETIC_METHODS)
    if elementwise:
        others = [a for a in node.all_input_nodes if a not in region and _is_tensor_node(a)]
        if others:
            kind = "residual add" if target in (operator.add, operator.iadd, torch.add, "add", "add_") else "combination"
            return f"{kind} with another tensor ('{others[0].name}') at node '{node.name}': it cannot be folded"
    elif node.op == "call_module":
        if mod is None or not _per_channel_module(mod, c):
            kind = type(mod).__qualname__ if mod is not None else "?"
            return (f"consumer {label} ({kind}) is neither a per-channel op nor a Conv2d/Linear that can be "
                    "narrowed (a leaf module, a normalisation across channels, ...)")
    elif node.op == "call_function" and target in _PER_CHANNEL_FUNCTIONS:
        if node.args[:1] != (src,) or len(ins) > 1:
            return f"{label} reads the fused tensor as a parameter, not as its input"
        if target is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
            if len(pad) > 4:
                return f"{label} pads the channel axis"
    elif (node.op == "call_function" and target in _RESHAPE_FUNCTIONS) or (
        node.op == "call_method" and target in _RESHAPE_METHODS
    ):
        if node.args[:1] != (src,):
            return f"{label} reads the fused tensor as a parameter, not as its input"
        name = getattr(target, "__name__", target)
        if name in REDUCTION_METHODS:
            dims = _reduced_dims(node, len(in_shape))
            if dims is None or not dims <= {2, 3} or len(in_shape) != 4:
                return f"{label} reduces over the channel or batch axis"
        elif math.prod(in_shape[2:]) != 1 or (out_shape is not None and math.prod(out_shape[2:]) != 1):
            return f"{label} reshapes a {list(in_shape)} map: it mixes channels with positions"
    elif node.op == "call_method" and target in _PER_CHANNEL_METHODS:
        if node.args[:1] != (src,) or len(ins) > 1:
            return f"{label} reads the fused tensor as a parameter, not as its input"
    else:
        return f"consumer {label} is neither a per-channel op nor a Conv2d/Linear that can be narrowed"
    if out_shape is None or len(out_shape) not in (2, 4) or out_shape[0] != batch or out_shape[1] != c:
        shown = list(out_shape) if out_shape is not None else "no tensor"
        return f"{label} turns the {c}-channel map into {shown}: channels are not kept"
    return None


# ------------------------------------------------------------------------------------ calibration data


def _batches(calibration: Any) -> Iterable[tuple]:
    if isinstance(calibration, torch.Tensor):
        yield (calibration,)
        return
    try:
        it = iter(calibration)
    except TypeError:
        raise SurgeryError(
            f"concat_fusion: calibration must be an iterable of input batches (tensors or tuples of positional "
            f"inputs), got {type(calibration).__name__}"
        ) from None
    for i, batch in enumerate(it):
        if isinstance(batch, torch.Tensor):
            yield (batch,)
        elif isinstance(batch, (tuple, list)):
            yield tuple(batch)
        else:
            raise SurgeryError(
                f"concat_fusion: calibration batch {i} is a {type(batch).__name__}; each batch must be a tensor or "
                "a tuple of positional inputs"
            )


class _MomentCollector(fx.Interpreter):
    """Runs the graph and accumulates ``Σ x xᵀ`` over every position of the watched nodes' outputs."""

    def __init__(self, gm: fx.GraphModule, watched: Iterable[fx.Node]) -> None:
        super().__init__(gm)
        self.watched = set(watched)
        self.sums: dict[fx.Node, torch.Tensor] = {}
        self.counts: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.watched and isinstance(out, torch.Tensor):
            x = out.detach()
            # (N, C, H, W) → (C, N·H·W); (N, C) → (C, N): one column per position the consumers read
            x = x.transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)
            gram = x @ x.T
            self.sums[n] = self.sums[n] + gram if n in self.sums else gram
            self.counts[n] = self.counts.get(n, 0) + x.shape[1]
        return out


def second_moments(gm: fx.GraphModule, nodes: Iterable[fx.Node], calibration: Any) -> dict[fx.Node, tuple[torch.Tensor, int]]:
    """``{node: (E[x xᵀ], positions)}`` of the channel vectors at ``nodes``, over ``calibration`` batches.

    Runs ``gm`` in eval mode under ``no_grad`` (restoring every module's mode afterwards) on its device.

    >>> import torch, torch.nn as nn
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    >>> node = next(n for n in gm.graph.nodes if n.op == "call_module")
    >>> sigma, n = second_moments(gm, [node], [torch.ones(2, 3, 4, 4)])[node]
    >>> n, sigma[0, 0].item()
    (32, 1.0)
    """
    nodes = list(nodes)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    device = next((t.device for t in (*gm.parameters(), *gm.buffers())), None)
    collector = _MomentCollector(gm, nodes)
    seen = 0
    with eval_modes(gm), torch.no_grad():
        for i, batch in enumerate(_batches(calibration)):
            if len(batch) > len(placeholders):
                raise SurgeryError(
                    f"concat_fusion: calibration batch {i} has {len(batch)} elements but the model takes "
                    f"{len(placeholders)} input(s); pass the inputs only (e.g. `(x for x, _ in loader)`)"
                )
            if device is not None and device.type != "meta":
                batch = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in batch)
            try:
                collector.run(*batch)
            except SurgeryError:
                raise
            except Exception as exc:
                shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in batch]
                raise SurgeryError(
                    f"concat_fusion: running calibration batch {i} (shapes {shapes}) failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            seen += 1
    if seen == 0:
        raise SurgeryError("concat_fusion: calibration is empty: give at least one batch of inputs")
    return {n: (collector.sums[n] / collector.counts[n], collector.counts[n]) for n in nodes if n in collector.sums}


# ---------------------------------------------------------------------------------------------- building


def _free_name(gm: fx.GraphModule, scope: str, base: str) -> str:
    prefix = f"{scope}." if scope else ""
    for i in range(10_000):
        name = f"{prefix}{base}" + (f"_{i}" if i else "")
        try:
            gm.get_submodule(name)
        except AttributeError:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            try:
                holder = gm.get_submodule(parent) if parent else gm
            except AttributeError:
                return name  # add_submodule creates the missing containers
            if not hasattr(holder, name.rsplit(".", 1)[-1]):
                return name
    raise SurgeryError(f"no free module name for a fusion conv under '{scope}'")  # pragma: no cover


def _add_module(gm: fx.GraphModule, scope: str, base: str, module: nn.Module) -> str:
    name = _free_name(gm, scope, base)
    if not gm.add_submodule(name, module):  # the scope path is not a module tree: put it at the root
        name = _free_name(gm, "", base)
        gm.add_submodule(name, module)
    return name


def _identity_conv(channels: int, dtype: torch.dtype, device: torch.device) -> nn.Conv2d:
    # skip_init: a random init of a C×C weight that is overwritten at once costs more than the whole pass
    conv = torch.nn.utils.skip_init(nn.Conv2d, channels, channels, 1, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        conv.weight.zero_().view(channels, channels).fill_diagonal_(1)
    return conv


def _consumer_macs(node: fx.Node, mod: nn.Module, in_channels: int) -> int:
    """MACs per sample of ``mod`` at ``node`` with ``in_channels`` input channels."""
    out = _meta_shape(node) or ()
    if isinstance(mod, nn.Conv2d):
        kh, kw = mod.kernel_size
        return mod.out_channels * (in_channels // mod.groups) * kh * kw * math.prod(out[2:])
    return mod.out_features * in_channels * math.prod(out[1:-1])


def _consumer_params(mod: nn.Module, in_channels: int) -> int:
    w = mod.weight
    per_in = w.numel() // w.shape[1]
    bias = mod.bias.numel() if getattr(mod, "bias", None) is not None else 0
    return per_in * in_channels + bias


def _narrowed(mod: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A copy of conv/linear ``mod`` (same class, hyper-parameters, bias, mode) reading ``weight.shape[1]`` channels."""
    new = copy.deepcopy(mod)
    new.weight = nn.Parameter(weight.to(dtype=mod.weight.dtype, device=mod.weight.device),
                              requires_grad=mod.weight.requires_grad)
    if isinstance(new, nn.Conv2d):
        new.in_channels = weight.shape[1]
    else:
        new.in_features = weight.shape[1]
    return new


def _describe_concat(concat: Concat) -> str:
    return f"cat({'+'.join(map(str, concat.inputs))}→{concat.channels})"


def _check_options(mode: str, out_channels: Any, ratio: Any, force: bool) -> None:
    if not isinstance(mode, str) or mode not in ("identity", "reduce"):
        raise OptionError(f"concat_fusion: mode must be 'identity' or 'reduce', got {mode!r}")
    if not isinstance(force, bool):
        raise OptionError(f"concat_fusion: force must be True or False, got {force!r}")
    if mode == "identity":
        given = [k for k, v in (("out_channels", out_channels), ("ratio", ratio)) if v is not None]
        if given or force:
            raise OptionError(
                f"concat_fusion: {', '.join(given) or 'force'} only applies to mode='reduce' "
                "(identity mode keeps every channel)"
            )
        return
    if not isinstance(force, bool):
        raise OptionError(f"concat_fusion: force must be True or False, got {force!r}")
    if (out_channels is None) == (ratio is None):
        raise OptionError("concat_fusion: mode='reduce' needs exactly one of out_channels= or ratio=")
    if out_channels is not None and (isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1):
        raise OptionError(f"concat_fusion: out_channels must be an int >= 1, got {out_channels!r}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
        raise OptionError(f"concat_fusion: ratio must be a number in (0, 1], got {ratio!r}")


@dataclass(frozen=True)
class ConcatFusionOptions(PassOptions):
    """Options of the :func:`concat_fusion` pass (frozen; build one with keywords or :meth:`from_dict`).

    Attributes:
        mode: ``"identity"``: ``Conv2d(C, C, 1, bias=False)`` set to the identity after the concat (exact,
            C²·H·W more MACs per sample). ``"reduce"``: ``Conv2d(C, r, 1, bias=False)`` before the concat's
            first channel-mixing consumers, which are narrowed to r input channels.
        out_channels: r for every concat (``mode="reduce"``); concats with C ≤ r are skipped.
        ratio: instead, r = round(ratio·C) per concat.
        calibration: input batches for the whole model (an iterable of tensors or tuples of positional inputs;
            a single tensor is one batch). With them, ``reduce`` keeps the subspace that preserves the
            consumers' output on that data instead of their weights. ``convert(calibration=...)`` fills this
            in unless the pass options set it (``calibration=None`` there forces data-free weights).
            Identity mode ignores it.
        force: reduce even where the fusion conv plus the narrowed consumers cost as many MACs as before or
            more (skipped by default, with the figures).
        exclude: fnmatch patterns of concats to leave alone, matched against the record target
            (``"<module>:<node>"``), the enclosing module's name and the node name.
    """

    pass_name: ClassVar[str] = "concat_fusion"

    mode: str = "identity"
    out_channels: int | None = None
    ratio: float | None = None
    calibration: Any = None
    force: bool = False
    exclude: Iterable[str] | None = None

    def validate(self) -> None:
        _check_options(self.mode, self.out_channels, self.ratio, self.force)
        exclude = self.exclude
        if isinstance(exclude, str):
            exclude = [exclude]
        if exclude is not None and not isinstance(exclude, Iterable):
            raise OptionError(f"concat_fusion: exclude must be a list of fnmatch patterns, got {exclude!r}",
                              key="exclude")
        exclude = list(exclude or ())
        for i, pattern in enumerate(exclude):
            if not isinstance(pattern, str):
                raise OptionError(f"concat_fusion: exclude[{i}] must be a string (an fnmatch pattern of qualified "
                                  f"names), got {type(pattern).__name__}: {pattern!r}", key="exclude")
        object.__setattr__(self, "exclude", exclude)


@register_pass(order=200, needs_shapes=True, default=False, options=ConcatFusionOptions)
def concat_fusion(gm: fx.GraphModule, options: ConcatFusionOptions | None = None, /, **kwargs: Any) -> PassResult:
    """Add a 1×1 fusion conv after every channel concatenation: exact identity, or channel-reducing.

    Needs ``ShapeProp`` shapes (``convert(..., example_inputs=...)``). Off by default: identity mode adds cost.

    Args:
        gm: the traced model, edited in place.
        options: a :class:`ConcatFusionOptions`, or its fields as keyword arguments (not both).

    Returns:
        A :class:`PassResult`. Rewrites name the concat (``"<module>:<node>"``); their details carry the new
        module(s), channels, MACs and parameters per sample before/after (identity: ``added_macs``,
        ``added_params``) and, for ``reduce``, each fusion site's rank, discarded energy and relative error.

    >>> import torch, torch.nn as nn
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> class Fuse(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.mix = nn.Conv2d(96, 48, 1)
    ...     def forward(self, a, b):
    ...         return self.mix(torch.cat([a, b], 1))
    >>> gm = torch.fx.symbolic_trace(Fuse())
    >>> _ = ShapeProp(gm).propagate(torch.randn(1, 32, 16, 16), torch.randn(1, 64, 16, 16))
    >>> res = concat_fusion(gm)
    >>> res.rewrites[0].exact, res.rewrites[0].details["added_params"]
    (True, 9216)
    """
    o = ConcatFusionOptions.coerce(options, kwargs)
    mode, out_channels, ratio, calibration, force, exclude = (o.mode, o.out_channels, o.ratio, o.calibration,
                                                              o.force, o.exclude)
    concats, skipped = find_concats(gm, exclude=exclude or ())
    if mode == "identity":
        return _identity(gm, concats, skipped)
    return _reduce(gm, concats, skipped, out_channels, ratio, calibration, force)


def _identity(gm: fx.GraphModule, concats: list[Concat], skipped: list[Skip]) -> PassResult:
    rewrites: list[Rewrite] = []
    device = device_or_cpu(gm)
    params = list(gm.parameters())
    trainable = not params or any(p.requires_grad for p in params)  # a frozen model gets frozen fusions
    for concat in concats:
        c = concat.channels
        conv = _identity_conv(c, concat.dtype, device)
        conv.train(gm.training)
        conv.weight.requires_grad_(trainable)
        name = _add_module(gm, concat.scope, "concat_fusion", conv)
        node = concat.node
        with gm.graph.inserting_after(node):
            fused = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(fused, delete_user_cb=lambda user: user is not fused)  # noqa: B023
        positions = math.prod(concat.shape[2:])
        rewrites.append(Rewrite(
            concat.target, _describe_concat(concat), f"{_describe_concat(concat)} → {describe(conv)} identity",
            True,
            details={"mode": "identity", "node": node.name, "module": name, "channels": c, "inputs": concat.inputs,
                     "added_params": c * c, "added_macs": c * c * positions, "macs_per": "sample",
                     # the zeros of the identity multiply every channel: 0·Inf = NaN
                     "exact_for": "finite activations: an ±Inf in any concatenated channel makes every output "
                                  "channel NaN"},
        ))
    return PassResult(gm, rewrites, skipped, "concat_fusion")


@dataclass
class _Plan:
    concat: Concat
    r: int
    walk: _Walk
    sites: list[FusionSite]
    matrices: list[torch.Tensor]
    ranks: list[int]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int


def _reduce(
    gm: fx.GraphModule, concats: list[Concat], skipped: list[Skip], out_channels: int | None,
    ratio: float | None, calibration: Any, force: bool,
) -> PassResult:
    index = ModuleIndex(gm)
    plans: list[_Plan] = []
    for concat in concats:
        c = concat.channels
        r = out_channels if out_channels is not None else max(1, round(ratio * c))
        base = {"node": concat.node.name, "channels": c, "inputs": concat.inputs, "out_channels": r}
        if r >= c:
            skipped.append(Skip(concat.target, f"nothing to reduce: out_channels={r} ≥ the concat's {c} channels",
                                details=base))
            continue
        walk, why = _walk(index, concat)
        sites = _placements(walk) if walk is not None else []
        if why is None and not sites:
            why = "no channel-mixing consumer reads it"
        if why:
            skipped.append(Skip(concat.target, f"cannot reduce: {why}", details=base))
            continue
        macs_before = sum(_consumer_macs(k.node, k.module, c) for s in sites for k in s.consumers)
        macs_after = sum(r * c * s.positions + sum(_consumer_macs(k.node, k.module, r) for k in s.consumers)
                         for s in sites)
        params_before = sum(_consumer_params(k.module, c) for s in sites for k in s.consumers)
        params_after = sum(r * c + sum(_consumer_params(k.module, r) for k in s.consumers) for s in sites)
        figures = {**base, "macs_before": macs_before, "macs_after": macs_after, "params_before": params_before,
                   "params_after": params_after, "macs_per": "sample",
                   "consumers": [k.name for s in sites for k in s.consumers]}
        if macs_after >= macs_before and not force:
            skipped.append(Skip(
                concat.target,
                f"reduction costs more: 1×1 fusion {c}→{r} plus narrowed consumers = {macs_after:,} MACs vs "
                f"{macs_before:,} before, {params_after:,} vs {params_before:,} parameters (force=True applies it)",
                details=figures,
            ))
            continue
        matrices = [stack_consumer_weights([k.module.weight for k in s.consumers]) for s in sites]
        ranks = [numerical_rank(torch.linalg.svdvals(m), tuple(m.shape), s.consumers[0].module.weight.dtype)
                 for m, s in zip(matrices, sites)]
        plans.append(_Plan(concat, r, walk, sites, matrices, ranks, macs_before, macs_after, params_before,
                           params_after))

    moments: dict[fx.Node, tuple[torch.Tensor, int]] = {}
    if calibration is not None:
        needed = [s.feed for p in plans for s, rank in zip(p.sites, p.ranks) if p.r < rank]
        if needed:
            moments = second_moments(gm, needed, calibration)

    rewrites: list[Rewrite] = []
    for plan in plans:
        rewrites.append(_apply(gm, plan, moments))
    return PassResult(gm, rewrites, skipped, "concat_fusion")


def _replay(gm: fx.GraphModule, walk: _Walk, node: fx.Node, replayed: dict[fx.Node, fx.Node]) -> fx.Node:
    """``node`` recomputed from the fusion's output: the commuting ops between the fusion site and ``node``
    copied onto the narrow tensor (memoised in ``replayed``, which maps the site to the fusion node). The
    originals stay for any other reader and are erased in :func:`_erase_unused`."""
    if node in replayed:
        return replayed[node]
    parent = walk.parent[node]
    new_parent = _replay(gm, walk, parent, replayed)
    with gm.graph.inserting_after(node):
        copy_ = gm.graph.node_copy(node, lambda a: new_parent if a is parent else a)
    replayed[node] = copy_
    return copy_


def _erase_unused(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase the replayed originals that nothing reads any more (latest first, so chains fall together)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(nodes, key=lambda n: order.get(n, -1), reverse=True):
        if node in order and not node.users:
            gm.graph.erase_node(node)


def _apply(gm: fx.GraphModule, plan: _Plan, moments: dict[fx.Node, tuple[torch.Tensor, int]]) -> Rewrite:
    concat, r, c = plan.concat, plan.r, plan.concat.channels
    site_details, modules, narrowed = [], [], []
    discarded = total = 0.0
    for site, matrix in zip(plan.sites, plan.matrices):
        first = site.consumers[0].module
        sigma, samples = moments.get(site.feed, (None, 0))
        factors: FusionFactors = fusion_factors(matrix, r, second_moment=sigma, rank_dtype=first.weight.dtype)
        new_weights = unstack_consumer_weights(factors.consumer, [k.module.weight.shape for k in site.consumers])
        factory = {"device": first.weight.device, "dtype": first.weight.dtype}
        if len(_meta_shape(site.feed) or ()) == 4:
            fusion: nn.Module = torch.nn.utils.skip_init(nn.Conv2d, c, r, 1, bias=False, **factory)
            weight = factors.fusion.view(r, c, 1, 1)
        else:
            fusion = torch.nn.utils.skip_init(nn.Linear, c, r, bias=False, **factory)
            weight = factors.fusion
        with torch.no_grad():
            fusion.weight.copy_(weight.to(**factory))
        fusion.train(first.training)
        fusion.weight.requires_grad_(first.weight.requires_grad)
        name = _add_module(gm, concat.scope, "concat_fusion", fusion)
        with gm.graph.inserting_after(site.feed):
            fused = gm.graph.call_module(name, (site.feed,))
        replayed = {site.feed: fused}
        for consumer, w in zip(site.consumers, new_weights):
            consumer.node.replace_input_with(consumer.reads, _replay(gm, plan.walk, consumer.reads, replayed))
            new = _narrowed(consumer.module, w)
            for alias in consumer.names:
                replace_module(gm, alias, new)
            narrowed.append(describe(new))
        _erase_unused(gm, [n for n in replayed if n is not site.feed and n not in replayed.values()])
        modules.append(name)
        discarded += factors.discarded_energy
        total += factors.discarded_energy + factors.kept_energy
        detail = {
            "module": name, "after_node": site.feed.name, "consumers": [k.name for k in site.consumers],
            "replayed": [n.name for n in replayed if n is not site.feed],
            "rank": factors.rank, "exact": factors.exact, "weighting": factors.weighting,
            "kept_energy": factors.kept_energy, "discarded_energy": factors.discarded_energy,
            "relative_error": factors.relative_error,
        }
        if sigma is not None:
            detail.update(calibration_positions=samples, output_relative_error=factors.weighted_relative_error)
        site_details.append(detail)
    exact = all(d["exact"] for d in site_details)
    consumers = ", ".join(describe(k.module) for s in plan.sites for k in s.consumers)
    fusions = f"{len(modules)}× " if len(modules) > 1 else ""
    after = f"{_describe_concat(concat)} → {fusions}fusion {c}→{r} 1x1 → {', '.join(narrowed)}"
    return Rewrite(
        concat.target, f"{_describe_concat(concat)} → {consumers}", after, exact,
        details={
            "mode": "reduce", "node": concat.node.name, "modules": modules, "channels": c, "inputs": concat.inputs,
            "out_channels": r, "macs_before": plan.macs_before, "macs_after": plan.macs_after,
            "params_before": plan.params_before, "params_after": plan.params_after, "macs_per": "sample",
            "discarded_energy": discarded,
            "relative_error": (discarded / total) ** 0.5 if total > 0 else 0.0,
            "sites": site_details,
        },
    )
