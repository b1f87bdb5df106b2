"""Matching classifiers: each Linear (or MLP head) fed by a global pool through per-position operations only,
with the reason for every Linear that is not.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...graph import describe
from ...graph.index import ModuleIndex, SwapWording, swap_refusal
from ...graph.ops import (
    ACTIVATION_METHODS,
    DROPOUT_FUNCTIONS,
    IDENTITY_METHODS,
    RESHAPE_FUNCTIONS,
    RESHAPE_METHODS,
)
from ...heads import linear_refusal
from ..base import Skip
from .nodes import (
    DROPOUT,
    ELEMENTWISE,
    ELEMENTWISE_FUNCS,
    ELEMENTWISE_MODULES,
    IDENTITY,
    LINEAR,
    MAX_HEAD_DEPTH,
    OTHER,
    POINTWISE,
    SHAPE,
    data_inputs,
    describe_node,
    is_batch_size,
    is_timm_module,
    module_of,
    node_arg,
    node_shape,
)
from .pools import Gap, is_max_pool, match_global_pool, max_pool_reason, token_reason

__all__ = [
    "HeadMatch", "expand_classifier_head", "find_heads", "is_bare_squeeze", "linear_desc", "linear_module_name",
    "op_kind", "unambiguous_flatten",
]


def linear_module_name(gm: fx.GraphModule, node: fx.Node) -> tuple[str | None, str | None]:
    """(qualified name of the nn.Linear computed by ``node``, None) or (None, why it is not one we can swap).

    ``(None, None)`` means ``node`` is not a Linear at all.
    """
    if node.op == "call_module":
        mod = module_of(gm, node)
        return (str(node.target), None) if isinstance(mod, nn.Linear) else (None, None)
    if node.op == "call_function" and node.target is F.linear:
        weight, bias = node_arg(node, 1, "weight"), node_arg(node, 2, "bias")
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


def linear_desc(mod: nn.Module) -> str:
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


def op_kind(ctx: ModuleIndex, node: fx.Node) -> str:
    """What an operation between a pool and a classifier does to the (N, C[, 1, 1]) tensor."""
    if node.op == "call_module":
        mod = module_of(ctx.gm, node)
        if isinstance(mod, nn.Identity):
            return IDENTITY
        if type(mod) is nn.Dropout:
            return DROPOUT
        if isinstance(mod, nn.Flatten):
            return SHAPE
        if type(mod) in ELEMENTWISE_MODULES:  # exact types: a subclass may compute something else
            return ELEMENTWISE
        if isinstance(mod, nn.Linear):
            name, _ = linear_module_name(ctx.gm, node)
            return LINEAR if name and not _linear_refusal(ctx, node, name) and len(node.users) == 1 else OTHER
        if type(mod) is nn.Conv2d and mod.kernel_size == (1, 1) and mod.stride == (1, 1) \
                and mod.padding in ((0, 0), "valid") and mod.dilation == (1, 1):
            return POINTWISE
        return OTHER
    if node.op == "call_function":
        if node.target in DROPOUT_FUNCTIONS:
            return DROPOUT
        if node.target in ELEMENTWISE_FUNCS:
            return ELEMENTWISE
        if node.target in RESHAPE_FUNCTIONS:
            return SHAPE
        if node.target is operator.getitem and node.args[1] == (slice(None), slice(None), 0, 0):
            return SHAPE
        if node.target is F.linear:
            name, _ = linear_module_name(ctx.gm, node)
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


def unambiguous_flatten(ctx: ModuleIndex, node: fx.Node) -> bool:
    """Without shapes: an op that maps (N, C, 1, 1) to (N, C) whatever N and C are."""
    if node.op == "call_module":
        mod = module_of(ctx.gm, node)
        return isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        return node_arg(node, 1, "start_dim", 0) == 1 and node_arg(node, 2, "end_dim", -1) == -1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = node.args[1:] if len(node.args) > 2 else (node.args[1] if len(node.args) == 2 else ())
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        return len(shape) == 2 and is_batch_size(shape[0]) and shape[1] == -1
    if node.op == "call_function" and node.target is torch.reshape:
        shape = node_arg(node, 1, "shape")
        return isinstance(shape, (tuple, list)) and len(shape) == 2 and is_batch_size(shape[0]) and shape[1] == -1
    return False


def is_bare_squeeze(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target == "squeeze") or (
        node.op == "call_function" and node.target is torch.squeeze)) and len(node.args) == 1 and not node.kwargs


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
        mod = module_of(gm, node)
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
    ins = data_inputs(linear)
    if len(ins) != 1:
        return None, [], f"the classifier at node '{linear.name}' takes {len(ins)} tensor inputs"
    cur = ins[0]
    for _ in range(MAX_HEAD_DEPTH):
        gap = match_global_pool(gm, cur)
        if isinstance(gap, Gap):
            if gap.feature is None:
                return None, chain[::-1], f"{gap.form} has no tensor input"
            return gap, chain[::-1], None
        if isinstance(gap, str):
            return None, chain[::-1], gap
        token = token_reason(gm, cur)
        if token:
            return None, chain[::-1], token
        if cur.op == "placeholder":
            return None, chain[::-1], f"fed by the {describe_node(gm, cur)}, not by a global average pool of a feature map"
        ins = data_inputs(cur)
        in_shape, out_shape = (node_shape(ins[0]) if len(ins) == 1 else None), node_shape(cur)
        if op_kind(ctx, cur) == SHAPE and in_shape is not None and out_shape is not None and len(in_shape) == 4 \
                and len(out_shape) == 2 and in_shape[2] * in_shape[3] > 1:
            pool = match_global_pool(gm, ins[0])
            if isinstance(pool, str):  # a pool that is not global (VGG's AdaptiveAvgPool2d((7, 7))): say that
                return None, chain[::-1], pool
            return None, chain[::-1], (
                f"the classifier reads a flattened {list(in_shape)} map ({describe_node(gm, cur)} of {describe_node(gm, ins[0])}): "
                "there is no global pool before it")
        if len(ins) != 1:
            maxed = [i for i in ins if is_max_pool(gm, i)]
            if maxed:
                return None, chain[::-1], max_pool_reason(f"{describe_node(gm, maxed[0])} combined by {describe_node(gm, cur)}, e.g. "
                                                      "avg+max pooling")
            what = f"combines {len(ins)} tensors" if ins else "has no tensor input"
            return None, chain[::-1], f"not fed by a global average pool: {describe_node(gm, cur)} {what} on the way"
        chain.append(cur)
        cur = ins[0]
    return None, chain[::-1], f"no global average pool within {MAX_HEAD_DEPTH} operations before the classifier"


def _contains_linear(mod: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in mod.modules())


def expand_classifier_head(gm: fx.GraphModule) -> None:
    """Inline timm ``ClassifierHead`` leaf modules with an average pool and a Linear, so the Linear is visible.

    ``ClassifierHead.forward`` is ``flatten(fc(drop(global_pool(x))))``; calling those four submodules in turn
    computes the same thing, and the graph then shows the pool and the Linear to the matcher.
    """
    for node in _output_frontier(gm):
        mod = module_of(gm, node)
        if mod is None or not is_timm_module(mod, "ClassifierHead") or node.kwargs or len(node.args) != 1:
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
        name, why = linear_module_name(gm, n)
        if name:
            linears.append((n, name))
        elif why:
            skipped.append(Skip(n.name, why))
        else:
            mod = module_of(gm, n)
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
        if not skipped and any(linear_module_name(gm, n)[0] for n in gm.graph.nodes):
            skipped.append(Skip("", (
                "no classifier: every Linear in the graph has another layer with weights after it ("
                + ", ".join(describe_node(gm, n) for n in frontier[:3]) + " reach the output)")))
        return [], skipped
    node, name = linears[0]
    why = _linear_refusal(ctx, node, name)
    if why:
        return [], [*skipped, Skip(name, why, details={"module": linear_desc(gm.get_submodule(name))})]
    gap, chain, reason = _walk_to_pool(ctx, node)
    if gap is None:
        return [], [*skipped, Skip(name, reason or "not fed by a global average pool",
                                   details={"module": linear_desc(gm.get_submodule(name))})]
    return [HeadMatch(node, name, gap, chain)], skipped
