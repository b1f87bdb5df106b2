"""Rewriting a matched head: the Linear becomes a 1×1 conv on the pooled (N, C, 1, 1) tensor, or moves before
the pool (``fully_convolutional``), with the checks that keep it exact.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...graph import alias_classes, describe, mutated_inputs, reads_values, replace_module
from ...graph.index import ModuleIndex
from ...heads import conv1x1_from_linear_params, linear_to_conv1x1
from ..base import Rewrite, Skip
from .match import HeadMatch, is_bare_squeeze, linear_desc, linear_module_name, op_kind, unambiguous_flatten
from .nodes import (
    DROPOUT,
    ELEMENTWISE,
    FC_KINDS,
    IDENTITY,
    LINEAR,
    MAX_HEAD_DEPTH,
    POINTWISE,
    SHAPE,
    data_inputs,
    describe_node,
    is_static,
    is_timm_module,
    module_of,
    node_arg,
    node_shape,
)
from .pools import Gap, match_global_pool

__all__ = ["check_ranks", "fc_refusal", "head_segment", "rewrite_head", "tensor_rank"]


def head_segment(ctx: ModuleIndex, linear: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The nodes right before ``linear`` that commute with flattening (N, C, 1, 1) → (N, C), and where they start."""
    seg: list[fx.Node] = []
    cur = data_inputs(linear)[0]
    while op_kind(ctx, cur) in (IDENTITY, DROPOUT, SHAPE, ELEMENTWISE, LINEAR) and len(data_inputs(cur)) == 1 \
            and not isinstance(match_global_pool(ctx.gm, cur), Gap):
        seg.append(cur)
        cur = data_inputs(cur)[0]
    return cur, seg[::-1]


def _pooled_like(shape: tuple[int, ...]) -> bool:
    """(N, C) followed only by singleton dims: (N, C), (N, C, 1), (N, C, 1, 1)."""
    return 2 <= len(shape) <= 4 and all(d == 1 for d in shape[2:])


def check_ranks(ctx: ModuleIndex, source: fx.Node, source_rank: int | None, nodes: list[fx.Node],
                 linear: fx.Node) -> tuple[str | None, bool]:
    """Check that ``nodes`` take the pooled (N, C[, 1, 1]) tensor ``source`` to the classifier's (N, C) input.

    Returns (why not, None if fine; whether a bare ``squeeze()`` also drops the batch dim when N = 1).
    """
    rank = source_rank
    squeeze_batch = False
    for n in nodes:
        kind = op_kind(ctx, n)
        if kind == SHAPE:
            src = data_inputs(n)[0]
            i, o = node_shape(src), node_shape(n)
            if i is not None and o is not None:
                bare = is_bare_squeeze(n)
                if not _pooled_like(i) or (bare and i[1] == 1):
                    return f"{describe_node(ctx.gm, n)} reshapes a {list(i)} tensor, not a pooled (N, C, 1, 1) one", False
                if _pooled_like(o) and tuple(o[:2]) == tuple(i[:2]):
                    rank = len(o)
                elif bare and i[0] == 1 and tuple(o) == (i[1],):  # squeeze() of a batch of one
                    rank = 2
                else:
                    return f"{describe_node(ctx.gm, n)} maps {list(i)} to {list(o)}, not (N, C, 1, 1) to (N, C)", False
                squeeze_batch = squeeze_batch or bare
            elif rank == 4 and unambiguous_flatten(ctx, n):
                rank = 2
            else:
                return (f"{describe_node(ctx.gm, n)}: shapes are needed to tell what it does (pass example_inputs to "
                        "convert())"), False
        elif kind == LINEAR and rank != 2:
            return f"{describe_node(ctx.gm, n)} does not see an (N, C) tensor", False
        elif kind == POINTWISE and rank != 4:
            return f"{describe_node(ctx.gm, n)} does not see an (N, C, 1, 1) tensor", False
    if rank is None:
        return (f"the shape of {describe_node(ctx.gm, source)} is unknown: shapes are needed (pass example_inputs to "
                "convert())"), False
    if rank != 2:
        return f"the classifier at node '{linear.name}' does not see an (N, C) tensor", False
    return None, squeeze_batch


