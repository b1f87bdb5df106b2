"""Budget allocation: pick each layer's (form, rank) so the whole model meets a MAC or parameter budget.

Every rewritable layer offers a menu of :class:`~fxsurgeon.forms.LayerChoice` — each rank of each separable
form, and the original conv itself — with a cost (MACs at the layer's real spatial sizes, weight
parameters) and an error. :func:`allocate` solves the multiple-choice knapsack

    minimise  Σ_l weight_l · error_l(choice_l)   subject to   Σ_l cost_l(choice_l) ≤ budget

greedily: every layer starts at its cheapest choice, then the upgrade with the largest error removed per unit
of cost added is taken while it fits. On each layer's lower convex hull of (cost, error) this is the
Lagrangian-optimal path (Everett 1963; the classic rate–distortion allocation), and once the hull step no
longer fits, the best-ratio upgrade that still fits fills what is left. The pure maths lives here; the
separable pass builds the menus (:func:`layer_options`) from the forms table and the shapes ShapeProp found;
:mod:`fxsurgeon.budget.plan` measures those shapes and the whole model's MACs and runs one allocation per model.

Errors are made comparable across layers by ``weight``: data-free, the layer's squared weight norm
(relative squared weight error, since a BatchNorm after a conv makes its weight scale arbitrary); with
calibration data, the measured output error of each choice (see :func:`fxsurgeon.calibrate.measure_choices`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import SurgeryError
from ..forms.registry import LayerChoice, applies, conv_cost, get_form

__all__ = [
    "BUDGET_DEFAULTS",
    "LATENCY_DEFAULTS",
    "UNIFORM_DEFAULTS",
    "Allocation",
    "LayerOptions",
    "added_bias_params",
    "allocate",
    "layer_options",
    "max_useful_rank",
    "uniform_allocation",
]


#: what the separable pass does with a budget (``target_macs`` / ``target_params``) when these options are not
#: given: every registered form competes per layer (``"auto"``), plain (unweighted) relative weight errors rank
#: the choices, and each approximate layer gets its output mean back from the BatchNorm statistics. Chosen on the
#: mean logit error over the trained CIFAR ResNet-20 and ResNet-32 at 0.60× and 0.45× MACs
#: (benchmarks/defaults_two_models.py; docs/benchmarks/defaults.md).
#: The convs matched are the 3×3 ones; a latency budget (``target_latency``) also matches the 1×1 convs (form
#: ``pw-pw``), where bottleneck networks spend most of their time (:data:`LATENCY_DEFAULTS`).
BUDGET_DEFAULTS: dict[str, Any] = {"form": "auto", "weighting": None, "bias_correction": True, "kernel_sizes": (3,)}
#: ... under ``target_latency``: the same, and the 1×1 convs too (timm resnet50 at batch 1 on a CPU reaches 0.6×
#: of its latency with them; its 3×3 convs alone stop at about 0.73×: docs/latency.md)
LATENCY_DEFAULTS: dict[str, Any] = {**BUDGET_DEFAULTS, "kernel_sizes": (1, 3)}
#: ... and with a uniform ``multiplier`` (or none): the MobileNet form, plain weights, biases as they are
UNIFORM_DEFAULTS: dict[str, Any] = {"form": "dw-pw", "weighting": None, "bias_correction": False, "kernel_sizes": (3,)}


@dataclass(frozen=True)
class LayerOptions:
    """The menu of one layer.

    Attributes:
        name: qualified name of the conv.
        choices: the ways to rewrite it (any forms, any ranks), and usually the original conv
            (``form == "original"``) for leaving it alone.
        positions_in: H·W of the conv's input (pointwise convs that run before the stride pay this).
        positions_out: H·W of the conv's output.
        weight: multiplies every choice's ``error`` in the objective (1 / ||W||² for relative error).
        calls: how many times the forward calls the layer (a shared conv pays its MACs at every call).
    """

    name: str
    choices: tuple[LayerChoice, ...]
    positions_in: int
    positions_out: int
    weight: float = 1.0
    calls: int = 1

    def macs(self, choice: LayerChoice) -> int:
        """MACs of ``choice`` per sample (every call together)."""
        return self.calls * choice.macs(self.positions_in, self.positions_out)

    def loss(self, choice: LayerChoice) -> float:
        """Weighted error of ``choice``; an unknown (nan) error counts as infinite unless the choice is exact."""
        err = 0.0 if choice.exact else choice.error
        return math.inf if math.isnan(err) else self.weight * err


@dataclass
class Allocation:
    """What :func:`allocate` chose.

    Attributes:
        picks: layer name → chosen :class:`LayerChoice` (``form == "original"`` means keep the conv).
        macs / params: totals over the layers of the allocation (not the rest of the model).
        objective: Σ weight · error of the picks.
        max_macs / max_params: the budgets it was given for these layers (None: unconstrained).
    """

    picks: dict[str, LayerChoice]
    macs: int
    params: int
    objective: float
    max_macs: float | None = None
    max_params: float | None = None
    steps: int = 0
    notes: list[str] = field(default_factory=list)

    def ranks(self) -> dict[str, dict[str, Any]]:
        """``{name: {"form": ..., "rank": ...}}`` for the layers to rewrite: the separable pass's ``layers=``."""
        return {n: {"form": c.form, "rank": c.rank} for n, c in self.picks.items() if c.form != "original"}


