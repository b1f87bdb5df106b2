"""Separable pass: each standard k×k conv → depthwise k×k + pointwise 1×1, keeping the trained weights.

Matches every ``nn.Conv2d`` with ``groups == 1`` and a k×k kernel (k in ``kernel_sizes``; 3×3 by default)
that the traced forward calls, whatever its stride, padding (``"same"`` too), dilation, ``padding_mode`` and
bias, including convs inside leaf modules (swapped by qualified name; the graph need not change). Emits a
:class:`~fxsurgeon.modules.SeparableConv2d` at the same qualified name; a module registered under several
names or called at several sites is converted once and stays shared.

Weights come from a per-input-channel truncated SVD (:func:`fxsurgeon.forms.decompose.separable_factors`): exact
when the multiplier reaches ``min(C_out, k²)``, otherwise the best approximation at that multiplier, with
the discarded energy in the record. Every other conv is accounted for as a skip with its reason.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ...budget.allotment import allot, layer_positions
from ...budget.latency import LatencyJudge
from ...forms.importance import (
    bn_channel_scales,
    correct_mean_shift,
    input_channel_mean,
    scaled_conv,
)
from ...forms.registry import conv_cost, get_form, is_pointwise
from ...graph import describe, replace_module
from ..base import PassResult, Rewrite, Skip
from ..registry import register_pass
from .candidates import Candidate, find_candidates, pointwise_left_out
from .options import SeparableOptions, check_forms_apply, check_layer_names
from .plan import Planned, build_all, layer_setting
from .replay import replay_separable

__all__ = ["Candidate", "SeparableOptions", "find_candidates", "separable"]


@register_pass(order=300, needs_shapes=True, default=True, options=SeparableOptions, replay=replay_separable)
def separable(gm: fx.GraphModule, options: SeparableOptions | None = None, /, **kwargs: Any) -> PassResult:
    """Replace standard k×k convs by depthwise k×k + pointwise 1×1 (Network Decoupling SVD init).

    Args:
        gm: the traced model, edited in place.
        options: a :class:`SeparableOptions`, or its fields as keyword arguments (not both).

    Forms: ``"dw-pw"`` (depthwise k×k, multiplier m → pointwise), ``"pw-dw-pw"`` (1×1 → depthwise k×k → 1×1
    from a rank-R CP decomposition, :mod:`fxsurgeon.forms.cp`), or ``"auto"``: per layer the form with the least
    weight error. With a uniform ``multiplier`` m, forms other than ``dw-pw`` get each layer's MACs of
    ``dw-pw`` at m and take their largest rank within them (:mod:`fxsurgeon.budget.allotment`); with a budget
    (``target_macs``/``target_params``), ``auto`` lets every form's ranks compete in the allocation.

    Returns:
        A :class:`PassResult`; each rewrite's details carry form, rank (m), parameters before/after and the
        relative weight error ``||W - W_m||_F / ||W||_F``.

    >>> import torch.nn as nn
    >>> from fxsurgeon.tracing import trace
    >>> gm = trace(nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, bias=False)))
    >>> res = separable(gm, multiplier=1)  # or separable(gm, SeparableOptions(multiplier=1))
    >>> len(res.rewrites), sum(p.numel() for p in gm.parameters())
    (1, 2336)
    """
    o = SeparableOptions.coerce(options, kwargs)
    form, multiplier, energy, init = o.form, o.multiplier, o.energy, o.init
    kernel_sizes, include_stem, include_unprofitable = o.kernel_sizes, o.include_stem, o.include_unprofitable
    exclude, layers, latency_aware, device = o.exclude, o.layers, o.latency_aware, o.device
    target_macs, target_params, target_latency = o.target_macs, o.target_params, o.target_latency
    allocation, calibration, weighting, bias_correction = o.allocation, o.calibration, o.weighting, o.bias_correction
    defaulted = o.defaulted
    check_layer_names(gm, layers)
    layers = dict(layers or {})
    judge = LatencyJudge.from_options(latency_aware, device) if target_latency is None else None
    candidates, skipped = find_candidates(
        gm, kernel_sizes=kernel_sizes, include_stem=include_stem, exclude=exclude or ()
    )
    budgeted = target_latency is not None or target_macs is not None or target_params is not None
    # a rank in `layers` without a form takes the pass's form, or where the form was left to its default, the
    # first that applies to the conv (pw-pw for a 1×1 conv; dw-pw, the default, for a k×k one)
    layer_form = "auto" if "form" in defaulted else form
    check_forms_apply(candidates, form, layers, budgeted, layer_form)
    if include_unprofitable is None:
        include_unprofitable = multiplier == "full"
    # weighting="bn": decompose importance-scaled copies (unscaled after building); see fxsurgeon.forms.importance
    work: dict[str, tuple[nn.Conv2d, Any]] = {}
    if weighting == "bn" and init == "svd":
        for cand in candidates:
            scales = bn_channel_scales(gm, cand.aliases, cand.conv)
            if scales is not None:
                work[cand.name] = (scaled_conv(cand.conv, scales), scales)
    corrects_bias = bias_correction and init == "svd"  # approximate rewrites get the output mean back (a new bias)
    budget = kept = None
    # a data-free budget ranks the importance-scaled copies; errors measured on data use the convs themselves
    data_free = calibration is None or allocation == "weight"
    ranked = [replace(c, conv=work[c.name][0]) if data_free and c.name in work else c for c in candidates]
    if target_latency is not None:
        from ...budget.latency_budget import budget_latency

        plan = budget_latency(gm, ranked, form, layers, target_latency=target_latency, target_macs=target_macs,
                              target_params=target_params, calibration=calibration, errors=allocation,
                              added_bias=corrects_bias, hint=pointwise_left_out(gm, kernel_sizes),
                              judge=LatencyJudge.from_options(latency_aware or True, device, budget=True))
        chosen, kept, budget = plan.settings, plan.kept, plan.summary
        budget["defaults"] = defaulted  # the options the budget's defaults filled in (the rest were given)
        layers = {**chosen, **layers}
    elif target_macs is not None or target_params is not None:
        from ...budget.plan import budget_layers

        chosen, kept, budget = budget_layers(gm, ranked, form, layers, target_macs=target_macs,
                                             target_params=target_params, calibration=calibration,
                                             errors=allocation, added_bias=corrects_bias,
                                             hint=pointwise_left_out(gm, kernel_sizes))
        layers = {**chosen, **layers}
        budget = budget.summary()
        budget["defaults"] = defaulted  # the options the budget's defaults filled in (the rest were given)
    planned: list[Planned] = []
    for cand in candidates:
        conv = cand.conv
        if kept is not None and cand.name in kept:
            why = ("its error costs more than the time it saves elsewhere, or no candidate is faster"
                   if target_latency is not None else "its error costs more than its MACs save elsewhere")
            why = (budget.get("untimed") or {}).get(cand.name, why) if target_latency is not None else why
            skipped.append(Skip(cand.name, f"kept as it is by the budget allocation: {why}",
                                details={"module": describe(conv), "form": "original"}))
            continue
        if is_pointwise(conv) and not any(n in layers for n in cand.aliases):
            skipped.append(Skip(cand.name, "a 1×1 conv has no multiplier or energy setting: 1×1 convs are rewritten "
                                "(form pw-pw) under a budget (target_macs, target_params, target_latency) or with a "
                                "rank in `layers`", details={"module": describe(conv)}))
            continue
        decomp, scales = work.get(cand.name, (conv, None))
        uniform = not any(n in layers for n in cand.aliases) and energy is None
        allotted = None
        if uniform and form != "dw-pw":  # a MAC allotment per layer: see fxsurgeon.budget.allotment
            p_in, p_out, _ = layer_positions(gm, cand.aliases, conv)
            allotted = allot(decomp, form, multiplier, p_in, p_out, init=init)
            if allotted is None:
                skipped.append(Skip(cand.name, f"no rank of {form} fits the MACs of dw-pw at multiplier "
                                    f"{multiplier or 1}", details={"module": describe(conv), "form": form}))
                continue
            form_name, rank = allotted.form, allotted.rank
        else:
            form_name, rank = layer_setting(cand, form, multiplier, energy, layers, layer_form)
        impl = get_form(form_name)
        before = conv_cost(conv).params
        after = impl.cost(conv, rank).params
        forced = any(n in layers for n in cand.aliases)
        if after >= before and not (include_unprofitable or forced):
            skipped.append(Skip(
                cand.name,
                f"not profitable at {form_name} rank {rank}: {after:,} weights vs {before:,} "
                "(include_unprofitable=True forces it)",
                details={"module": describe(conv), "form": form_name, "rank": rank,
                         "params_before": before, "params_after": after},
            ))
            continue
        planned.append(Planned(cand, decomp, scales, allotted, form_name, rank, impl, before, after, forced))

    rewrites: list[Rewrite] = []
    for plan, (new, built) in zip(planned, build_all(planned, init)):
        cand, conv, form_name, rank, impl = plan.cand, plan.cand.conv, plan.form_name, plan.rank, plan.impl
        before, after, forced, scales, allotted = plan.before, plan.after, plan.forced, plan.scales, plan.allotted
        timing = None
        if judge is not None and not forced:  # keep the rewrite only where it measures faster
            keep, why, timing = judge.decide(gm, cand.name, cand.aliases, conv, new)
            if not keep:
                skipped.append(Skip(cand.name, why, details={"module": describe(conv), "form": form_name,
                                                             "rank": rank, "latency": timing}))
                continue
        spec = next((layers[a] for a in cand.aliases if a in layers), None)
        if isinstance(spec, dict) and spec.get("bias") is True and new.pointwise.bias is None:
            pw = new.pointwise  # the bias a bias correction gave it (see layers in SeparableOptions)
            pw.bias = nn.Parameter(torch.zeros(pw.out_channels, dtype=pw.weight.dtype, device=pw.weight.device),
                                   requires_grad=pw.weight.requires_grad)
        for alias in cand.aliases:
            replace_module(gm, alias, new)
        exact = bool(built.pop("exact", False))
        shift = None
        if corrects_bias and not exact:
            mean = input_channel_mean(gm, cand.aliases, conv)
            if mean is not None:
                delta = correct_mean_shift(conv, new, mean[0])
                after += 0 if conv.bias is not None else conv.out_channels
                shift = {"input_mean": mean[1], "max_abs_shift": float(delta.abs().max())}
        details = {"form": form_name, "rank": rank, **built, "params_before": before, "params_after": after,
                   "init": init}
        if shift is not None:
            details["bias_correction"] = shift
        if timing is not None:
            details["latency"] = timing
        if scales is not None:
            details["weighting"] = f"bn ({scales.describe()}); errors are weighted"
        if allotted is not None and allotted.considered:
            details["auto"] = allotted.considered
        p_in, p_out, measured = layer_positions(gm, cand.aliases, conv)
        details["macs_before"] = conv_cost(conv).macs(p_in, p_out)
        details["macs_after"] = impl.cost(conv, rank).macs(p_in, p_out)
        if not measured:
            details["macs_per"] = "output position (no example_inputs)"
        if budget is not None and cand.name in budget["layers"]:
            details["allocation"] = budget["layers"][cand.name]
        if cand.leaf:
            details["inside_leaf_module"] = cand.leaf
        if len(cand.aliases) > 1:
            details["aliases"] = cand.aliases
        rewrites.append(Rewrite(cand.name, describe(conv), describe(new), exact, details=details))
    figures = {"allocation": budget} if budget is not None else {}
    return PassResult(gm, rewrites, skipped, "separable", figures)
