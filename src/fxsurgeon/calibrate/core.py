"""calibrate(): refit a converted model's rewritten layers to reproduce the original on data, and record it."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import SurgeryError
from ..modes import eval_modes as _eval_modes
from ..runtime import device_of, to_device
from .batchnorm import downstream_batchnorms
from .data import as_batches, forward_batch, rel_error_of_outputs
from .refit import bn_frontier, bn_streaming, refit_frontier, refit_streaming
from .solve import DEFAULT_RIDGE
from .specs import CalibrationReport, RefitSpec, downstream_candidates, refit_specs
from .stepper import call_order, containing_nodes, peak_bytes

__all__ = ["annotate_record", "calibrate"]


#: frontier execution keeps every batch's live activations at once; above this it streams instead
FRONTIER_MAX_BYTES = 3 * 2**30


def _choose_mode(
    converted: nn.Module, original: nn.Module, batches: Sequence[tuple], mode: str
) -> tuple[str, fx.GraphModule | None]:
    """``"frontier"`` when both models are fx graphs and all batches' activations fit, else ``"streaming"``."""
    if mode == "streaming":
        return "streaming", None
    ref_gm = original if isinstance(original, fx.GraphModule) else None
    if ref_gm is None and isinstance(converted, fx.GraphModule):
        from ..tracing import trace

        try:
            ref_gm = trace(original)
        except Exception:  # an original fx cannot trace still calibrates, by streaming
            ref_gm = None
    if not isinstance(converted, fx.GraphModule) or ref_gm is None:
        if mode == "frontier":
            raise SurgeryError("calibrate: mode='frontier' needs both models as torch.fx graphs")
        return "streaming", None
    if mode == "auto":
        need = (peak_bytes(converted, batches[0]) + peak_bytes(ref_gm, batches[0])) * len(batches)
        if need > FRONTIER_MAX_BYTES:
            return "streaming", None
    return "frontier", ref_gm


def _downstream_specs(converted: nn.Module, reference: nn.Module, ref_gm: fx.GraphModule | None, batch: tuple,
                      specs: Sequence[RefitSpec], rewrites: Sequence[Any]) -> list[RefitSpec]:
    """Refit specs for the layers no rewrite replaced that the rewritten layers' outputs reach.

    On an fx graph (frontier mode) "reach" is a path in the graph from a refit layer's node, and a layer must
    be called from one node in each model; otherwise it is "called after the first refit layer".
    """
    names = downstream_candidates(converted, reference, rewrites, specs)
    if not names or not specs:
        return []
    if ref_gm is not None and isinstance(converted, fx.GraphModule):
        reached: set[fx.Node] = set()
        todo = [n for s in specs for n in containing_nodes(converted, s.layer)]
        while todo:
            for user in todo.pop().users:
                if user not in reached:
                    reached.add(user)
                    todo.append(user)
        keep = [n for n in names if len(sites := containing_nodes(converted, n)) == 1 and sites[0] in reached
                and containing_nodes(ref_gm, n)]
    else:
        order = call_order(converted, batch, [s.layer for s in specs] + names)
        first = min(order.index(s.layer) for s in specs)
        wanted = set(names)
        keep = [n for n in order[first + 1:] if n in wanted]
    return [RefitSpec(n, n, n, downstream=True) for n in keep]


