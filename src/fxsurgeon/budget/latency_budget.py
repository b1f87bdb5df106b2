"""Latency budgets: choose each layer's (form, rank) so the whole model runs in a fraction of its measured time.

``separable=dict(target_latency=0.6)`` asks for a model that runs in 0.6× the original's time where it will
run (``latency_aware=dict(device=..., dtype=..., batch_size=..., channels_last=..., compile=...)`` say where;
see :class:`fxsurgeon.budget.latency.LatencyJudge`). The steps:

1. **Tables.** Per rewritable conv, the original and each candidate the allocation may pick — each form's
   ranks on a coarse grid of hardware-friendly multiples — are timed at the layer's real input shapes
   (:class:`fxsurgeon.budget.latency_table.LatencyTable`: random weights, equal shapes shared, cached on disk).
2. **Menus.** Candidates slower than the original are dropped (keeping the conv is faster and exact); the
   rest get their error — the weight error, or with calibration data the measured output error after a
   refit, as for MAC budgets (:mod:`fxsurgeon.budget.allocation`).
3. **Allocation.** The same least-error-per-unit-of-cost allocation as MAC budgets
   (:func:`fxsurgeon.budget.allocation.allocate`), with measured milliseconds as the cost. The budget for the
   rewritable layers is what they take in the original minus the saving the target asks for; then every
   layer's choice is refined once (the ranks halfway to its grid neighbours are timed and offered) and the
   allocation re-solved.
4. **End-to-end check.** The converted model (random weights of the chosen shapes) is timed against the
   original, interleaved (:func:`fxsurgeon.budget.latency.interleaved_ratio`). Layers timed alone are not layers
   in a model, so when the measured ratio misses the target by more than ``tolerance``, the budget is
   corrected by the ratio of measured to predicted saving and re-solved, up to ``solve_rounds`` checks.
   The conversion kept is the checked one that meets the target with the least error, else the fastest;
   one that does not beat the original is never kept (every conv stays as it is), with a warning.

``target_macs`` or ``target_params`` may be given too: the allocation then meets both budgets.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..errors import SurgeryError
from ..forms.registry import LayerChoice, auto_forms, conv_cost, get_form, layer_form
from ..runtime import compile_options, dtype_name, parse_dtype, resolve_device
from .allocation import LayerOptions, added_bias_params
from .latency import LatencyJudge, call_site_inputs, has_shapes
from .latency_search import LatencySolver, choice_loss, menu_ranks, placed_model
from .latency_table import ORIGINAL, LatencyTable, hardware_multiple
from .plan import check_budget_options, conv_shapes, example_inputs_from_graph, model_macs

__all__ = ["LatencyPlan", "budget_latency", "menu_ranks"]


@dataclass
class LatencyPlan:
    """What a latency-budgeted separable pass decided: the picks and everything measured on the way."""

    settings: dict[str, dict[str, Any]]
    kept: dict[str, LayerChoice]
    summary: dict[str, Any]


def _second_budget(target_macs: float | None, target_params: float | None) -> str | None:
    if target_macs is not None and target_params is not None:
        raise SurgeryError("separable: target_latency combines with one of target_macs / target_params, not both "
                           "(the allocation meets two budgets at once); drop one of them")
    return "macs" if target_macs is not None else "params" if target_params is not None else None


def _placement(judge: LatencyJudge, gm: fx.GraphModule) -> tuple[torch.device, torch.dtype, bool, int]:
    meta = next((n.meta.get("tensor_meta") for n in gm.graph.nodes if n.op == "placeholder"), None)
    dev = resolve_device(judge.device, gm)
    dtype = parse_dtype(judge.dtype) or getattr(meta, "dtype", None) or torch.float32
    if judge.channels_last is not None:
        cl = bool(judge.channels_last)
    else:
        cl = getattr(meta, "memory_format", None) == torch.channels_last
    shape = getattr(meta, "shape", None)
    batch = judge.batch_size or (int(shape[0]) if shape is not None and len(shape) else 1)
    return dev, dtype, cl, batch


def _model_inputs(gm: fx.GraphModule, device: torch.device, dtype: torch.dtype, cl: bool, batch: int) -> tuple:
    inputs = example_inputs_from_graph(gm)
    if inputs is None:
        raise SurgeryError("separable: target_latency times the whole model, and its input shapes are unknown: "
                           "pass example_inputs= to convert()")
    gen = torch.Generator().manual_seed(0)
    out = []
    for x in inputs:
        shape = [batch, *x.shape[1:]] if x.dim() else list(x.shape)
        if x.is_floating_point():
            t = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        else:
            t = torch.zeros(shape, dtype=x.dtype, device=device)
        if cl and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return tuple(out)


def budget_latency(
    gm: fx.GraphModule,
    candidates: Sequence[Any],
    form: str,
    layers: dict[str, dict[str, Any]],
    *,
    target_latency: float,
    judge: LatencyJudge,
    target_macs: float | None = None,
    target_params: float | None = None,
    calibration: Any = None,
    errors: str = "auto",
    added_bias: bool = False,
    hint: str | None = None,
) -> LatencyPlan:
    """The separable pass's latency-budget step (see the module docstring).

    Args:
        gm: the traced model before rewriting, after ShapeProp.
        candidates: the pass's candidates (``name``, ``aliases``, ``conv``; the conv possibly importance-scaled).
        form: a registered form, or ``"auto"`` for every registered form.
        layers: the user's per-layer settings: those layers are not chosen, their time counts.
        target_latency: fraction of the original model's measured latency to reach, in (0, 1].
        judge: where and how to time.
        target_macs / target_params: a second budget (one of them), as for MAC budgets.
        calibration / errors / added_bias: as for :func:`fxsurgeon.budget.plan.plan_budget`.
        hint: what else could reach the target, added to the status and warning when it is not met (the pass
            names the 1×1 convs that ``kernel_sizes`` left out).

    Returns:
        A :class:`LatencyPlan`: ``settings`` ``{name: {"form", "rank"}}`` to rewrite, ``kept`` the layers left
        as they are, ``summary`` for ``record.extras["allocation"]``.
    """
    t_start = time.perf_counter()
    if isinstance(target_latency, bool) or not isinstance(target_latency, (int, float)) or not 0 < target_latency <= 1:
        raise SurgeryError(f"separable: target_latency is a fraction of the original model's measured latency in "
                           f"(0, 1], got {target_latency!r}")
    check_budget_options(target_macs, target_params, errors, calibration)
    second = _second_budget(target_macs, target_params)
    if not has_shapes(gm):
        raise SurgeryError("separable: target_latency times each layer at its real input shape, and this graph has "
                           "none: pass example_inputs= to convert()")
    forms = auto_forms(latency=True, pointwise=None) if form == "auto" else [form]
    dev, dtype, cl, batch = _placement(judge, gm)
    if judge.runtime == "onnxruntime" and (dev.type != "cpu" or dtype != torch.float32):
        raise SurgeryError(f"separable: latency_aware runtime='onnxruntime' times float32 on the CPU; this budget "
                           f"would time {dtype_name(dtype)} on {dev}: set device='cpu' (and dtype='fp32')")
    if judge.runtime == "onnxruntime":
        cl = False  # onnxruntime takes contiguous arrays and picks its own layout
    multiple = judge.rank_multiple or hardware_multiple(dev)
    table = LatencyTable(judge, dev, dtype, cl, batch, cache_dir=judge.cache_dir)
    compile_opts = compile_options(judge.compile)
    solver = LatencySolver(gm, judge, table, forms, multiple, second, bool(added_bias), (dev, dtype, cl, compile_opts))

    convs = {c.name: (list(c.aliases), c.conv) for c in candidates}
    shapes = conv_shapes(gm, convs)
    fixed_saving = 0.0
    fixed_second = 0.0
    untimed: dict[str, str] = {}
    for cand in candidates:
        metas = call_site_inputs(gm, cand.aliases)
        spec = next((layers[a] for a in cand.aliases if a in layers), None)
        sh = shapes[cand.name]
        if isinstance(spec, dict) and "rank" in spec:  # the user decided: its time and cost count as fixed
            fname = layer_form(spec, form, cand.conv, latency=True)
            rank = int(spec["rank"])
            c = get_form(fname).cost(cand.conv, rank)
            solver.fixed[cand.name] = (list(cand.aliases), cand.conv, fname, c.rank)
            if metas is not None:
                ms = solver.table.measure(cand.conv, [ORIGINAL, (fname, c.rank)], [list(m.shape) for m in metas])
                fixed_saving += ms[ORIGINAL] - ms[(fname, c.rank)]
            fixed_second += (sh.calls * c.macs(sh.positions_in, sh.positions_out) if second == "macs"
                             else c.params + added_bias_params(cand.conv, added_bias))
            continue
        if metas is None:
            untimed[cand.name] = ("input shape unknown (the conv runs inside a leaf module, where ShapeProp does not "
                                  "see it): it cannot be timed, so it is kept")
            o = conv_cost(cand.conv)
            fixed_second += sh.calls * o.macs(sh.positions_in, sh.positions_out) if second == "macs" else o.params
            continue
        solver.add_layer(cand.name, list(cand.aliases), cand.conv, [list(m.shape) for m in metas], sh.calls,
                         sh.positions_in, sh.positions_out)
    for lay in solver.layers:
        solver.build_menu(lay)

    # errors: data-free relative weight error, or measured on calibration data (as MAC budgets do)
    how = "weight"
    weights: dict[str, float] = {}
    for lay in solver.layers:
        norm2 = float(lay.conv.weight.detach().double().pow(2).sum())
        weights[lay.name] = 1.0 / norm2 if norm2 > 0 else 1.0
    if calibration is not None and errors in ("auto", "data", "sensitivity") and solver.layers:
        from ..calibrate import measure_choices, output_sensitivity

        plain = [LayerOptions(lay.name, tuple(lay.menu), lay.positions_in, lay.positions_out) for lay in solver.layers]
        measured = measure_choices(gm, plain, {lay.name: convs[lay.name][1] for lay in solver.layers}, calibration)
        for lay, opt in zip(solver.layers, measured):
            lay.menu = list(opt.choices)
            weights[lay.name] = 1.0
        how = "data"
        if errors == "sensitivity":
            sens = output_sensitivity(gm, [lay.name for lay in solver.layers], calibration)
            weights = {n: w * sens[n] for n, w in weights.items()}
            how = "sensitivity"

    # the whole model, once, for the budget's reference
    solver.inputs = _model_inputs(gm, dev, dtype, cl, batch)
    solver.original = placed_model(gm, dev, dtype, cl, compile_opts, judge, solver.inputs)
    total_second = None
    if second == "macs":
        raw, _counter = model_macs(gm, example_inputs_from_graph(gm))
        ex_batch = next(iter(shapes.values())).batch if shapes else 1
        total_second = raw / max(ex_batch, 1)
        fixed_second += total_second - sum(sh.calls * conv_cost(convs[n][1]).macs(sh.positions_in, sh.positions_out)
                                           for n, sh in shapes.items())
    elif second == "params":
        total_second = float(sum(p.numel() for p in gm.parameters()))
        fixed_second += total_second - sum(conv_cost(convs[n][1]).params for n in convs)
    max_second = None
    if second is not None:
        target2 = target_macs if second == "macs" else target_params
        max_second = target2 * total_second - fixed_second

    solver.weights, solver.max_second, solver.calibration, solver.convs, solver.how = (
        weights, max_second, calibration, convs, how)
    notes: list[str] = []
    found = solver.search(target_latency, fixed_saving, notes)
    best, checks, t_orig = found.best, found.checks, found.original_ms

    used = [f for f in forms if any(lay.ranks.get(f) for lay in solver.layers)] or forms
    if best is None:
        final: dict[str, LayerChoice] = {lay.name: lay.menu[-1] for lay in solver.layers}
        final_check = None
        if not found.choosable:
            status = (f"no candidate of {', '.join(used)} is faster than the original conv at any layer on "
                      f"{dev} ({dtype_name(dtype)}, batch {batch}): every conv is kept")
        else:
            ratios = ", ".join(f"{c['ratio']:.3f}" for c in checks)
            status = (f"no conversion measured faster than the original (measured ratios {ratios}): every conv "
                      "is kept")
        status += f"; {hint}" if hint else ""
        if solver.layers:
            warnings.warn(f"separable: target_latency={target_latency} not met: {status}", stacklevel=3)
    else:
        final, final_check = best[1], best[2]
        ratio = final_check["ratio"]
        if ratio <= target_latency + judge.tolerance:
            status = "met"
        else:
            status = (f"not met: the best conversion found measures {ratio:.3f}× the original's latency "
                      f"(asked {target_latency}, tolerance {judge.tolerance})" + (f"; {hint}" if hint else ""))
            warnings.warn(f"separable: target_latency={target_latency} {status}; it is returned", stacklevel=3)
    table.flush()
    if solver.store is not None:
        solver.store.flush()

    settings = {n: {"form": c.form, "rank": c.rank} for n, c in final.items() if c.form != "original"}
    kept = {n: c for n, c in final.items() if c.form == "original"}
    kept.update((n, conv_cost(convs[n][1])) for n in untimed)  # kept, as the summary says, not rewritten
    by_name = {lay.name: lay for lay in solver.layers}
    layer_rows = {}
    for n, c in final.items():
        lay = by_name[n]
        layer_rows[n] = {"form": c.form, "rank": c.rank, "ms": lay.ms[(c.form, c.rank)],
                         "original_ms": lay.ms[ORIGINAL],
                         "macs": lay.calls * c.macs(lay.positions_in, lay.positions_out), "params": c.params,
                         "error": weights[n] * choice_loss(c), "input_shapes": lay.shapes,
                         "timed": {f"{f}:{r}": round(v, 6) for (f, r), v in sorted(lay.ms.items())}}
    summary = {
        "target_latency": target_latency, "target_macs": target_macs, "target_params": target_params,
        "status": status, "measured_ratio": final_check["ratio"] if final_check else None,
        "measured_ratio_min": final_check["ratio_min"] if final_check else None,
        "measured_ratio_max": final_check["ratio_max"] if final_check else None,
        "original_ms": final_check["original_ms"] if final_check else t_orig,
        "converted_ms": final_check["converted_ms"] if final_check else None,
        "tolerance": judge.tolerance, "checks": checks, "notes": notes,
        "device": str(dev), "runtime": judge.runtime, "dtype": dtype_name(dtype),
        "memory_format": "channels_last" if cl else "contiguous",
        "batch_size": batch, "compile": judge.compile if not isinstance(judge.compile, dict) else dict(judge.compile),
        "rank_multiple": multiple, "forms": used, "errors": how, "table": table.summary(),
        "cp_errors": solver.store.summary() if solver.store is not None else None,
        "untimed": untimed, "fixed_layers_saving_ms": fixed_saving, "seconds": round(time.perf_counter() - t_start, 3),
        "layers": layer_rows, "macs_per": "sample",
    }
    return LatencyPlan(settings, kept, summary)
