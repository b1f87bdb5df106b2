"""Budget allocation: pick each layer's (form, rank) so the whole model meets a MAC or parameter budget.

Every rewritable layer offers a menu of :class:`~fxsurgeon.forms.LayerChoice` — each rank of each separable
form, and the original conv itself — with a cost (MACs at the layer's real spatial sizes, weight
parameters) and an error. :func:`allocate` solves the multiple-choice knapsack

    minimise  Σ_l weight_l · error_l(choice_l)   subject to   Σ_l cost_l(choice_l) ≤ budget

greedily: every layer starts at its cheapest choice, then the upgrade with the largest error removed per unit
of cost added is taken while it fits. On each layer's lower convex hull of (cost, error) this is the
Lagrangian-optimal path (Everett 1963; the classic rate–distortion allocation), and once the hull step no
longer fits, the best-ratio upgrade that still fits fills what is left. The pure maths lives here; the
separable pass builds the menus (:func:`layer_options`) from the forms table and the shapes ShapeProp found.

Errors are made comparable across layers by ``weight``: data-free, the layer's squared weight norm
(relative squared weight error, since a BatchNorm after a conv makes its weight scale arbitrary); with
calibration data, the measured output error of each choice (see :func:`fxsurgeon.calibrate.measure_choices`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import SurgeryError
from ..forms.cp_store import CPErrorStore, cp_error_store
from ..forms.registry import LayerChoice, applies, conv_cost, get_form, layer_form
from ..modes import eval_modes
from ..runtime import data_device_of
from .latency_table import cache_root_set, default_cache_dir

__all__ = [
    "BUDGET_DEFAULTS",
    "LATENCY_DEFAULTS",
    "UNIFORM_DEFAULTS",
    "Allocation",
    "BudgetPlan",
    "LayerOptions",
    "LayerShape",
    "added_bias_params",
    "allocate",
    "conv_shapes",
    "layer_options",
    "max_useful_rank",
    "model_macs",
    "plan_budget",
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


# ---------------------------------------------------------------------------------------------------------
# whole-model budgets for the separable pass


@dataclass
class LayerShape:
    """Spatial sizes (H·W) a conv runs at, how often the forward calls it, and the example batch size."""

    positions_in: int
    positions_out: int
    calls: int
    batch: int


def example_inputs_from_graph(gm: fx.GraphModule) -> tuple | None:
    """Random inputs shaped like the ones ShapeProp last saw (placeholder ``tensor_meta``), or None."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            return None
        dev = data_device_of(gm)
        if meta.dtype.is_floating_point:
            out.append(torch.randn(tuple(meta.shape), dtype=meta.dtype, device=dev))
        else:
            out.append(torch.zeros(tuple(meta.shape), dtype=meta.dtype, device=dev))
    return tuple(out)


def _hw(shape: Sequence[int]) -> int:
    return int(math.prod(shape[2:])) if len(shape) > 2 else 1