def _costs(opt: LayerOptions, c: LayerChoice) -> tuple[int, int]:
    return opt.macs(c), c.params


def allocate(
    layers: Sequence[LayerOptions], *, max_macs: float | None = None, max_params: float | None = None
) -> Allocation:
    """Choose one option per layer minimising the total weighted error within the budget(s).

    Args:
        layers: one menu per layer.
        max_macs: most MACs (per sample) the chosen options may add up to; None for no MAC budget.
        max_params: most weight parameters they may add up to; None for no parameter budget.

    Returns:
        An :class:`Allocation`. With both budgets, an upgrade must fit both and its cost is measured as the
        sum of the fractions of each budget it uses.

    Raises:
        SurgeryError: even the cheapest option of every layer exceeds a budget (the message says by how much).

    >>> from fxsurgeon.forms import LayerChoice as C
    >>> a = LayerOptions("a", (C("f", 1, 10, 0, 10, 9.0, False), C("f", 2, 20, 0, 20, 1.0, False)), 1, 1)
    >>> b = LayerOptions("b", (C("f", 1, 10, 0, 10, 2.0, False), C("f", 2, 20, 0, 20, 1.5, False)), 1, 1)
    >>> sorted((n, c.rank) for n, c in allocate([a, b], max_macs=30).picks.items())
    [('a', 2), ('b', 1)]
    """
    if max_macs is None and max_params is None:
        raise SurgeryError("allocate() needs a budget: max_macs= and/or max_params=")
    for lo in layers:
        if not lo.choices:
            raise SurgeryError(f"layer '{lo.name}' offers no choices to allocate")

    def scale(dm: float, dp: float) -> float:
        # cost of a move in "budget fractions", so MACs and parameters can share one ratio
        s = 0.0
        if max_macs is not None:
            s += dm / max(max_macs, 1.0)
        if max_params is not None:
            s += dp / max(max_params, 1.0)
        return s

    # start at the cheapest option of every layer (ties: least error)
    cur: list[LayerChoice] = []
    for lo in layers:
        cur.append(min(lo.choices, key=lambda c, lo=lo: (scale(*_costs(lo, c)), lo.loss(c))))
    used_m = sum(lo.macs(c) for lo, c in zip(layers, cur))
    used_p = sum(c.params for c in cur)

    def excess(m: float, p: float) -> float:
        e = 0.0
        if max_macs is not None and m > max_macs:
            e += (m - max_macs) / max(max_macs, 1.0)
        if max_params is not None and p > max_params:
            e += (p - max_params) / max(max_params, 1.0)
        return e

    # With two budgets the cheapest-by-sum start can break one of them while a mix fits both (one layer
    # cheap in MACs, another cheap in parameters): repair by the switch that removes the most excess per
    # unit of error added, until both fit or no switch helps.
    for _ in range(4 * sum(len(lo.choices) for lo in layers)):
        over = excess(used_m, used_p)
        if over <= 0:
            break
        best_fix = None
        for i, lo in enumerate(layers):
            m0, p0 = _costs(lo, cur[i])
            for c in lo.choices:
                m1, p1 = _costs(lo, c)
                gain = over - excess(used_m - m0 + m1, used_p - p0 + p1)
                if gain <= 0:
                    continue
                price = (lo.loss(c) - lo.loss(cur[i])) / gain
                if best_fix is None or price < best_fix[0]:
                    best_fix = (price, i, c, m1 - m0, p1 - p0)
        if best_fix is None:
            break
        _, i, c, dm, dp = best_fix
        cur[i] = c
        used_m += dm
        used_p += dp
    for what, used, cap in (("MACs", used_m, max_macs), ("parameters", used_p, max_params)):
        if cap is not None and used > cap:
            if cap < 0:  # the layers left alone already exceed the target: no negative budget in the message
                raise SurgeryError(
                    f"the layers that are not rewritten already need {-cap:,.0f} {what} more than the target "
                    f"allows, before the rewritable layers (cheapest forms: {used:,} {what}); raise the target "
                    "or rewrite more layers"
                )
            raise SurgeryError(
                f"budget of {cap:,.0f} {what} for the rewritable layers is below what their cheapest forms "
                f"need ({used:,} {what}); raise the target or rewrite more layers"
            )

    def best_move(i: int) -> tuple[float, LayerChoice] | None:
        lo, c0 = layers[i], cur[i]
        m0, p0 = _costs(lo, c0)
        l0 = lo.loss(c0)
        best = None
        for c in lo.choices:
            m1, p1 = _costs(lo, c)
            l1 = lo.loss(c)
            if not l1 < l0:
                continue
            if (max_macs is not None and used_m - m0 + m1 > max_macs) or (
                max_params is not None and used_p - p0 + p1 > max_params
            ):
                continue
            dc = scale(m1 - m0, p1 - p0)
            gain = (l0 - l1) if math.isfinite(l0) else math.inf
            # a free or cost-saving improvement is always taken first
            ratio = math.inf if dc <= 0 else gain / dc
            key = (ratio, gain)
            if best is None or key > best[0]:
                best = (key, c)
        return None if best is None else (best[0][0], best[1])

    # lazy max-heap of each layer's best upgrade: budgets only shrink, so a stale entry can only have
    # become worse, never better — re-evaluate it when it reaches the top
    heap: list[tuple[float, int, int]] = []
    version = [0] * len(layers)
    for i in range(len(layers)):
        mv = best_move(i)
        if mv is not None:
            heapq.heappush(heap, (-mv[0], i, 0))
    steps = 0
    while heap:
        neg, i, ver = heapq.heappop(heap)
        if ver != version[i]:
            continue
        mv = best_move(i)
        if mv is None:
            continue
        if mv[0] < -neg:  # it got worse since it was pushed: requeue with the fresh value
            heapq.heappush(heap, (-mv[0], i, ver))
            continue
        lo, c = layers[i], mv[1]
        m0, p0 = _costs(lo, cur[i])
        m1, p1 = _costs(lo, c)
        used_m += m1 - m0
        used_p += p1 - p0
        cur[i] = c
        version[i] += 1
        steps += 1
        nxt = best_move(i)
        if nxt is not None:
            heapq.heappush(heap, (-nxt[0], i, version[i]))

    picks = {lo.name: c for lo, c in zip(layers, cur)}
    objective = sum(lo.loss(c) for lo, c in zip(layers, cur))
    return Allocation(picks, used_m, used_p, objective, max_macs, max_params, steps)