def tensor_rank(ctx: ModuleIndex, node: fx.Node, gap: Gap | None) -> int | None:
    """2, 3 or 4 for a pooled (N, C[, 1[, 1]]) tensor, -1 for anything else, None when unknown.

    From ShapeProp shapes when there are any, else followed structurally from the pool (:func:`_layout`).
    """
    shape = node_shape(node)
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
    if gap is None or depth > MAX_HEAD_DEPTH or node_shape(node) is not None:
        return None
    if node is gap.node:
        return (("N", "C", "1", "1") if gap.keep4d else ("N", "C")) if gap.structural else None
    ins = data_inputs(node)
    if len(ins) != 1:
        return None
    src = _layout(ctx, ins[0], gap, depth + 1)
    if src is None:
        return None
    kind = op_kind(ctx, node)
    if kind in (IDENTITY, DROPOUT, ELEMENTWISE):
        return src
    if kind == POINTWISE:
        return src if src == ("N", "C", "1", "1") else None
    if node.op == "call_method" and node.target == "permute":
        dims = _permutation(node, len(src))
        return tuple(src[d] for d in dims) if dims is not None else None
    if node.op == "call_function" and node.target is F.layer_norm:
        normalized = node_arg(node, 1, "normalized_shape")
        ok = (isinstance(normalized, (tuple, list)) and len(normalized) == 1) or isinstance(normalized, int)
        return src if ok and src[-1] == "C" else None
    if node.op == "call_module":
        mod = module_of(ctx.gm, node)
        if type(mod) is nn.BatchNorm2d or is_timm_module(mod, "LayerNorm2d") or is_timm_module(mod, "BatchNormAct2d"):
            return src if src == ("N", "C", "1", "1") else None
        if type(mod) is nn.LayerNorm and len(mod.normalized_shape) == 1:
            return src if src[-1] == "C" else None
    return None


def _swap_linear(ctx: ModuleIndex, node: fx.Node) -> tuple[str, str, nn.Conv2d]:
    """Put the 1×1 conv at the Linear's qualified name: (name, description of the Linear, the conv)."""
    name, _ = linear_module_name(ctx.gm, node)
    mod = ctx.gm.get_submodule(name)
    if isinstance(mod, nn.Linear):
        conv = linear_to_conv1x1(mod)
    else:  # the tensors of a Linear fx traced through (F.linear)
        conv = conv1x1_from_linear_params(mod.weight, getattr(mod, "bias", None))
        conv.train(mod.training)
    before = linear_desc(mod)
    replace_module(ctx.gm, name, conv)
    return name, before, conv


def _copy_on(graph: fx.Graph, node: fx.Node, new_input: fx.Node) -> fx.Node:
    """The operation of ``node`` applied to ``new_input`` instead of its tensor input."""
    old = data_inputs(node)[0]
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
        mod = module_of(ctx.gm, node)
        if mod.p == 0:
            return cur
        new = nn.Dropout2d(mod.p)
        new.train(mod.training)
        replace_module(ctx.gm, str(node.target), new)
        plan.setdefault("dropout", []).append(str(node.target))
        return graph.call_module(str(node.target), (cur,))
    p = node_arg(node, 1, "p", 0.5)
    training = node_arg(node, 2, "training" if node.target is F.dropout else "train", True)
    if p == 0 or training is False:
        return cur
    return graph.call_function(F.dropout2d, (cur,), {"p": p, "training": training})


