"""Counting for the savings report: fvcore's MACs and parameters, and PyTorch's FlopCounterMode as a cross-check.

fvcore (``FlopCountAnalysis``) counts one fused multiply-add as one "flop": that is one MAC, and every figure
fxsurgeon reports from it is labelled MACs. ``torch.utils.flop_counter.FlopCounterMode`` counts FLOPs = 2 × MACs,
and only for matrix products, convolutions and attention; fvcore also counts normalisation, average pooling and
interpolation, and has no handler for attention. :func:`cross_check` lines the two up per kind of op and per
module and says why each difference arises.

>>> import torch, torch.nn as nn
>>> c = count_model(nn.Conv2d(32, 64, 3, padding=1, bias=False), (torch.randn(1, 32, 32, 32),))
>>> c.total_macs, c.params[""]
(18874368, 18432)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SurgeryError
from ..modes import modes as _modes
from ..modes import restore_modes as _restore_modes
from .scope import ScopedGraph, scoped

__all__ = ["MACS_NOTE", "REASONS", "Counts", "count_model", "cross_check", "inclusive_torch_flops", "op_category"]

#: the unit line every report prints (STYLE.md: units are labelled)
MACS_NOTE = ("MACs = multiply-accumulates per input sample (batch size 1), as counted by fvcore "
             "(one multiply-add = 1 MAC; fvcore calls it a flop); PyTorch's FlopCounterMode FLOPs = 2 × MACs")

_MATMUL = {"linear", "addmm", "mm", "bmm", "baddbmm", "matmul", "einsum", "_scaled_mm"}

#: why fvcore (MACs) and FlopCounterMode (FLOPs / 2) disagree, per op category
REASONS = {
    "conv": "both count the multiply-adds of convolutions (bias not included); a difference means the conv "
            "reached the two counters through different aten ops",
    "matmul": "both count the multiply-adds of Linear / matmul / bmm (bias not included); a difference means "
              "an einsum or a matmul fvcore traced differently",
    "attention": "FlopCounterMode counts scaled-dot-product attention; fvcore has no handler for it and lists "
                 "it among the ops it did not count",
    "batch_norm": "fvcore counts inference batch norm as 1 MAC per element (2 with affine weights); "
                  "FlopCounterMode does not count normalisation",
    "group_norm": "fvcore counts group norm per element; FlopCounterMode does not count normalisation",
    "layer_norm": "fvcore counts layer norm per element; FlopCounterMode does not count normalisation",
    "instance_norm": "fvcore counts instance norm per element; FlopCounterMode does not count normalisation",
    "adaptive_avg_pool2d": "fvcore counts average pooling as 1 MAC per input element; FlopCounterMode does not "
                           "count pooling",
    "upsample_nearest2d": "fvcore counts nearest upsampling per output element; FlopCounterMode does not",
    "upsample_bilinear2d": "fvcore counts bilinear upsampling as 4 per output element; FlopCounterMode does not",
    "grid_sampler": "fvcore counts grid sampling as 4 per output element; FlopCounterMode does not",
}


def op_category(op: str) -> str:
    """A common name for an op as fvcore (``"conv"``, ``"linear"``) or FlopCounterMode (``"aten.addmm"``) names it.

    >>> op_category("aten.convolution"), op_category("linear"), op_category("aten._scaled_dot_product_flash_attention")
    ('conv', 'matmul', 'attention')
    """
    name = str(op).split("::")[-1]
    name = name[len("aten."):] if name.startswith("aten.") else name
    if "attention" in name:
        return "attention"
    if "conv" in name:
        return "conv"
    if name in _MATMUL:
        return "matmul"
    return name


@dataclass
class Counts:
    """What fvcore (and FlopCounterMode, when asked) counted on one model for one set of inputs.

    Attributes:
        total_macs: fvcore's total (``FlopCountAnalysis.total()``).
        params: fvcore ``parameter_count``: module or parameter name → parameter elements; ``""`` is the total.
        module_macs: fvcore ``by_module()``: module name → MACs of everything it owns (``""`` is the model).
        module_ops: fvcore ``by_module_and_operator()``: module name → {op: MACs}.
        uncounted: ops fvcore met but has no handler for, with how often: ``{"aten::add": 8}``.
        module_names: every module name in ``named_modules()`` order (``""`` first).
        containers: names of the ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict`` modules among them.
        torch_flops: FlopCounterMode FLOPs per module *exclusive of its counted submodules*, per op category;
            None when the cross-check was not run. Use :func:`inclusive_torch_flops` for a module's total.
    """

    total_macs: int
    params: dict[str, int]
    module_macs: dict[str, int]
    module_ops: dict[str, dict[str, int]]
    uncounted: dict[str, int]
    module_names: list[str]
    containers: set[str] = field(default_factory=set)
    torch_flops: dict[str, dict[str, int]] | None = field(default=None)

    def macs_by_operator(self) -> dict[str, int]:
        return dict(self.module_ops.get("", {}))


def _fvcore():
    with warnings.catch_warnings():
        # fvcore's import scripts a helper with torch.jit.script, which recent PyTorch flags as deprecated:
        # nothing the user can act on, so keep it out of their output (only inside this import).
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.script.*")
        from fvcore.nn import FlopCountAnalysis, parameter_count
    return FlopCountAnalysis, parameter_count


def count_model(model: nn.Module, inputs: tuple, *, what: str = "the model", torch_counter: bool = True) -> Counts:
    """Count ``model``'s parameters and MACs with fvcore on ``inputs``, in eval mode and without grad.

    fvcore's own warnings (unsupported ops, uncalled modules, tracer warnings) are switched off on this one
    analysis object, never through global logging or warning state; the ops it did not count come back in
    :attr:`Counts.uncounted` instead. A GraphModule is run node by node so that the ops torch.fx inlined are
    filed under the module they were written in (:mod:`fxsurgeon.report.scope`); totals are unchanged. The
    model's train/eval modes are restored afterwards.
    """
    modes = _modes(model)
    model.eval()  # a traced forward in train mode would update BatchNorm statistics of the caller's model
    try:
        with torch.no_grad():
            runner = scoped(model)
            if runner is not None:
                try:
                    return _count(model, runner, inputs, what, torch_counter)
                except Exception:
                    pass  # the node-by-node run failed where the plain forward may not: count it as fx built it
            return _count(model, model, inputs, what, torch_counter)
    finally:
        _restore_modes(model, modes, model.training)


def _count(model: nn.Module, runner: nn.Module, inputs: tuple, what: str, torch_counter: bool) -> Counts:
    FlopCountAnalysis, parameter_count = _fvcore()
    analysis = (
        FlopCountAnalysis(runner, inputs)
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
        .tracer_warnings("none")
    )
    try:
        total = analysis.total()
    except Exception as exc:
        raise SurgeryError(
            f"fvcore could not trace {what} ({type(model).__name__}) with torch.jit: {type(exc).__name__}: "
            f"{exc}. fvcore needs a model torch.jit.trace accepts (tensor or tuple outputs, inputs on the "
            "model's device)."
        ) from exc
    named = list(model.named_modules())
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    return Counts(
        total_macs=int(total),
        params={k: int(v) for k, v in parameter_count(model).items()},
        module_macs={k: int(v) for k, v in analysis.by_module().items()},
        module_ops={k: {op: int(v) for op, v in ops.items()} for k, ops in analysis.by_module_and_operator().items()},
        uncounted={k: int(v) for k, v in sorted(analysis.unsupported_ops().items())},
        module_names=[n for n, _ in named],
        containers={n for n, m in named if isinstance(m, containers)},
        torch_flops=_torch_flops(runner, inputs, what) if torch_counter else None,
    )


def _torch_flops(runner: nn.Module, inputs: tuple, what: str) -> dict[str, dict[str, int]]:
    from torch.utils.flop_counter import FlopCounterMode

    is_scoped = isinstance(runner, ScopedGraph)
    if is_scoped:
        runner.count_torch, runner.moved = True, {}
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            runner(*inputs)
    except Exception as exc:
        raise SurgeryError(f"FlopCounterMode failed on {what}: {type(exc).__name__}: {exc}") from exc
    finally:
        if is_scoped:
            runner.count_torch = False
    exclusive = exclusive_torch_flops(counter.get_flop_counts())
    if is_scoped:
        # FlopCounterMode filed the inlined nodes under the root: hand them to the module they came from
        for scope, ops in runner.moved.items():
            for op, v in ops.items():
                cat = op_category(op)
                for name, sign in (("", -1), (scope, 1)):
                    bucket = exclusive.setdefault(name, {})
                    bucket[cat] = bucket.get(cat, 0) + sign * v
        exclusive = {n: {c: v for c, v in ops.items() if v} for n, ops in exclusive.items()}
        exclusive = {n: ops for n, ops in exclusive.items() if ops}
    return exclusive


def exclusive_torch_flops(raw: dict[str, dict]) -> dict[str, dict[str, int]]:
    """FlopCounterMode's per-module counts → FLOPs each module does outside its counted submodules.

    FlopCounterMode names modules ``"<RootClass>.layer1.0.conv1"`` and counts each op in every module on the
    call stack. A GraphModule inlines the blocks' forwards, so the call stack holds only the modules the graph
    calls: ``"layer1.0"`` may be missing although ``"layer1.0.conv1"`` is there. Subtracting what the nearest
    counted descendants hold gives a partition that :func:`inclusive_torch_flops` can sum over any subtree.

    >>> raw = {"Global": {"aten.mm": 6}, "Net": {"aten.mm": 6}, "Net.a.b": {"aten.mm": 4}}
    >>> exclusive_torch_flops(raw)
    {'': {'matmul': 2}, 'a.b': {'matmul': 4}}
    """
    cleaned: dict[str, dict[str, int]] = {}
    for key, ops in raw.items():
        if key == "Global":
            continue
        name = key.split(".", 1)[1] if "." in key else ""
        bucket = cleaned.setdefault(name, {})
        for op, v in ops.items():
            cat = op_category(str(op))
            bucket[cat] = bucket.get(cat, 0) + int(v)
    if "" not in cleaned and "Global" in raw:  # a model with no module hooks fired: everything is the root's
        cleaned[""] = {}
        for op, v in raw["Global"].items():
            cat = op_category(str(op))
            cleaned[""][cat] = cleaned[""].get(cat, 0) + int(v)
    out = {name: dict(ops) for name, ops in cleaned.items()}
    for name, ops in cleaned.items():
        if not name:
            continue
        parent = _nearest_ancestor(name, cleaned)
        if parent is None:
            continue
        for cat, v in ops.items():
            out[parent][cat] = out[parent].get(cat, 0) - v
    return {n: {c: v for c, v in ops.items() if v} for n, ops in out.items() if any(ops.values())}


def _nearest_ancestor(name: str, names: Iterable[str]) -> str | None:
    parts = name.split(".")
    pool = set(names)
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in pool:
            return prefix
    return "" if "" in pool else None


def inclusive_torch_flops(exclusive: dict[str, dict[str, int]], module: str) -> dict[str, int]:
    """FlopCounterMode FLOPs per op category of ``module`` and everything inside it (``""``: the whole model)."""
    out: dict[str, int] = {}
    for name, ops in exclusive.items():
        if not module or name == module or name.startswith(module + "."):
            for cat, v in ops.items():
                out[cat] = out.get(cat, 0) + v
    return out


def _by_category(ops: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for op, v in ops.items():
        cat = op_category(op)
        out[cat] = out.get(cat, 0) + v
    return out


def cross_check(before: Counts, after: Counts, modules: Iterable[str]) -> dict:
    """Line fvcore's MACs up with FlopCounterMode's FLOPs / 2, per op category and per module.

    Returns a JSON-ready dict: ``torch_flops_before`` / ``torch_flops_after`` (totals), ``ops`` (one row per
    op category either tool counted: fvcore MACs and torch FLOPs before/after, whether 2 × MACs == FLOPs, and
    the reason when not) and ``modules`` (the listed modules of either model where the two disagree, with the
    difference per op category, in MACs).
    """
    if before.torch_flops is None or after.torch_flops is None:
        raise ValueError("cross_check needs Counts made with torch_counter=True")
    rows = []
    cats_b = (_by_category(before.macs_by_operator()), inclusive_torch_flops(before.torch_flops, ""))
    cats_a = (_by_category(after.macs_by_operator()), inclusive_torch_flops(after.torch_flops, ""))
    for cat in sorted(set(cats_b[0]) | set(cats_b[1]) | set(cats_a[0]) | set(cats_a[1])):
        row = {
            "op": cat,
            "fvcore_macs_before": cats_b[0].get(cat, 0),
            "torch_flops_before": cats_b[1].get(cat, 0),
            "fvcore_macs_after": cats_a[0].get(cat, 0),
            "torch_flops_after": cats_a[1].get(cat, 0),
        }
        row["agree"] = (2 * row["fvcore_macs_before"] == row["torch_flops_before"]
                        and 2 * row["fvcore_macs_after"] == row["torch_flops_after"])
        row["reason"] = None if row["agree"] else REASONS.get(cat, "counted by one of the two tools only")
        rows.append(row)
    where = []
    names = [m for m in modules if m]
    for side, counts in (("before", before), ("after", after)):
        known = set(counts.module_macs)
        for m in names:
            if m not in known:
                continue
            fv = _by_category(counts.module_ops.get(m, {}))
            tf = inclusive_torch_flops(counts.torch_flops, m)
            diff = {c: fv.get(c, 0) - tf.get(c, 0) / 2 for c in set(fv) | set(tf)}
            diff = {c: _num(v) for c, v in sorted(diff.items()) if v}
            if diff:
                where.append({"model": side, "module": m, "fvcore_macs": counts.module_macs.get(m, 0),
                              "torch_flops": sum(tf.values()), "difference_macs": diff})
    return {
        "torch_flops_before": sum(inclusive_torch_flops(before.torch_flops, "").values()),
        "torch_flops_after": sum(inclusive_torch_flops(after.torch_flops, "").values()),
        "ops": rows,
        "modules": where,
    }


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)
