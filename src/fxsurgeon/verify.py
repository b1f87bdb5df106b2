"""Verification: the converted model against the caller's own, on the example inputs.

:func:`verify_traced` measures what tracing alone changed (before any pass) and refuses a trace that already
differs; :func:`verify_converted` compares the converted model's outputs with the reference, refuses NaN/Inf
the original did not produce and exact rewrites beyond the tolerance, and returns the record's
:class:`~fxsurgeon.record.Verification`. The messages say what differs, where, and what the user can do.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from .errors import SurgeryError
from .record import Conversion, Verification
from .runtime import model_name, run_forward
from .tracing import TraceReport, lost_hooks

__all__ = ["DEFAULT_TOLERANCE", "compare_outputs", "exact_failed", "loosest_dtype", "nonfinite_cause", "nonfinite_count",
           "nonfinite_mismatch", "output_dtype", "tolerance_for", "traced_differs", "verify_converted",
           "verify_traced", "warn_lost_hooks"]


#: relative L2 error allowed for rewrites that claim to be exact, by output dtype
DEFAULT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def compare_outputs(reference: Any, output: Any) -> tuple[float, float]:
    """(max abs error, relative L2 error) over all tensors of two output structures (tuples, dicts, ...)."""
    ref_leaves, ref_spec = tree_flatten(reference)
    out_leaves, out_spec = tree_flatten(output)
    if ref_spec != out_spec:
        raise SurgeryError(f"converted model returns a different output structure: {out_spec} vs {ref_spec}")
    max_abs, diff2, ref2 = 0.0, 0.0, 0.0
    for r, o in zip(ref_leaves, out_leaves):
        if not isinstance(r, torch.Tensor):
            continue
        if r.shape != o.shape:
            raise SurgeryError(f"converted model output shape {tuple(o.shape)} differs from {tuple(r.shape)}")
        if not r.is_floating_point():
            continue
        d = (o.double() - r.double())
        d[(o == r) | (o.isnan() & r.isnan())] = 0.0  # the same ±Inf or NaN is no difference
        r = torch.where(r.isfinite(), r, 0.0)
        if d.numel():
            max_abs = max(max_abs, float(d.abs().max()))
        diff2 += float(d.pow(2).sum())
        ref2 += float(r.double().pow(2).sum())
    rel = (diff2 / ref2) ** 0.5 if ref2 > 0 else (0.0 if diff2 == 0 else float("inf"))
    return max_abs, rel


def nonfinite_mismatch(reference: Any, output: Any) -> str | None:
    """Where ``output`` has NaN or ±Inf that ``reference`` does not (same structure): a description, or None."""
    ref_leaves, _ = tree_flatten(reference)
    out_leaves, _ = tree_flatten(output)
    for i, (r, o) in enumerate(zip(ref_leaves, out_leaves)):
        if not (isinstance(r, torch.Tensor) and isinstance(o, torch.Tensor) and r.is_floating_point()
                and r.shape == o.shape):
            continue
        new_nan = o.isnan() & ~r.isnan()
        new_inf = o.isinf() & (o != r)
        if bool(new_nan.any()) or bool(new_inf.any()):
            where = f"output {i}" if len(ref_leaves) > 1 else "the output"
            return (f"{int(new_nan.sum())} NaN and {int(new_inf.sum())} ±Inf value(s) in {where} where the original "
                    f"has {int(r.isinf().sum())} ±Inf and {int(r.isnan().sum())} NaN in all")
    return None


def nonfinite_count(inputs: Any) -> list[tuple[int, int]]:
    """``[(index, count of NaN/±Inf)]`` for each floating tensor among ``inputs`` (a flat tuple) that has any."""
    out = []
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.device.type != "meta":
            bad = int((~x.isfinite()).sum())
            if bad:
                out.append((i, bad))
    return out


_PRECISION = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 3, torch.float16: 2}


def loosest_dtype(output: Any, model: nn.Module) -> torch.dtype:
    """The lowest-precision floating dtype among the outputs and the model's parameters: a float32 model with
    float16 layers rounds like float16 there, so exact rewrites are held to float16's tolerance."""
    dtypes = {output_dtype(output)}
    dtypes |= {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    return max(dtypes, key=lambda d: _PRECISION.get(d, 1))


def output_dtype(output: Any) -> torch.dtype:
    leaves, _ = tree_flatten(output)
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32


def _lost_forward_hooks(hooked: dict[str, list[str]], gm: fx.GraphModule) -> str:
    lost = {n: k for n, k in lost_hooks(hooked, gm).items() if any(x.startswith("forward") for x in k)}
    return ", ".join(f"'{n or '<root>'}' ({'/'.join(k)})" for n, k in sorted(lost.items())[:4])


def traced_differs(model: nn.Module, err: float, tol: float, hooked: dict[str, list[str]], gm: fx.GraphModule,
                    report: TraceReport) -> str:
    causes = []
    hooks = _lost_forward_hooks(hooked, gm)
    if hooks:
        causes.append(f"forward hooks on {hooks} do not run in the traced graph (torch.fx inlines those forwards)")
    if report.written_buffers:
        causes.append(f"forward writes buffer(s) {', '.join(repr(b) for b in report.written_buffers[:4])} in "
                      "Python, which torch.fx ran once while tracing and left out of the graph")
    if report.context_changes:
        causes.append("the forward's grad-mode blocks are dropped")
    why = "; ".join(causes) or ("torch.fx fixed something while tracing that differs when the model runs "
                                "(Python side effects, values read outside the graph)")
    fix = "remove or re-register those hooks, " if hooks else ""
    return (f"torch.fx's trace of {model_name(model)} already differs from the model itself on example_inputs, "
            f"before any rewrite (relative L2 error {err:.3g} > tolerance {tol:g}): {why}. This comes from the "
            f"model, not from a rewrite: {fix}make the modules involved leaf_modules (their forward then runs as "
            "written), or pass verify=False to convert what the trace computes.")


def nonfinite_cause(record: Conversion) -> str:
    exact = sorted({r.pass_name for r in record.rewrites if r.exact})
    if exact:
        return (f"rewrites of {', '.join(exact)} are exact for finite activations only — an ±Inf reaching a "
                "rewritten layer becomes NaN (0·Inf), so the original overflows inside. Scale the inputs or "
                "weights so activations stay finite, or leave those layers out of the conversion.")
    return ("the approximate rewrites overflow where the original does not; convert with fewer layers "
            "(exclude=...) or a larger multiplier, or calibrate.")


def exact_failed(record: Conversion, rel: float, tol: float, max_abs: float, hooked: dict[str, list[str]],
                  gm: fx.GraphModule, mode: str) -> str:
    head = (f"rewrites that claim to be exact changed {record.model}'s output: relative L2 error {rel:.3g} "
            f"> tolerance {tol:g} (max abs {max_abs:.3g})")
    hooks = _lost_forward_hooks(hooked, gm)
    if hooks:
        return (f"{head}; forward hooks on {hooks} no longer run in the converted model (the modules were "
                "rewritten or inlined), and hooks that change outputs are the model's input, not part of what "
                "fxsurgeon converts: register them again on the converted model, or remove them before converting")
    if mode == "train":
        return (f"{head}, comparing both in train mode under one seed; random layers a rewrite changes draw "
                "differently, which is the input's mode, not a fault of the rewrite: verify with mode='eval', or "
                "pass verify=False")
    targets = ", ".join(r.target for r in record.rewrites[:5])
    return f"{head}; rewrites include {targets}. This is a bug in fxsurgeon: please report it with the model."


def warn_lost_hooks(hooked: dict[str, list[str]], gm: fx.GraphModule) -> None:
    """Hooks registered on the original that no longer run in the converted model: say which, once."""
    lost = lost_hooks(hooked, gm)
    if lost:
        names = ", ".join(f"'{n or '<root>'}' ({'/'.join(k)})" for n, k in sorted(lost.items()))
        warnings.warn(
            f"hooks on {len(lost)} module(s) do not run in the converted model: {names}. torch.fx inlines the "
            "forward of non-leaf modules (and of the root), and passes replace the modules they rewrite, so "
            "their hooks are gone. Register them again on the converted model, or make those module types "
            "leaf_modules.",
            stacklevel=2,
        )


def tolerance_for(reference: Any, gm: nn.Module, tolerance: float | None) -> float:
    """The caller's tolerance, or the default for the least precise floating dtype of outputs and weights."""
    return tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(loosest_dtype(reference, gm), 1e-4)


def verify_traced(model: nn.Module, gm: fx.GraphModule, reference: Any, inputs: tuple, tolerance: float | None,
                  mode: str, hooked: dict[str, list[str]], report: TraceReport) -> float:
    """What tracing alone changed: the traced copy, before any pass, against the caller's model (relative L2
    error); a :class:`SurgeryError` saying why when it is over the tolerance."""
    err = compare_outputs(reference, run_forward(gm, inputs, "the traced model", mode))[1]
    tol = tolerance_for(reference, gm, tolerance)
    if not err <= tol:
        raise SurgeryError(traced_differs(model, err, tol, hooked, gm, report))
    return err


def verify_converted(gm: fx.GraphModule, record: Conversion, reference: Any, inputs: tuple, tolerance: float | None,
                     mode: str, hooked: dict[str, list[str]], device: torch.device | None,
                     traced_error: float | None) -> Verification:
    """The converted model against the reference: the record's verification, or a :class:`SurgeryError` for
    NaN/Inf the original does not produce and for exact rewrites beyond the tolerance."""
    output = run_forward(gm, inputs, "the converted model", mode)
    nonfinite = nonfinite_mismatch(reference, output)
    max_abs, rel = compare_outputs(reference, output)
    dtype = output_dtype(reference)
    tol = tolerance_for(reference, gm, tolerance)
    exact = bool(record.rewrites) and record.exact
    verification = Verification(
        max_abs_error=max_abs, rel_error=rel, tolerance=tol, exact_expected=exact,
        input_shapes=[list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
        device=str(device) if device is not None else "cpu", dtype=str(dtype).replace("torch.", ""),
        reference=f"the original model (a copy, with its hooks and forward contexts), {mode} mode",
        traced_rel_error=traced_error,
    )
    if nonfinite:
        raise SurgeryError(f"the converted {record.model} produces {nonfinite} on example_inputs: "
                           f"{nonfinite_cause(record)}")
    if exact and not rel <= tol:
        raise SurgeryError(exact_failed(record, rel, tol, max_abs, hooked, gm, mode))
    return verification