def calibrate(
    converted: nn.Module,
    original: nn.Module,
    calibration: Any,
    *,
    rewrites: Iterable[Any] | None = None,
    ridge: float = DEFAULT_RIDGE,
    bn: bool | str = "auto",
    mode: str = "auto",
    targets: str = "block",
    relu: bool = True,
    downstream: bool = True,
) -> CalibrationReport:
    """Refit ``converted``'s rewritten layers, in network order, to reproduce ``original`` on real data.

    Edits ``converted`` in place; ``original`` is only run. Each refit layer's inputs come from the
    converted model as calibrated so far and its targets from the original layer in the original model
    (see the module docstring for the maths). A refit that would not lower the layer's error on the
    calibration data is not applied.

    Args:
        converted: the model from :func:`fxsurgeon.convert` (or any model whose module names match).
        original: the model before conversion (same qualified names for the rewritten modules).
        calibration: a tensor (one batch) or an iterable of batches (tensors or tuples of inputs), e.g. a
            few hundred to a few thousand training images. Iterated once per refit layer.
        rewrites: the rewrites to calibrate; default: every rewrite in ``converted``'s record.
        ridge: λ as a fraction of the mean eigenvalue of the layer's input Gram matrix (shrinks the refit
            towards the current weights).
        bn: re-estimate the statistics of BatchNorm layers downstream of the rewrites: ``True``, ``False`` or
            ``"auto"`` (keep the new statistics only when the output error on the calibration data falls).
        mode: ``"frontier"`` runs fx graphs node by node over all batches at once (each node once per batch;
            memory: the widest cut of activations times the data), ``"streaming"`` re-runs the models up to
            each layer batch by batch (any model, little memory, slower); ``"auto"`` picks frontier when the
            activations fit in :data:`FRONTIER_MAX_BYTES`.
        targets: ``"block"`` refits a layer that feeds a residual sum (through at most a BatchNorm) to make
            the sum match the original's; ``"layer"`` matches each layer's own output. Block targets need
            frontier mode (streaming uses layer targets); each layer's ``target_kind`` says which it got.
        relu: a layer whose output (or residual sum) goes through at most a BatchNorm into a ReLU is asked
            only for what the ReLU passes on: where the original's ReLU outputs zero, any output the ReLU
            also zeroes is as good. After the plain fit, :data:`RELU_ROUNDS` refits to targets relaxed there
            (alternating minimisation; the Gram matrix is reused). Such a layer's ``relu_relaxed`` is the share
            of positions the original's ReLU zeroes, and its errors are measured as the ReLU sees them (a zeroed
            position counts only by how far the output would pass the ReLU). Frontier mode only.
        downstream: also refit the plain layers the rewrites' outputs reach but no rewrite replaced (a kept
            conv, a downsampling 1×1 conv, the classifier), each against its namesake in the original, so they
            compensate the error passed down to them. Reported with ``downstream=True``; kept only where the
            layer's error on the calibration data falls, like every refit, and only with at least
            :data:`~fxsurgeon.calibrate.stats.DOWNSTREAM_ROWS_PER_UNKNOWN` rows of data per unknown. In
            streaming mode each costs one more pass over the data.

    Returns:
        A :class:`CalibrationReport`; the converted model's record, when it has one, gets it at
        ``extras["calibration"]`` and each rewrite gets ``details["calibration"]`` (error before/after).

    >>> import torch, torch.nn as nn, fxsurgeon
    >>> net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    >>> small = fxsurgeon.convert(net, separable=dict(multiplier=1))
    >>> rep = calibrate(small, net, [torch.randn(8, 8, 12, 12) for _ in range(4)])
    >>> rep.output_error_after < rep.output_error_before
    True
    """
    from ..record import Conversion, find_record

    if mode not in ("auto", "frontier", "streaming"):
        raise SurgeryError(f"calibrate: mode must be 'auto', 'frontier' or 'streaming', got {mode!r}")
    if targets not in ("layer", "block"):
        raise SurgeryError(f"calibrate: targets must be 'layer' or 'block', got {targets!r}")
    if not isinstance(relu, bool):
        raise SurgeryError(f"calibrate: relu must be True or False, got {relu!r}")
    if not isinstance(downstream, bool):
        raise SurgeryError(f"calibrate: downstream must be True or False, got {downstream!r}")
    if bn not in (True, False, "auto"):
        raise SurgeryError(f"calibrate: bn must be True, False or 'auto', got {bn!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise SurgeryError(f"calibrate: ridge must be a number >= 0, got {ridge!r}")
    t0 = time.perf_counter()
    batches = as_batches(calibration)
    record = find_record(converted)
    if rewrites is None:
        if not isinstance(record, Conversion):
            raise SurgeryError("calibrate: the converted model carries no fxsurgeon record; pass rewrites=")
        rewrites = record.rewrites
    rewrites = list(rewrites)
    report = CalibrationReport(batches=len(batches), options={"ridge": ridge, "bn": bn, "targets": targets,
                                                                  "relu": relu, "downstream": downstream})
    report.samples = sum(int(b[0].shape[0]) for b in batches if isinstance(b[0], torch.Tensor) and b[0].dim())
    if not rewrites:
        report.seconds = time.perf_counter() - t0
        return report
    device = device_of(converted)
    batches = [to_device(b, device) for b in batches]
    with _eval_modes(converted, original), torch.no_grad():
        report.mode, ref_gm = _choose_mode(converted, original, batches, mode)
        specs, skipped = refit_specs(converted, original, rewrites)
        if downstream:
            more = _downstream_specs(converted, original, ref_gm, batches[0], specs, rewrites)
            specs += more
            # an exact rewrite's module refit downstream (a conv head) is no longer "nothing to refit"
            skipped = [x for x in skipped if x.target not in {s.layer for s in more}]
        order = call_order(converted, batches[0], [s.layer for s in specs])
        by_layer = {s.layer: s for s in specs}
        specs = [by_layer[n] for n in order]
        before = [forward_batch(converted, b, "the converted model") for b in batches]
        if report.mode == "frontier":
            results, after, ref_out = refit_frontier(converted, ref_gm, batches, specs, float(ridge),
                                                      block=targets == "block", relu=relu)
        else:
            ref_out = [forward_batch(original, b, "the original model") for b in batches]
            results = [refit_streaming(converted, original, batches, s, float(ridge), None) for s in specs]
            after = [forward_batch(converted, b, "the converted model") for b in batches]
        rank = {n: i for i, n in enumerate(order)}
        report.layers = sorted(results, key=lambda r: rank.get(r.layer, -1)) + skipped
        report.output_error_before = rel_error_of_outputs(before, ref_out)
        del before
        err = rel_error_of_outputs(after, ref_out)
        if bn is not False:
            bns = downstream_batchnorms(converted, [r.target for r in rewrites])
            saved = {n: {k: v.clone() for k, v in converted.get_submodule(n).state_dict().items()} for n in bns}
            if report.mode == "frontier":
                count, with_bn = bn_frontier(converted, batches, bns)
            else:
                count = bn_streaming(converted, batches, bns, None)
                with_bn = [forward_batch(converted, b, "the converted model") for b in batches]
            err_bn = rel_error_of_outputs(with_bn, ref_out) if count else err
            keep = bool(count) and (bn is True or err_bn < err)
            report.batchnorm = {"modules": count, "output_error_without": err, "output_error_with": err_bn,
                                "kept": keep}
            if keep:
                err = err_bn
            else:
                for n, st in saved.items():
                    converted.get_submodule(n).load_state_dict(st)
        report.output_error_after = err
    report.seconds = time.perf_counter() - t0
    if isinstance(record, Conversion):
        annotate_record(record, report)
    return report


def annotate_record(record: Any, report: CalibrationReport) -> None:
    """Put ``report`` in ``record.extras["calibration"]`` and each rewrite's ``details["calibration"]``.

    A rewrite with one refit layer gets ``{"layer", "error_before", "error_after", "refit"[, "reason"]}``;
    one with several (a concat fusion's consumers) gets a list of them.
    """
    record.extras["calibration"] = report.to_dict()
    per: dict[str, list[dict[str, Any]]] = {}
    for x in report.layers:
        entry = {"layer": x.layer, "error_before": x.error_before, "error_after": x.error_after, "refit": x.refit}
        if x.reason:
            entry["reason"] = x.reason
        per.setdefault(x.target, []).append(entry)
    for rw in record.rewrites:
        if rw.target in per:
            entries = per[rw.target]
            rw.details["calibration"] = entries[0] if len(entries) == 1 else entries
