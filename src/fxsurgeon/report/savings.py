"""savings(): what a conversion saved and what it cost, counted by fvcore and checked against PyTorch.

Parameters and MACs come from fvcore (``parameter_count``, ``FlopCountAnalysis``), which counts one
multiply-add as one "flop": that is one MAC, and every output of this module says MACs. PyTorch's
``FlopCounterMode`` (FLOPs = 2 × MACs, fewer ops) cross-checks them; fidelity is measured on the inputs given.
Renderers live in :mod:`fxsurgeon.report.render` (terminal, Markdown, CSV) and :mod:`fxsurgeon.report.plot`.

>>> import torch, torch.nn as nn, fxsurgeon
>>> net = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, bias=False))
>>> x = torch.randn(1, 32, 32, 32)
>>> r = fxsurgeon.savings(net, fxsurgeon.convert(net, example_inputs=x), x)
>>> r.macs_before, r.macs_after, round(r.mac_savings, 3)
(18874368, 2392064, 0.873)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..convert import compare_outputs
from ..errors import SurgeryError
from ..modes import modes as _modes
from ..modes import restore_modes as _restore_modes
from ..record import find_record
from ..runtime import device_of, model_name, normalize_inputs, report_versions, run_forward, to_device
from .attrib import attribute_rewrites
from .count import MACS_NOTE, Counts, count_model, cross_check

__all__ = ["SCHEMA_VERSION", "SavingsReport", "fidelity", "finite_or_none", "load_schema", "module_rows", "savings"]

#: version of the JSON the report writes (src/fxsurgeon/schemas/report.schema.json); bump on any change
SCHEMA_VERSION = 2

#: what the fidelity figures were measured with: ``random`` weights make them meaningless (zero-initialised
#: residual branches give 0 error for free), ``unknown`` is the Python API's default
WEIGHTS = ("random", "pretrained", "checkpoint", "unknown")


@dataclass
class SavingsReport:
    """Parameters, MACs and fidelity of a converted model against its original, with the conversion record.

    Figures are plain ints (MACs, parameter elements) and floats; ``mac_savings`` / ``param_savings`` are
    fractions of the original (0.3 = 30% fewer). :meth:`to_dict` gives the JSON described by
    ``fxsurgeon/schemas/report.schema.json``; :meth:`by_module` re-cuts the per-module breakdown at any depth.
    """

    model: str
    input_shapes: list[list[int]]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    max_abs_error: float | None
    rel_error: float | None
    cosine_similarity: float | None
    top1_agreement: float | None
    fidelity_source: str
    weights: str
    batch_size: int
    rewrites: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    passes: dict[str, dict[str, int]]
    unattributed: dict[str, int]
    module_depth: int
    macs_by_operator: dict[str, dict[str, int]]
    uncounted_ops: dict[str, dict[str, int]]
    cross_check: dict[str, Any] | None
    versions: dict[str, str]
    counts_before: Counts = field(repr=False, compare=False)
    counts_after: Counts = field(repr=False, compare=False)

    @property
    def random_weights(self) -> bool:
        """True when the fidelity figures come from random weights: they say nothing about a trained model."""
        return self.weights == "random"

    @property
    def mac_savings(self) -> float | None:
        return _saving(self.macs_before, self.macs_after)

    @property
    def param_savings(self) -> float | None:
        return _saving(self.params_before, self.params_after)

    def by_module(self, depth: int | None = None) -> list[dict[str, Any]]:
        """Rows ``{name, depth, params_before, params_after, macs_before, macs_after}`` for every module down to
        ``depth`` (default: the report's), in module order; ``""`` is the whole model. Modules with nothing
        counted on either side are left out; a module present in one model only has zeros on the other side."""
        return module_rows(self.counts_before, self.counts_after, self.module_depth if depth is None else depth)

    def stages(self) -> list[dict[str, Any]]:
        """Per-stage rows for plots: the top-level modules, with a top-level container (``nn.Sequential`` /
        ``nn.ModuleList``) that holds most of the original's MACs — timm's ``stages`` / ``blocks`` /
        ``features`` — split into its children."""
        out = []
        for r in self.by_module(1):
            if not r["name"]:
                continue
            if r["macs_before"] > self.macs_before / 2 and r["name"] in self.counts_before.containers:
                out += [c for c in self.by_module(2) if c["name"].startswith(r["name"] + ".")]
            else:
                out.append(r)
        return out

    def check(self, *, min_mac_savings: float | None = None, min_param_savings: float | None = None,
              max_rel_error: float | None = None) -> list[str]:
        """One line per threshold the report misses (empty: all met). Savings are fractions (0.3 = 30%)."""
        fails = []
        for label, got, want in (("MAC savings", self.mac_savings, min_mac_savings),
                                 ("parameter savings", self.param_savings, min_param_savings)):
            if want is None:
                continue
            if got is None:
                fails.append(f"{label} undefined (the original has 0), required ≥ {want:.1%}")
            elif got < want:
                fails.append(f"{label} {got:.1%} < required {want:.1%}")
        if max_rel_error is not None:
            if self.rel_error is None:
                fails.append(f"relative L2 error unknown (not measured), required ≤ {max_rel_error:g}")
            elif not self.rel_error <= max_rel_error:
                fails.append(f"relative L2 error {self.rel_error:.3g} > allowed {max_rel_error:g}")
        return fails

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data following ``report.schema.json`` (non-finite floats become null)."""
        out = {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "weights": self.weights,
            "batch_size": self.batch_size,
            "units": {"macs": MACS_NOTE, "params": "parameter elements (shared parameters once)"},
            "input_shapes": self.input_shapes,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "param_savings": self.param_savings,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "mac_savings": self.mac_savings,
            "max_abs_error": self.max_abs_error,
            "rel_error": self.rel_error,
            "cosine_similarity": self.cosine_similarity,
            "top1_agreement": self.top1_agreement,
            "fidelity_source": self.fidelity_source,
            "rewrites": self.rewrites,
            "skipped": self.skipped,
            "passes": self.passes,
            "unattributed": self.unattributed,
            "module_depth": self.module_depth,
            "modules": self.by_module(),
            "stages": self.stages(),
            "macs_by_operator": self.macs_by_operator,
            "uncounted_ops": self.uncounted_ops,
            "cross_check": self.cross_check,
            "versions": self.versions,
        }
        return finite_or_none(out)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_markdown(self, max_rows: int = 200) -> str:
        from .render import to_markdown

        return to_markdown(self, max_rows=max_rows)

    def to_table(self) -> str:
        from .render import to_table

        return to_table(self)

    def to_csv(self, header: bool = False) -> str:
        from .render import to_csv

        return to_csv(self, header=header)

    def plot(self, path: str) -> None:
        """Write the per-stage MACs / parameters chart to ``path`` (``.png``, ``.svg`` or ``.pdf``)."""
        from .plot import plot_stages

        plot_stages(self, path)

    def __str__(self) -> str:
        return self.to_table()


def _saving(before: int, after: int) -> float | None:
    return 1.0 - after / before if before else None


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±Inf) replaced by None, through dicts, lists and tuples: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def module_rows(before: Counts, after: Counts, depth: int) -> list[dict[str, Any]]:
    """Per-module parameters and MACs of both models down to ``depth`` (see :meth:`SavingsReport.by_module`)."""
    rows = []
    for name in _merged_names(before.module_names, after.module_names):
        d = 0 if not name else name.count(".") + 1
        if d > depth:
            continue
        row = {
            "name": name, "depth": d,
            "params_before": before.params.get(name, 0) if name in before.module_macs else 0,
            "params_after": after.params.get(name, 0) if name in after.module_macs else 0,
            "macs_before": before.module_macs.get(name, 0),
            "macs_after": after.module_macs.get(name, 0),
        }
        if name == "" or any(row[k] for k in ("params_before", "params_after", "macs_before", "macs_after")):
            rows.append(row)
    return rows


