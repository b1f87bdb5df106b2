"""Walking from a concat to the channel mixers it feeds (convs, linears) through per-channel operations,
and where a fusion conv can sit.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...graph import describe, mutated_inputs, reads_values
from ...graph.index import ModuleIndex, SwapWording, swap_refusal
from ...graph.ops import (
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
from ...modules import depthwise_conv_class
from .match import Concat, meta_shape

__all__ = ["Consumer", "FusionSite", "Walk", "placements", "walk_to_mixers"]


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
    shape = meta_shape(node) or ()
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
class Walk:
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
        if len(meta_shape(feed) or ()) != 4:
            return f"{what} reads an unbatched or non-4-D tensor"
    else:
        if type(mod).forward is not nn.Linear.forward:
            return f"{what}: {type(mod).__qualname__} overrides forward (not a plain linear)"
        if len(meta_shape(feed) or ()) != 2:
            return f"{what} acts on the last axis of a {len(meta_shape(feed) or ())}-D tensor, not on channels"
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


def walk_to_mixers(index: ModuleIndex, concat: Concat) -> tuple[Walk | None, str | None]:
    """Consumers of ``concat`` reached through per-channel ops, or the reason it cannot be reduced.

    Scans the nodes after the concat in graph (topological) order; ``region`` holds the concat and the
    per-channel functions of it. Every user of the region must be a per-channel op, a shape query, or a
    foldable channel mixer; anything else stops the concat with the exact reason.
    """
    c, batch = concat.channels, concat.shape[0]
    region: set[fx.Node] = {concat.node}
    walk = Walk([], {}, {concat.node: concat.node})
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


def placements(walk: Walk) -> list[FusionSite]:
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
    in_shape = meta_shape(src) or ()
    out_shape = meta_shape(node)
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
