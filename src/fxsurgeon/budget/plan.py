"""Whole-model budgets for the separable pass: the model's MACs and each conv's sizes, then one allocation.

:func:`budget_layers` is the separable pass's ``target_macs`` / ``target_params`` step: it measures where each
conv runs (:func:`conv_shapes`, from ShapeProp) and the whole model's MACs (:func:`model_macs`, fvcore's count:
one multiply-add is one "flop"), builds every layer's menu (:func:`fxsurgeon.budget.allocation.layer_options`),
scores it on weight errors or on calibration data, and solves one allocation for the whole model
(:func:`plan_budget`, :func:`fxsurgeon.budget.allocation.allocate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import SurgeryError
from ..forms.cp_store import CPErrorStore, cp_error_store
from ..forms.registry import LayerChoice, conv_cost, get_form, layer_form
from ..modes import eval_modes
from ..runtime import data_device_of
from .allocation import Allocation, LayerOptions, added_bias_params, allocate, layer_options
from .latency_table import cache_root_set, default_cache_dir

__all__ = ["BudgetPlan", "LayerShape", "budget_layers", "check_budget_options", "conv_shapes",
           "example_inputs_from_graph", "model_macs", "plan_budget"]


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


def check_budget_options(target_macs: Any, target_params: Any, errors: Any, calibration: Any) -> None:
    """Refuse a MAC or parameter fraction outside (0, 1], an unknown error measure, or a data measure without data.

    >>> check_budget_options(0.6, None, "data", None)
    Traceback (most recent call last):
    ...
    fxsurgeon.errors.SurgeryError: separable: errors='data' needs calibration batches (convert(..., calibration=...))
    """
    if errors not in ("auto", "weight", "data", "sensitivity"):
        raise SurgeryError(f"separable: allocation errors must be 'auto', 'weight', 'data' or 'sensitivity', "
                           f"got {errors!r}")
    for what, v in (("target_macs", target_macs), ("target_params", target_params)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
            raise SurgeryError(f"separable: {what} is a fraction of the original model's in (0, 1], got {v!r}")
    if errors in ("data", "sensitivity") and calibration is None:
        raise SurgeryError(f"separable: errors='{errors}' needs calibration batches (convert(..., calibration=...))")


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
    check_budget_options(target_macs, target_params, errors, calibration)
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
        why = str(exc)
        floor_m = fixed_macs + sum(min(o.macs(c) for c in o.choices) for o in options)
        floor_p = fixed_params + sum(min(c.params for c in o.choices) for o in options)
        lows = []
        if total_macs:
            lows.append(f"{floor_m / total_macs:.3f} of the MACs")
        lows.append(f"{floor_p / total_params:.3f} of the parameters")
        raise SurgeryError(
            f"separable: the budget cannot be met: rewriting every candidate at its cheapest still leaves "
            f"{' and '.join(lows)} (the rest of the model is not rewritten by this pass). {why[:1].upper()}{why[1:]}"
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