def uniform_allocation(layers: Sequence[LayerOptions], form: str, rank: int) -> Allocation:
    """Every layer at ``rank`` of ``form`` (capped at its largest listed rank): the baseline allocation beats.

    >>> from fxsurgeon.forms import LayerChoice as C
    >>> a = LayerOptions("a", (C("f", 1, 10, 0, 10, 9.0, False), C("f", 2, 20, 0, 20, 1.0, False)), 1, 1)
    >>> uniform_allocation([a], "f", 5).picks["a"].rank
    2
    """
    picks = {}
    for lo in layers:
        mine = [c for c in lo.choices if c.form == form]
        if not mine:
            raise SurgeryError(f"layer '{lo.name}' has no choice of form {form!r}")
        below = [c for c in mine if c.rank <= rank]
        picks[lo.name] = max(below, key=lambda c: c.rank) if below else min(mine, key=lambda c: c.rank)
    macs = sum(lo.macs(picks[lo.name]) for lo in layers)
    params = sum(picks[lo.name].params for lo in layers)
    objective = sum(lo.loss(picks[lo.name]) for lo in layers)
    return Allocation(picks, macs, params, objective)


def max_useful_rank(form: Any, conv: nn.Conv2d, positions_in: int, positions_out: int) -> int:
    """Largest rank whose MACs and parameters stay below the original conv's: higher ranks are dominated."""
    orig = conv_cost(conv)
    orig_macs = orig.macs(positions_in, positions_out)
    full = form.full_rank(conv)
    best = 0
    for r in range(1, full + 1):
        c = form.cost(conv, r)
        if c.macs(positions_in, positions_out) >= orig_macs and c.params >= orig.params and not c.exact:
            break
        best = r
    return best