def _merged_names(first: list[str], second: list[str]) -> list[str]:
    """Names of both models in module order: the original's, with the converted model's new ones placed after
    the name that precedes them in the converted model."""
    out = list(first)
    seen = set(out)
    prev = ""
    for n in second:
        if n not in seen:
            i = out.index(prev) + 1 if prev in seen else len(out)
            out.insert(i, n)
            seen.add(n)
        prev = n
    return out


def load_schema() -> dict[str, Any]:
    """The JSON Schema of :meth:`SavingsReport.to_dict` (``fxsurgeon/schemas/report.schema.json``)."""
    text = resources.files("fxsurgeon").joinpath("schemas/report.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def fidelity(reference: Any, output: Any) -> dict[str, float | None]:
    """Max abs error, relative L2 error, cosine similarity and (classifier logits) top-1 agreement.

    All output tensors are flattened together in float64. Top-1 agreement is given when the output is one
    ``(N, classes)`` tensor with more than one class, else None.

    >>> import torch
    >>> y = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    >>> f = fidelity(y, y + torch.tensor([[0.0, 0.0], [0.0, 3.0]]))
    >>> f["max_abs_error"], f["top1_agreement"]
    (3.0, 0.5)
    """
    max_abs, rel = compare_outputs(reference, output)
    ref = [t.detach().double().flatten() for t in tree_flatten(reference)[0]
           if isinstance(t, torch.Tensor) and t.is_floating_point()]
    out = [t.detach().double().flatten().to(r.device) for t, r in zip(
        [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()], ref)]
    cos = None
    if ref:
        a, b = torch.cat(ref), torch.cat(out)
        na, nb = float(a.norm()), float(b.norm())
        cos = 1.0 if na == nb == 0 else (0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb))
    top1 = None
    if isinstance(reference, torch.Tensor) and reference.ndim == 2 and reference.shape[1] > 1:
        agree = reference.argmax(1) == output.to(reference.device).argmax(1)
        top1 = float(agree.double().mean())
    return {"max_abs_error": max_abs, "rel_error": rel, "cosine_similarity": cos, "top1_agreement": top1}