def fc_refusal(ctx: ModuleIndex, match: HeadMatch) -> str | None:
    """Why the classifier cannot move before the pool exactly, or None."""
    blockers = [n for n in match.chain if op_kind(ctx, n) not in FC_KINDS]
    # name the operations that matter: permutes around a channels-last norm only come with it
    named = [n for n in blockers if not (n.op == "call_method" and n.target in ("permute", "transpose"))] or blockers
    if blockers:
        blockers = named
        what = ", ".join(describe_node(ctx.gm, n) for n in blockers[:4]) + (" …" if len(blockers) > 4 else "")
        return (f"{what} between the pool and the classifier "
                + ("is not a linear per-position operation" if len(blockers) == 1 else
                   "are not all linear per-position operations")
                + " (a norm or a nonlinearity does not commute with averaging)")
    for n in match.chain:
        if op_kind(ctx, n) == DROPOUT and n.op == "call_module":
            mod = module_of(ctx.gm, n)
            if mod.p > 0 and len(ctx.calls.get(str(n.target), [])) > 1:
                return f"dropout '{n.target}' is shared with other call sites: it cannot become channel dropout"
    shape = node_shape(match.gap.feature)
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
            return (f"{describe_node(gm, n)} writes in place to '{hit[0].name}', which the head reads (or a view of it): "
                    "moving the head's operations across it would change the result")
    for n in moved:
        for t in mutated_inputs(gm, n):
            readers = [u for m, c in classes.items() if c is classes[t] for u in m.users
                       if u not in inside and reads_values(u)]
            if readers:
                return (f"{describe_node(gm, n)} in the head writes in place to '{t.name}', which "
                        f"{describe_node(gm, readers[0])} also reads (or a view of it): moving it would change what that "
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
            todo += [i for i in ins if (i.op == "get_attr" or is_static(i)) and i not in todo]
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


def rewrite_head(ctx: ModuleIndex, match: HeadMatch, fully_convolutional: bool,
             shapes: str) -> tuple[list[Rewrite], list[Skip], dict[str, Any] | None]:
    """Swap the classifier (and the Linears of an MLP head) for 1×1 convs; the head description or None."""
    gm, graph = ctx.gm, ctx.gm.graph
    rewrites: list[Rewrite] = []
    skipped: list[Skip] = []
    gap, linear = match.gap, match.linear
    classifier = match.name
    num_classes, in_channels = ctx.gm.get_submodule(classifier).weight.shape
    between = [describe_node(gm, n) for n in match.chain if op_kind(ctx, n) not in (IDENTITY, SHAPE, DROPOUT)]
    details = {"pool": gap.form, "between": between, "shapes": shapes}

    if node_shape(linear) is None and in_channels == 1:
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
        refused = fc_refusal(ctx, match) or _mutation_refusal(ctx, gap.feature, [gap.node, *match.chain], linear)
        if refused is None:
            why, squeeze_batch = check_ranks(ctx, gap.node, tensor_rank(ctx, gap.node, gap), match.chain, linear)
            if why:
                refused = why
        if refused is not None:
            skipped.append(Skip(classifier, f"fully_convolutional refused: {refused}; the classifier was converted "
                                            "after the pool instead (exact)",
                                details={"pool": gap.form}))
    fc = fully_convolutional and refused is None

    # the Linears to swap: the classifier, and hidden Linears of an MLP head, classifier-side first
    hidden = [n for n in match.chain if op_kind(ctx, n) == LINEAR]
    plan: dict[str, Any] = {}
    old_nodes: list[fx.Node] = []
    swapped: list[tuple[str, str, nn.Conv2d, str]] = []
    if fc:
        with graph.inserting_before(linear):
            cur = gap.feature
            for n in match.chain:
                kind = op_kind(ctx, n)
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
            pool_mod = module_of(gm, gap.node)
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
            source, seg = head_segment(ctx, target)
            why, squeeze = check_ranks(ctx, source, tensor_rank(ctx, source, gap), seg, target)
            if why:
                if target is linear:
                    return [], [Skip(classifier, f"cannot rewrite the classifier: {why}",
                                     details={"pool": gap.form})], None
                skipped.append(Skip(linear_module_name(gm, target)[0] or target.name,
                                    f"hidden Linear of the head left as it is: {why}"))
                continue
            with graph.inserting_before(target):
                cur = source
                rank = tensor_rank(ctx, source, gap)
                if rank in (2, 3):  # (N, C) or (N, C, 1) → (N, C, 1, 1) for the conv
                    index = (slice(None),) * rank + (None,) * (4 - rank)
                    cur = graph.call_function(operator.getitem, (source, index))
                for n in seg:
                    kind = op_kind(ctx, n)
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
