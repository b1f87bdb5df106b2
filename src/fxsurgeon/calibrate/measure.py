"""Data-aware errors for budget allocation: each choice's error after calibration, and how much the outputs
move per unit of error at each layer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError
from ..forms.cp import menu_builds
from ..modes import eval_modes as _eval_modes
from ..runtime import device_of, to_device
from .data import as_batches, forward_batch
from .separable_stats import SeparableAccumulator
from .solve import DEFAULT_RIDGE, residual, ridge_refit
from .specs import RefitSpec, is_refittable, separable_refittable
from .stats import Accumulator
from .stepper import capture_module

__all__ = ["measure_choices", "output_sensitivity", "thin_choices"]


#: activations kept per layer for :func:`measure_choices` (elements of the conv's input)
MEASURE_MAX_ELEMENTS = 2**21
#: ranks of one form measured per layer by :func:`measure_choices` (evenly spread over the menu's, both ends
#: kept): each costs a refit (seconds on a wide CP choice), and the data-free menu may list 24
MEASURED_PER_FORM = 12


def thin_choices(choices: Sequence[Any], per_form: int) -> tuple[Any, ...]:
    """At most ``per_form`` choices of each form, evenly spread over its ranks (first and last kept).

    >>> from fxsurgeon.forms.registry import LayerChoice
    >>> menu = [LayerChoice("f", r, 0, 0, 0, 0.0, False) for r in range(1, 11)]
    >>> menu.append(LayerChoice("original", 0, 0, 0, 0, 0.0, True))
    >>> [c.rank for c in thin_choices(menu, 4)]
    [1, 4, 7, 10, 0]
    """
    by_form: dict[str, list[Any]] = {}
    for c in choices:
        by_form.setdefault(c.form, []).append(c)
    keep: set[int] = set()
    for form, cs in by_form.items():
        if form == "original" or len(cs) <= per_form:
            keep.update(id(c) for c in cs)
            continue
        cs = sorted(cs, key=lambda c: c.rank)
        keep.update(id(cs[round(i * (len(cs) - 1) / (per_form - 1))]) for i in range(per_form))
    return tuple(c for c in choices if id(c) in keep)


def _last_refittable(module: nn.Module) -> nn.Module | None:
    if is_refittable(module):
        return module
    if isinstance(module, nn.Sequential) and len(module) and is_refittable(module[-1]):
        return module[-1]
    return None


def measure_choices(
    gm: nn.Module,
    options: Sequence[Any],
    convs: dict[str, nn.Conv2d],
    calibration: Any,
    *,
    ridge: float = DEFAULT_RIDGE,
    max_elements: int = MEASURE_MAX_ELEMENTS,
    per_form: int = MEASURED_PER_FORM,
) -> list[Any]:
    """Each choice's error measured on data: the relative squared output error left after calibration.

    Runs ``gm`` (the model before rewriting) on the calibration batches to record each conv's inputs (up to
    ``max_elements`` per layer), then for every choice builds its module, refits it by the same
    regularised least squares :func:`calibrate` uses (depthwise and pointwise jointly where it can, from
    statistics of the layer's input patches shared by all choices), and measures ``||y' − y||² / ||y||²``
    against the conv's own output. That is the error calibration will leave (before the drift from earlier layers),
    comparable across layers and forms — unlike weight errors, which ignore what the inputs look like.

    Args:
        gm: the model the convs belong to.
        options: :class:`fxsurgeon.budget.allocation.LayerOptions` whose choices are to be measured.
        convs: layer name → the conv module.
        calibration: input batches (see :func:`as_batches`).
        per_form: ranks of each form measured per layer (:func:`thin_choices`); the others leave the menu.

    Returns:
        New ``LayerOptions`` with measured errors and ``weight=1``.
    """
    from dataclasses import replace

    from ..forms.registry import get_form

    batches = as_batches(calibration)
    dev = device_of(gm)
    store: dict[str, list[torch.Tensor]] = {o.name: [] for o in options}
    size = dict.fromkeys(store, 0)

    def hook_for(name: str):
        def hook(mod, args, out):
            if size[name] < max_elements and args and isinstance(args[0], torch.Tensor):
                x = args[0].detach()
                keep = max(1, min(x.shape[0], -(-(max_elements - size[name]) // max(x[0].numel(), 1))))
                store[name].append(x[:keep])
                size[name] += x[:keep].numel()
        return hook

    handles = [convs[o.name].register_forward_hook(hook_for(o.name)) for o in options]
    try:
        with _eval_modes(gm), torch.no_grad():
            for b in batches:
                if all(v >= max_elements for v in size.values()):
                    break
                forward_batch(gm, to_device(b, dev), "the original model")
    finally:
        for h in handles:
            h.remove()
    out = []
    with torch.no_grad(), menu_builds():  # candidates from the menu's own (cached) CP fits
        for o in options:
            conv = convs[o.name]
            xs = store.pop(o.name)
            if not xs:
                raise SurgeryError(f"measure_choices: conv '{o.name}' was not called on the calibration data")
            x = torch.cat(xs)
            y = conv(x)
            yy = float(y.double().pow(2).sum())
            shared: SeparableAccumulator | None = None  # input-patch statistics: the same for every choice
            choices = []
            for c in thin_choices(o.choices, per_form):
                if c.form == "original" or c.exact or yy == 0:
                    choices.append(replace(c, error=0.0 if (c.form == "original" or c.exact) else c.error))
                    continue
                module, _ = get_form(c.form).build(conv, c.rank)
                module.eval()
                spec = RefitSpec(o.name, o.name, o.name, kind="separable")
                if separable_refittable(module):
                    # one alternation: a cheaper estimate of what calibration leaves, for ranking choices
                    acc = SeparableAccumulator(spec, module, iterations=1)
                    if shared is not None and shared.gram.shape == acc.gram.shape:
                        acc.gram, acc.cross, acc.yy, acc.n = shared.gram, shared.cross, shared.yy, shared.n
                    else:
                        acc.add(x, y)
                        shared = acc
                    info = acc.finish(ridge)
                    err = (info.error_after or 0.0) ** 2 * yy if info.error_after is not None else math.inf
                else:
                    last = _last_refittable(module)
                    if last is None:  # nothing to refit: the plain output error
                        err = float((module(x) - y).double().pow(2).sum())
                    else:
                        acc = Accumulator(spec, last)
                        feats = capture_module(last, lambda m=module, x=x: m(x), inputs=True, stop_after=1)
                        acc.add(feats[0], y)
                        w = ridge_refit(acc.gram, acc.cross, acc.w0, ridge)
                        err = min(residual(acc.gram, acc.cross, acc.yy, w), residual(acc.gram, acc.cross, acc.yy, acc.w0))
                choices.append(replace(c, error=err / yy))
            out.append(replace(o, choices=tuple(choices), weight=1.0))
    return out


def output_sensitivity(
    model: nn.Module, names: Sequence[str], calibration: Any, *, samples: int = 1000, noise: float = 0.1,
    seed: int = 0,
) -> dict[str, float]:
    """How much ``model``'s outputs move per unit of relative error at each named layer's output.

    For each layer, seeded Gaussian noise of relative norm ``noise`` is added to its output (one forward per
    layer, over the first ``samples`` calibration samples) and ``(||Δout|| / ||out||)² / noise²`` is the
    layer's sensitivity: the factor by which a relative squared error there reaches the outputs, to first
    order. A budget weighted by it spends MACs where the network amplifies errors, not where layers merely
    have large relative errors (the spread is wide: 100× across the ResNet-20's 3×3 convs).
    """
    from torch.utils._pytree import tree_flatten

    batches, n = [], 0
    for b in as_batches(calibration):
        if n >= samples:
            break
        x = b[0]
        take = samples - n if isinstance(x, torch.Tensor) and x.dim() else None
        batches.append(tuple(t[:take] if isinstance(t, torch.Tensor) and t.dim() else t for t in b) if take else b)
        n += int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1
    dev = device_of(model)
    batches = [to_device(b, dev) for b in batches]

    def flat(out: Any) -> torch.Tensor:
        leaves, _ = tree_flatten(out)
        return torch.cat([t.detach().double().reshape(-1) for t in leaves
                          if isinstance(t, torch.Tensor) and t.is_floating_point()])

    out: dict[str, float] = {}
    with _eval_modes(model), torch.no_grad():
        clean = [flat(forward_batch(model, b, "the model")) for b in batches]
        norm2 = sum(float(c.pow(2).sum()) for c in clean)
        for name in names:
            gen = torch.Generator(device="cpu").manual_seed(seed)

            def hook(mod, args, y, gen=gen):
                z = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.device, y.dtype)
                return y + noise * y.norm() / z.norm().clamp_min(1e-30) * z

            h = model.get_submodule(name).register_forward_hook(hook)
            try:
                moved = sum(float((flat(forward_batch(model, b, "the model")) - c).pow(2).sum())
                            for b, c in zip(batches, clean))
            finally:
                h.remove()
            out[name] = moved / norm2 / noise ** 2 if norm2 > 0 else 1.0
    return out
