"""Building the fusion: the identity 1×1 conv (exact), or the reducing conv with the narrowed consumers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ...errors import SurgeryError
from ...forms.fusion_math import (
    FusionFactors,
    fusion_factors,
    numerical_rank,
    stack_consumer_weights,
    unstack_consumer_weights,
)
from ...graph import describe, replace_module
from ...graph.index import ModuleIndex
from ...runtime import device_or_cpu
from ..base import PassResult, Rewrite, Skip
from .match import Concat, meta_shape
from .moments import second_moments
from .walk import FusionSite, Walk, placements, walk_to_mixers

__all__ = ["identity_fusions", "reduce_concats"]


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
    out = meta_shape(node) or ()
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


def identity_fusions(gm: fx.GraphModule, concats: list[Concat], skipped: list[Skip]) -> PassResult:
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
    walk: Walk
    sites: list[FusionSite]
    matrices: list[torch.Tensor]
    ranks: list[int]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int


def reduce_concats(
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
        walk, why = walk_to_mixers(index, concat)
        sites = placements(walk) if walk is not None else []
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


def _replay(gm: fx.GraphModule, walk: Walk, node: fx.Node, replayed: dict[fx.Node, fx.Node]) -> fx.Node:
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
        if len(meta_shape(site.feed) or ()) == 4:
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