def conv_shapes(gm: fx.GraphModule, convs: dict[str, tuple[list[str], nn.Module]]) -> dict[str, LayerShape]:
    """Where each conv runs: from ShapeProp's ``tensor_meta`` on its call_module nodes, else by a hooked run.

    Args:
        gm: the traced model, after ``ShapeProp``.
        convs: name → (every alias, the module). A conv inside a leaf module has no node of its own; those
            are measured with forward hooks on inputs shaped like the placeholders' ``tensor_meta``.

    Raises:
        SurgeryError: a shape is missing and ShapeProp never ran (no ``example_inputs``).
    """
    called: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            called.setdefault(str(node.target), []).append(node)
    out: dict[str, LayerShape] = {}
    missing: dict[str, nn.Module] = {}
    for name, (aliases, mod) in convs.items():
        nodes = [n for a in aliases for n in called.get(a, [])]
        metas = []
        for n in nodes:
            src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            mi = src.meta.get("tensor_meta") if src is not None else None
            mo = n.meta.get("tensor_meta")
            if mi is None or mo is None or not hasattr(mi, "shape") or not hasattr(mo, "shape"):
                break
            metas.append((tuple(mi.shape), tuple(mo.shape)))
        if nodes and len(metas) == len(nodes):
            out[name] = LayerShape(_hw(metas[0][0]), _hw(metas[0][1]), len(nodes), int(metas[0][0][0]))
        else:
            missing[name] = mod
    if missing:
        inputs = example_inputs_from_graph(gm)
        if inputs is None:
            first = next(iter(missing))
            raise SurgeryError(
                f"separable: a MAC budget needs each conv's spatial size, and '{first}' has none: pass "
                "example_inputs= to convert() so ShapeProp can record the shapes"
            )
        seen: dict[str, list[tuple[tuple, tuple]]] = {n: [] for n in missing}
        handles = [m.register_forward_hook(lambda mod, a, o, n=n: seen[n].append((tuple(a[0].shape), tuple(o.shape))))
                   for n, m in missing.items()]
        try:
            with eval_modes(gm), torch.no_grad():
                gm(*inputs)
        finally:
            for h in handles:
                h.remove()
        for n, calls in seen.items():
            if not calls:
                raise SurgeryError(f"separable: conv '{n}' was not called on the example inputs; its MACs are unknown")
            out[n] = LayerShape(_hw(calls[0][0]), _hw(calls[0][1]), len(calls), int(calls[0][0][0]))
    return out