def _one_sample(inputs: tuple) -> tuple[int, tuple]:
    """(batch size, the inputs cut to their first sample): MACs are counted per sample.

    The batch size is the leading dimension shared by every tensor input; when the tensors disagree (or
    there are none) the inputs are not batched as far as we can tell, and they are counted whole as 1 sample.
    """
    sizes = {x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.ndim > 0}
    if len(sizes) != 1:
        return 1, inputs
    n = sizes.pop()
    if n <= 1:
        return max(n, 1), inputs
    return n, tuple(x[:1] if isinstance(x, torch.Tensor) and x.ndim > 0 else x for x in inputs)


def _run_restoring(model: nn.Module, inputs: tuple, what: str) -> Any:
    modes = _modes(model)
    try:
        return run_forward(model, inputs, what)
    finally:
        _restore_modes(model, modes, model.training)


def savings(
    original: nn.Module,
    converted: nn.Module,
    example_inputs: Any,
    *,
    depth: int = 1,
    measure_fidelity: bool = True,
    torch_cross_check: bool = True,
    weights: str = "unknown",
) -> SavingsReport:
    """Count what ``converted`` saves against ``original`` on ``example_inputs``, and how close its outputs are.

    Args:
        original: the model before conversion (never modified; train/eval modes restored).
        converted: the model after, usually from :func:`fxsurgeon.convert`; its record
            (``converted.meta["fxsurgeon"]``) supplies the rewrites and skips. Any ``nn.Module`` works.
        example_inputs: a tensor or tuple of positional inputs, moved to each model's device.
        depth: how deep the per-module breakdown goes (1: top-level modules); :meth:`SavingsReport.by_module`
            re-cuts it later.
        measure_fidelity: run both models and compare outputs; when False the conversion record's
            verification (max abs and relative L2 error only) is reported, if there is one.
        torch_cross_check: also count with ``torch.utils.flop_counter.FlopCounterMode``.
        weights: what the models' weights are, stamped on every output: ``"random"`` (fresh initialisation:
            the fidelity figures then say nothing about a trained model, and every renderer says so),
            ``"pretrained"``, ``"checkpoint"`` or ``"unknown"`` (default).

    Returns:
        A :class:`SavingsReport`. MACs are fvcore's count for one sample (the first of the batch): one
        multiply-add = 1 MAC, whatever the batch size of ``example_inputs``; fidelity uses the whole batch.

    Raises:
        SurgeryError: not modules, no inputs, a depth below 0, or a model fvcore or the inputs cannot run.

    >>> import torch, torch.nn as nn
    >>> lin = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
    >>> r = savings(lin, lin, torch.randn(4, 128, 7, 7))
    >>> r.macs_before, r.macs_by_operator["before"], r.batch_size
    (7552, {'adaptive_avg_pool2d': 6272, 'linear': 1280}, 4)
    """
    for what, m in (("original", original), ("converted", converted)):
        if not isinstance(m, nn.Module):
            raise SurgeryError(f"savings() takes nn.Modules; {what} is {type(m).__module__}.{type(m).__qualname__}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise SurgeryError(f"depth must be an int ≥ 0, got {depth!r}")
    if weights not in WEIGHTS:
        raise SurgeryError(f"weights={weights!r} is not one of {', '.join(map(repr, WEIGHTS))}")
    inputs = normalize_inputs(example_inputs)
    if not inputs:
        raise SurgeryError("savings() needs example_inputs: fvcore counts MACs by running the model on them")
    for what, m in (("original", original), ("converted", converted)):
        dev = device_of(m)
        if dev is not None and dev.type == "meta":
            raise SurgeryError(f"the {what} model is on the meta device: counting MACs needs real tensors")
    in_orig = to_device(inputs, device_of(original))
    in_conv = to_device(inputs, device_of(converted))
    batch, one = _one_sample(inputs)
    before = count_model(original, to_device(one, device_of(original)), what="the original model",
                         torch_counter=torch_cross_check)
    after = count_model(converted, to_device(one, device_of(converted)), what="the converted model",
                        torch_counter=torch_cross_check)
    record = find_record(converted)

    if measure_fidelity:
        ref = _run_restoring(original, in_orig, "the original model")
        out = _run_restoring(converted, in_conv, "the converted model")
        fid = fidelity(ref, out)
        source = "measured"
    elif record is not None and record.verification is not None:
        v = record.verification
        fid = {"max_abs_error": v.max_abs_error, "rel_error": v.rel_error, "cosine_similarity": None,
               "top1_agreement": None}
        source = "conversion record"
    else:
        fid = dict.fromkeys(("max_abs_error", "rel_error", "cosine_similarity", "top1_agreement"))
        source = "none"

    rows, passes, unattributed = attribute_rewrites(record.rewrites if record else [],
                                                    record.counts() if record else {}, before, after)
    skipped = [{"target": s.target, "pass": s.pass_name, "reason": s.reason}
               for s in (record.skipped if record is not None else [])]
    names = [r["name"] for r in module_rows(before, after, depth)]
    check = cross_check(before, after, names) if torch_cross_check else None
    return SavingsReport(
        model=record.model if record is not None else model_name(original),
        input_shapes=[list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
        params_before=before.params.get("", 0), params_after=after.params.get("", 0),
        macs_before=before.total_macs, macs_after=after.total_macs,
        max_abs_error=fid["max_abs_error"], rel_error=fid["rel_error"],
        cosine_similarity=fid["cosine_similarity"], top1_agreement=fid["top1_agreement"], fidelity_source=source,
        weights=weights, batch_size=batch,
        rewrites=rows, skipped=skipped, passes=passes, unattributed=unattributed, module_depth=depth,
        macs_by_operator={"before": before.macs_by_operator(), "after": after.macs_by_operator()},
        uncounted_ops={"before": before.uncounted, "after": after.uncounted},
        cross_check=check, versions=report_versions(),
        counts_before=before, counts_after=after,
    )
