"""Refitting layers in network order: frontier execution (block and ReLU-aware targets) or streaming (re-run
the models up to each layer, batch by batch), and BatchNorm re-estimation in either."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..runtime import to_device
from .data import forward_batch, sample_count
from .separable_stats import SeparableAccumulator
from .specs import LayerRefit, RefitSpec
from .stats import Accumulator, BNStats
from .stepper import Stepper, call_order, capture_module, containing_nodes
from .targets import (
    ReluTargets,
    block_targets,
    gives_output_of,
    layer_outputs,
    relu_after,
    residual_join,
)

#: relaxed-target refits after the plain one, for a layer before a ReLU (``calibrate(relu=True)``)
RELU_ROUNDS = 2
def _accumulator(spec: RefitSpec, module: nn.Module, samples: int | None = None) -> Any:
    if spec.kind == "separable":
        return SeparableAccumulator(spec, module, samples)
    return Accumulator(spec, module, samples)


def _fill(acc: Any, cs: Stepper, node: fx.Node, layer: nn.Module, ys_all: list[list[Any]],
          relu: ReluTargets | None = None, relax: bool = False) -> Any:
    """Feed ``acc`` every batch's layer inputs (from the converted model) and targets; stops with a reason.

    With ``relu``, the node runs whole and its output goes through ``relu`` (its error is measured); with
    ``relax`` too, the relaxed targets are the ones fed.
    """
    count = None
    for i, ys in enumerate(ys_all):
        out: list[Any] = []
        xs = capture_module(layer, lambda i=i, out=out: out.append(cs.call(node, i)), inputs=True,
                      stop_after=None if relu is not None else count)
        if relu is not None:
            relaxed = relu(i, ys, out[0] if out else None)
            ys = relaxed if relax else ys
        if count is None:
            count = len(xs)
        if len(xs) != len(ys) or not xs:
            acc.info.reason = (f"called {len(xs)}× in the converted model but {len(ys)}× in the "
                               "original: cannot pair inputs with targets")
            break
        if not all(isinstance(y, torch.Tensor) for y in ys) or not all(acc.add(x, y) for x, y in zip(xs, ys)):
            acc.info.reason = acc.info.reason or "the original module does not return a tensor"
            break
    return acc


def _relu_rounds(cs: Stepper, rs: Stepper, node: fx.Node, s: RefitSpec, layer: nn.Module, plain: Any,
                 ys_all: list[list[Any]], relu_at: tuple, before: ReluTargets, saved: dict[str, torch.Tensor],
                 info: LayerRefit, ridge: float, samples: int) -> None:
    """After the plain fit, refit :data:`RELU_ROUNDS` times to targets relaxed where the original's ReLU outputs
    zero, each around the current output (alternating minimisation; the inputs, so the Gram matrix of the plain
    fit ``plain``, stay the same). ``info`` then reports the errors as the ReLU sees them, from ``before`` (the
    data-free weights) to the final ones; ``saved`` weights come back when that error did not fall."""
    for _ in range(RELU_ROUNDS):
        nxt = _accumulator(s, layer, samples)
        nxt.reuse_gram(plain)
        _fill(nxt, cs, node, layer, ys_all, ReluTargets(rs, *relu_at), relax=True).finish(ridge)
    after = layer_outputs(cs, node, ys_all, ReluTargets(rs, *relu_at)).error
    if after is None:
        return
    if after >= before.error:
        layer.load_state_dict(saved)
        after = before.error
    info.error_before, info.error_after = before.error, after
    info.relu_relaxed = before.dead / max(before.total, 1)
    info.refit = after < before.error
    info.reason = "" if info.refit else "the refit did not lower the error; weights kept"


def refit_frontier(
    converted: fx.GraphModule, reference: fx.GraphModule, batches: Sequence[tuple], specs: Sequence[RefitSpec],
    ridge: float, block: bool = False, relu: bool = False,
) -> tuple[list[LayerRefit], list[Any], list[Any]]:
    """Refit ``specs`` (in network order) with one node-by-node pass over each model.

    With ``block``, a layer whose output joins a residual sum (through at most a BatchNorm) is refit to
    make the *sum* match the original's (:func:`block_targets`), not its own output. With ``relu``, a layer
    whose output (or sum) reaches a ReLU is asked only for what the ReLU passes on (:func:`_relax_for_relu`).
    Returns the per-layer results, and the converted (refit) and reference outputs per batch.
    """
    cs, rs = Stepper(converted, batches), Stepper(reference, batches)
    results: list[LayerRefit] = []
    by_node: dict[fx.Node, list[RefitSpec]] = {}
    ref_last: dict[str, int] = {}
    ref_index = {n: i for i, n in enumerate(rs.nodes)}
    joins: dict[str, tuple] = {}
    relus: dict[str, tuple] = {}
    for s in specs:
        sites = containing_nodes(converted, s.layer)
        ref_sites = containing_nodes(reference, s.reference)
        if len(sites) != 1:
            why = "not called by the graph" if not sites else f"called from {len(sites)} graph nodes (shared)"
            results.append(LayerRefit(s.target, s.layer, s.reference, reason=why))
        elif not ref_sites:
            results.append(LayerRefit(s.target, s.layer, s.reference,
                                      reason="the original module is not called by the original's graph"))
        else:
            by_node.setdefault(sites[0], []).append(s)
            ref_last[s.layer] = max(ref_index[n] for n in ref_sites)
            whole = len(ref_sites) == 1 and gives_output_of(converted, sites[0], s.layer)
            if block and whole:
                c_join, r_join = residual_join(converted, sites[0]), residual_join(reference, ref_sites[0])
                if c_join is not None and r_join is not None:
                    joins[s.layer] = (c_join, r_join)
            if relu and whole:
                c_relu, r_relu = relu_after(converted, sites[0]), relu_after(reference, ref_sites[0])
                if c_relu is not None and r_relu is not None:
                    relus[s.layer] = (r_relu[0], c_relu[1])  # the original's ReLU input, the running BN's scale
    targets: dict[str, list[list[torch.Tensor]]] = {}
    handles = []
    for specs_here in by_node.values():
        for s in specs_here:
            targets[s.layer] = [[] for _ in batches]

            def hook(mod, args, out, key=s.layer):
                if rs.stepping:  # not when a later layer's targets recompute this module's node
                    targets[key][rs.batch].append(out.detach() if isinstance(out, torch.Tensor) else out)

            handles.append(reference.get_submodule(s.reference).register_forward_hook(hook))
    try:
        for node in cs.nodes:
            for s in by_node.get(node, []):
                while rs.pos <= ref_last[s.layer]:
                    rs.step()
                layer = converted.get_submodule(s.layer)
                block_kind = s.layer in joins and block_targets(cs, rs, *joins[s.layer], targets[s.layer])
                ys_all = targets.pop(s.layer)
                relu_at = relus.get(s.layer)
                before = ReluTargets(rs, *relu_at) if relu_at is not None else None
                saved = {k: v.clone() for k, v in layer.state_dict().items()} if before is not None else None
                acc = _fill(_accumulator(s, layer, sample_count(batches)), cs, node, layer, ys_all, before)
                info = acc.finish(ridge)
                info.target_kind = "block" if block_kind else "layer"
                if before is not None and before.error is not None and info.error_before is not None:
                    _relu_rounds(cs, rs, node, s, layer, acc, ys_all, relu_at, before, saved, info, ridge,
                                 sample_count(batches))
                results.append(info)
            cs.step()
        ref_out = rs.run_to_end()
    finally:
        for h in handles:
            h.remove()
    return results, cs.outputs, ref_out


def bn_frontier(converted: fx.GraphModule, batches: Sequence[tuple], names: Sequence[str]) -> tuple[int, list[Any]]:
    """Re-estimate BatchNorm statistics exactly, in network order, with one node-by-node pass."""
    cs = Stepper(converted, batches)
    order = {n: i for i, n in enumerate(call_order(converted, batches[0], names))} if names else {}
    by_node: dict[fx.Node, list[str]] = {}
    for n in names:
        sites = containing_nodes(converted, n)
        if len(sites) == 1:  # a BatchNorm shared between call sites keeps its statistics
            by_node.setdefault(sites[0], []).append(n)
    done = 0
    for node in cs.nodes:
        for n in sorted(by_node.get(node, []), key=lambda n: order.get(n, 0)):
            bn = converted.get_submodule(n)
            stats = BNStats(bn)
            count = None
            for i in range(len(batches)):
                xs = capture_module(bn, lambda i=i, node=node: cs.call(node, i), inputs=True, stop_after=count)
                count = count or len(xs)
                for x in xs:
                    stats.add(x)
            stats.finish()
            done += 1
        cs.step()
    return done, cs.outputs


def refit_streaming(
    converted: nn.Module, reference: nn.Module, batches: Sequence[tuple], spec: RefitSpec, ridge: float,
    device: torch.device | None,
) -> LayerRefit:
    """Refit one layer by running both models on every batch up to the layer (for models fx cannot step)."""
    layer = converted.get_submodule(spec.layer)
    ref_mod = reference.get_submodule(spec.reference)
    acc = _accumulator(spec, layer, sample_count(batches))
    counts: tuple[int, int] | None = None
    for batch in batches:
        batch = to_device(batch, device)
        # the first batch runs whole, to learn how often each side calls its module; later ones stop early
        ys = capture_module(ref_mod, lambda b=batch: forward_batch(reference, b, "the original model"), inputs=False,
                      stop_after=counts[0] if counts else None)
        xs = capture_module(layer, lambda b=batch: forward_batch(converted, b, "the converted model"), inputs=True,
                      stop_after=counts[1] if counts else None)
        if counts is None:
            counts = (len(ys), len(xs))
        if len(xs) != len(ys) or not xs:
            acc.info.reason = (f"called {len(xs)}× in the converted model but {len(ys)}× in the original: "
                               "cannot pair inputs with targets")
            break
        if not all(acc.add(x, y) for x, y in zip(xs, ys)):
            break
    return acc.finish(ridge)


def bn_streaming(model: nn.Module, batches: Sequence[tuple], names: Sequence[str], device: torch.device | None) -> int:
    """Exact BatchNorm statistics in network order, one pass over the data per BatchNorm (no fx needed)."""
    done = 0
    for n in call_order(model, to_device(batches[0], device), names):
        bn = model.get_submodule(n)
        stats = BNStats(bn)
        count = None
        for b in batches:
            b = to_device(b, device)
            xs = capture_module(bn, lambda b=b: forward_batch(model, b, "the converted model"), inputs=True, stop_after=count)
            count = count or len(xs)
            for x in xs:
                stats.add(x)
        stats.finish()
        done += 1
    return done