def model_macs(gm: nn.Module, inputs: tuple) -> tuple[float, str]:
    """Whole-model MACs for ``inputs`` (fvcore's count: one multiply-add is one "flop") and the counter used.

    Falls back to counting Conv/Linear multiply-adds with hooks if fvcore cannot trace the model.
    """
    with eval_modes(gm), torch.no_grad():
        try:
            import warnings

            from fvcore.nn import FlopCountAnalysis

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fca = FlopCountAnalysis(gm, inputs)
                fca.unsupported_ops_warnings(False)
                fca.uncalled_modules_warnings(False)
                fca.tracer_warnings("none")
                return float(fca.total()), "fvcore"
        except Exception:  # fvcore's jit trace fails on some models: count the convs and linears
            total = [0.0]

            def hook(mod, a, out):
                if isinstance(mod, nn.Conv2d):
                    total[0] += out.numel() * mod.in_channels // mod.groups * math.prod(mod.kernel_size)
                elif isinstance(mod, nn.Linear):
                    total[0] += out.numel() * mod.in_features

            handles = [m.register_forward_hook(hook) for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            try:
                gm(*inputs)
            finally:
                for h in handles:
                    h.remove()
            return total[0], "conv+linear hooks"


@dataclass
class BudgetPlan:
    """What a budgeted separable pass decided, for the record (``extras["allocation"]``)."""

    allocation: Allocation
    options: list[LayerOptions]
    total_macs: float | None
    total_params: int
    fixed_macs: float
    fixed_params: int
    target_macs: float | None
    target_params: float | None
    counter: str
    errors: str
    cp_errors: dict[str, Any] | None = None  # the CP error cache's file, hits and fits, when one was used

    def summary(self) -> dict[str, Any]:
        a = self.allocation
        macs = self.fixed_macs + a.macs if self.total_macs else None
        extra = {"cp_errors": self.cp_errors} if self.cp_errors is not None else {}
        return {**extra,
            "target_macs": self.target_macs, "target_params": self.target_params,
            "macs_before": self.total_macs, "macs_after": macs,
            "macs_fraction": (macs / self.total_macs) if macs is not None and self.total_macs else None,
            "params_before": self.total_params, "params_after": self.fixed_params + a.params,
            "params_fraction": (self.fixed_params + a.params) / self.total_params if self.total_params else None,
            "macs_counter": self.counter, "macs_per": "sample", "errors": self.errors,
            "objective": a.objective, "layers": {n: {"form": c.form, "rank": c.rank, "macs": lo.macs(c),
                                                     "params": c.params, "error": lo.loss(c)}
                                                 for lo in self.options for n, c in [(lo.name, a.picks[lo.name])]},
        }


def plan_budget(
    gm: fx.GraphModule,
    convs: dict[str, tuple[list[str], nn.Conv2d]],
    forms: Sequence[str],
    *,
    target_macs: float | None = None,
    target_params: float | None = None,
    fixed: dict[str, LayerChoice] | None = None,
    calibration: Any = None,
    errors: str = "auto",
    added_bias: bool = False,
    hint: str | None = None,
) -> BudgetPlan:
    """Choose (form, rank) for each conv in ``convs`` so the *whole* model meets the target fractions.

    Args:
        gm: the traced model before rewriting, after ShapeProp when ``target_macs`` is given.
        convs: the rewritable convs: name → (aliases, module).
        forms: the forms to choose from (e.g. ``["dw-pw"]``, or every registered one).
        target_macs: fraction of the original model's MACs (fvcore count on the example inputs) to meet.
        target_params: fraction of the original model's parameters to meet.
        fixed: layers whose choice is already made (per-layer settings): their cost counts, they are not
            chosen.
        calibration: input batches; with them (``errors="auto"`` or ``"data"``) each choice's error is its
            measured relative output error after a least-squares refit of its last pointwise conv on the
            layer's real inputs (:func:`fxsurgeon.calibrate.measure_choices`), instead of its weight error.
        errors: ``"weight"`` (data-free relative squared weight error), ``"data"``, ``"sensitivity"`` (data
            errors weighted by how much the model's outputs move per unit of each layer's error,
            :func:`fxsurgeon.calibrate.output_sensitivity`), or ``"auto"`` (data when calibration batches are
            given).
        added_bias: a rewrite of a conv without bias gains one (C_out parameters): bias correction puts the
            output mean back there. Counted in every such choice, so a parameter budget holds either way.
        hint: what else could meet a budget that cannot be met, added to that error (the pass names the 1×1
            convs that ``kernel_sizes`` left out).

    Returns:
        A :class:`BudgetPlan` whose allocation picks, per conv, a choice (``form == "original"``: keep it).
    """
    if errors not in ("auto", "weight", "data", "sensitivity"):
        raise SurgeryError(f"separable: allocation errors must be 'auto', 'weight', 'data' or 'sensitivity', "
                           f"got {errors!r}")
    for what, v in (("target_macs", target_macs), ("target_params", target_params)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
            raise SurgeryError(f"separable: {what} is a fraction of the original model's in (0, 1], got {v!r}")
    if errors in ("data", "sensitivity") and calibration is None:
        raise SurgeryError(f"separable: errors='{errors}' needs calibration batches (convert(..., calibration=...))")
    fixed = dict(fixed or {})
    total_params = sum(p.numel() for p in gm.parameters())
    everything = {**convs}
    shapes: dict[str, LayerShape] = {}
    total_macs = None
    counter = ""
    if target_macs is not None:
        shapes = conv_shapes(gm, everything)
        inputs = example_inputs_from_graph(gm)
        if inputs is None:
            raise SurgeryError("separable: target_macs needs example_inputs= in convert() (the model's MACs "
                               "depend on the input size)")
        batch = next(iter(shapes.values())).batch if shapes else 1
        raw, counter = model_macs(gm, inputs)
        total_macs = raw / max(batch, 1)
    else:
        for name in everything:  # a parameter budget needs no spatial sizes
            shapes[name] = LayerShape(1, 1, 1, 1)
    options: list[LayerOptions] = []
    fixed_macs = total_macs or 0.0
    fixed_params = total_params
    for name, (_aliases, conv) in everything.items():
        sh = shapes[name]
        orig = conv_cost(conv)
        fixed_macs -= sh.calls * orig.macs(sh.positions_in, sh.positions_out)
        fixed_params -= orig.params
        bias = added_bias_params(conv, added_bias)
        if name in fixed:
            c = fixed[name]
            fixed_macs += sh.calls * c.macs(sh.positions_in, sh.positions_out)
            fixed_params += c.params + bias
            continue
        opt = layer_options(name, conv, forms, positions_in=sh.positions_in, positions_out=sh.positions_out,
                            calls=sh.calls)
        if bias:
            opt = replace(opt, choices=tuple(c if c.form == "original" else replace(c, params=c.params + bias)
                                             for c in opt.choices))
        options.append(opt)
    how = "weight"
    if calibration is not None and errors in ("auto", "data", "sensitivity") and options:
        from ..calibrate import measure_choices, output_sensitivity

        options = measure_choices(gm, options, {n: everything[n][1] for n in (o.name for o in options)}, calibration)
        how = "data"
        if errors == "sensitivity":
            sens = output_sensitivity(gm, [o.name for o in options], calibration)
            options = [replace(o, weight=o.weight * sens[o.name]) for o in options]
            how = "sensitivity"
    max_macs = None if target_macs is None else target_macs * total_macs - fixed_macs
    max_params = None if target_params is None else target_params * total_params - fixed_params
    try:
        alloc = allocate(options, max_macs=max_macs, max_params=max_params)
    except SurgeryError as exc:
        floor_m = fixed_macs + sum(min(o.macs(c) for c in o.choices) for o in options)
        floor_p = fixed_params + sum(min(c.params for c in o.choices) for o in options)
        lows = []
        if total_macs:
            lows.append(f"{floor_m / total_macs:.3f} of the MACs")
        lows.append(f"{floor_p / total_params:.3f} of the parameters")
        raise SurgeryError(
            f"separable: the budget cannot be met: rewriting every candidate at its cheapest still leaves "
            f"{' and '.join(lows)} (the rest of the model is not rewritten by this pass). {exc}"
            + (f"; {hint}" if hint else "")
        ) from None
    return BudgetPlan(alloc, options, total_macs, total_params, fixed_macs, fixed_params, target_macs,
                      target_params, counter, how)


def budget_layers(
    gm: fx.GraphModule,
    candidates: Sequence[Any],
    form: str,
    layers: dict[str, dict[str, Any]],
    *,
    target_macs: float | None,
    target_params: float | None,
    calibration: Any = None,
    errors: str = "auto",
    added_bias: bool = False,
    hint: str | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, LayerChoice], BudgetPlan]:
    """The separable pass's budget step: per-layer settings meeting the budget, and the layers to keep.

    Args:
        candidates: the pass's candidates (``name``, ``aliases``, ``conv``).
        form: a registered form, or ``"auto"`` to choose among all registered forms per layer.
        layers: the user's per-layer settings; those layers are not chosen but their cost counts.
        added_bias / hint: as for :func:`plan_budget`.

    Returns:
        ``(settings, kept, plan)``: ``settings`` is ``{name: {"form", "rank"}}`` for the layers to rewrite,
        ``kept`` the layers whose best use of the budget is to stay as they are, ``plan`` the figures.
    """
    from ..forms.registry import auto_forms

    forms = auto_forms(pointwise=None) if form == "auto" else [form]
    convs = {c.name: (list(c.aliases), c.conv) for c in candidates}
    fixed = {}
    for c in candidates:
        spec = next((layers[a] for a in c.aliases if a in layers), None)
        if isinstance(spec, dict) and "rank" in spec:
            fname = layer_form(spec, form, c.conv)
            fixed[c.name] = get_form(fname).cost(c.conv, int(spec["rank"]))
    # with $FXSURGEON_CACHE_DIR set, the CP menu errors are kept where latency budgets keep theirs (one file
    # serves both); without it a MAC budget writes nothing outside the model
    store = CPErrorStore(default_cache_dir()) if cache_root_set() is not None else None
    with cp_error_store(store):
        plan = plan_budget(gm, convs, forms, target_macs=target_macs, target_params=target_params, fixed=fixed,
                           calibration=calibration, errors=errors, added_bias=added_bias, hint=hint)
    if store is not None:
        store.flush()
        plan.cp_errors = store.summary()
    settings = plan.allocation.ranks()
    kept = {n: c for n, c in plan.allocation.picks.items() if c.form == "original"}
    return settings, kept, plan