def added_bias_params(conv: nn.Conv2d, added_bias: bool) -> int:
    """Parameters a rewrite of ``conv`` gains when bias correction is on: a bias of C_out where it had none.

    >>> added_bias_params(nn.Conv2d(4, 8, 3, bias=False), True), added_bias_params(nn.Conv2d(4, 8, 3), True)
    (8, 0)
    """
    return conv.out_channels if added_bias and conv.bias is None else 0


def layer_options(
    name: str,
    conv: nn.Conv2d,
    forms: Iterable[str],
    *,
    positions_in: int,
    positions_out: int,
    calls: int = 1,
    keep_original: bool = True,
    weight: float | None = None,
) -> LayerOptions:
    """The data-free menu of one conv: every useful rank of every form in ``forms``, plus the conv itself.

    Ranks whose MACs reach the original conv's are dropped (the original is cheaper and exact). ``weight``
    defaults to 1 / ||W||², so the objective sums relative squared weight errors.

    >>> conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    >>> lo = layer_options("c", conv, ["dw-pw"], positions_in=64, positions_out=64)
    >>> [c.rank for c in lo.choices]  # m = 6 would cost 2,400 MACs per position vs the conv's 2,304
    [1, 2, 3, 4, 5, 0]
    """
    choices: list[LayerChoice] = []
    for fname in forms:
        if not applies(fname, conv):  # a spatial form on a 1×1 conv, or pw-pw on a k×k one
            continue
        form = get_form(fname)
        top = max_useful_rank(form, conv, positions_in, positions_out)
        if top >= 1:
            choices += form.choices(conv, top)
    if keep_original:
        choices.append(conv_cost(conv))
    if weight is None:
        norm2 = float(conv.weight.detach().double().pow(2).sum())
        weight = 1.0 / norm2 if norm2 > 0 else 1.0
    return LayerOptions(name, tuple(choices), positions_in, positions_out, weight, calls)
