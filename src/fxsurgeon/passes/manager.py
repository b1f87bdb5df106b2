"""The pass manager: which passes run with which options, and running them on a traced model.

:func:`plan_passes` turns ``convert()``'s pass keywords into validated options (each pass's options dataclass);
:func:`run_passes` runs them in order on the GraphModule — shape propagation before the passes that need it (and
again after a pass rewrote something), the calibration hand-off, lint + recompile for a pass that changed the
graph without, the buffers a pass's probes write put back — and collects each :class:`PassResult` into the
record. Shapes without ``example_inputs`` come from :func:`derived_example`.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import SurgeryError
from ..graph import alias_classes, describe, mutated_inputs, propagate_shapes
from ..record import Conversion
from ..runtime import kept_state
from .base import NOMINAL_SHAPES_KEY, Skip
from .registry import get_pass, list_passes

__all__ = ["PROBE_SIZE", "PassPlan", "derived_example", "dropped_by_trace", "forward_written_buffers",
           "plan_passes", "refuse_spatial_options", "run_passes", "unsupported_modules"]

def forward_written_buffers(gm: fx.GraphModule) -> set[int]:
    """``id``s of the buffers a forward of ``gm`` may write: those the graph writes in place (``count.add_(1)``)
    and those of called modules that are not torch's own (a custom leaf may update its state)."""
    out: set[int] = set()
    classes = alias_classes(gm)
    written = {classes[t] for n in gm.graph.nodes for t in mutated_inputs(gm, n)}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and classes[n] in written:
            try:
                t = gm.get_buffer(str(n.target))
            except AttributeError:
                continue
            out.add(id(t))
        elif n.op == "call_module":
            try:
                mod = gm.get_submodule(str(n.target))
            except AttributeError:
                continue
            if not type(mod).__module__.startswith("torch."):
                out.update(id(b) for b in mod.buffers())
    return out


def pass_options(name: str, value: Any) -> dict[str, Any] | None:
    """Keyword value → options dict, or None when the pass is off."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        return dict(value)
    raise SurgeryError(f"{name}= takes True, False or a dict of options, got {type(value).__name__}: {value!r}")


#: the spatial size of a probe input when nothing says what the model takes: ranks and channels do not depend on it
PROBE_SIZE = 224


def derived_example(gm: fx.GraphModule, calibration: list[tuple] | None) -> tuple[tuple, dict[str, Any]]:
    """An example for shape propagation when ``convert()`` has no ``example_inputs``: (inputs, how), in order

    1. the first calibration batch (its first two rows): the model's true input;
    2. a timm model's ``pretrained_cfg["input_size"]``: the true input size;
    3. a probe on the meta device (no compute): a batch of 2 with the first layer's input channels (or features)
       at a nominal ``PROBE_SIZE``×``PROBE_SIZE``. Ranks and channel counts do not depend on H×W, so the passes'
       questions about them (which head form, which concat axis) are answered; spatial sizes (MACs, latency) are
       not the model's, which the record says (``how["spatial"]``).

    ``how`` is ``{"source": "calibration" | "pretrained_cfg" | "probe" | None, "input_shapes": ..., "spatial":
    "true" | "nominal", "why": ...}``; inputs are empty when none could be made.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if calibration:
        ex = tuple(x[:2] if isinstance(x, torch.Tensor) and x.dim() else x for x in calibration[0])
        return ex, _how("calibration", ex, "true")
    if len(placeholders) != 1:
        return (), {"source": None, "why": f"no example_inputs, and the model takes {len(placeholders)} inputs"}
    ref = next((t for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    cfg = getattr(gm, "pretrained_cfg", None) or getattr(gm, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, (tuple, list)) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, *size, generator=gen, dtype=torch.float32).to(
            device=device if device.type != "meta" else "meta", dtype=dtype)
        return (x,), _how("pretrained_cfg", (x,), "true")
    for n in gm.graph.nodes:
        mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
        if isinstance(mod, nn.Conv2d):
            x = torch.empty(2, mod.in_channels, PROBE_SIZE, PROBE_SIZE, device="meta", dtype=dtype)
        elif isinstance(mod, nn.Linear):
            x = torch.empty(2, mod.in_features, device="meta", dtype=dtype)
        else:
            continue
        return (x,), _how("probe", (x,), "nominal", first_layer=str(n.target))
    return (), {"source": None, "why": "no example_inputs, and no Conv2d or Linear to build a probe input from"}


def _how(source: str, inputs: tuple, spatial: str, **extra: Any) -> dict[str, Any]:
    return {"source": source, "input_shapes": [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
            "spatial": spatial, **extra}


def refuse_spatial_options(plan: list[tuple[str, dict[str, Any]]], how: dict[str, Any]) -> None:
    """MAC budgets and latency need the true input size, which a probe does not have."""
    for name, opts in plan:
        needs = [k for k in ("target_macs", "latency_aware") if opts.get(k) not in (None, False)]
        if needs:
            raise SurgeryError(
                f"{name}: {needs[0]}= needs the model's true input size (MACs and timings depend on H×W), and "
                f"convert() has none: no example_inputs, no calibration batches, no timm pretrained_cfg "
                f"input_size (a probe at a nominal {how['input_shapes'][0]} gives channels only). "
                "Pass example_inputs= (or calibration=)."
            )


def _graph_state(graph: fx.Graph) -> list[tuple]:
    """What a pass can change in a graph: its nodes and their ops, targets, args and kwargs (kept alive, by identity)."""
    return [(n, n.op, n.target, n.args, n.kwargs) for n in graph.nodes]


def _same_graph(a: list[tuple], b: list[tuple]) -> bool:
    """No node added, removed, reordered or re-pointed: then the generated code is still current."""
    return len(a) == len(b) and all(x[0] is y[0] and x[1] == y[1] and x[2] is y[2] and x[3] is y[3] and x[4] is y[4]
                                    for x, y in zip(a, b))


_QUANTIZED_PACKAGES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized",
                       "torch.nn.intrinsic.quantized", "torch.ao.nn.sparse.quantized")


def unsupported_modules(gm: fx.GraphModule) -> list[Skip]:
    """Quantized convs and linears: no pass can rewrite packed integer weights, so they are reported, not matched."""
    out = []
    for name, mod in gm.named_modules():
        kind = type(mod).__module__
        if kind.startswith(_QUANTIZED_PACKAGES) and ("Conv" in type(mod).__name__ or "Linear" in type(mod).__name__):
            out.append(Skip(
                name, f"quantized module {kind}.{type(mod).__qualname__}: fxsurgeon rewrites float modules only; "
                "convert the float model, then quantize", pass_name="convert", details={"module": type(mod).__name__},
            ))
    return out


def dropped_by_trace(model: nn.Module, gm: fx.GraphModule) -> list[Skip]:
    """Spatial convs of the original that the traced forward never uses: fx leaves them out of the result."""
    kept = {name for name, _ in gm.named_modules()}
    out = []
    spatial: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, nn.modules.conv._ConvNd) and any(k > 1 for k in mod.kernel_size):
            spatial.setdefault(id(mod), []).append(name)
    for names in spatial.values():
        mod = model.get_submodule(names[0]) if names[0] else model
        if not any(n in kept for n in names):
            out.append(Skip(names[0], "not used by the traced forward: torch.fx leaves it out of the "
                                      "converted model", pass_name="trace", details={"module": describe(mod)}))
    return out


@dataclass
class PassPlan:
    """The passes to run, in order, with their options as given (the record keeps these) and validated."""

    steps: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def options(self) -> dict[str, dict[str, Any]]:
        return {name: dict(opts) for name, opts in self.steps}

    def needs_shapes(self) -> bool:
        return any(get_pass(n).needs_shapes for n, _ in self.steps)


def plan_passes(passes: dict[str, Any]) -> PassPlan:
    """``convert()``'s pass keywords → the plan: unknown names refused, each pass's options validated by its
    options dataclass before anything is traced; passes not named run when they are on by default."""
    known = list_passes()
    unknown = [k for k in passes if k not in known]
    if unknown:
        raise SurgeryError(f"unknown convert() option(s) {unknown}; passes: {known}")
    plan = PassPlan()
    for name in known:
        info = get_pass(name)
        opts = pass_options(name, passes.get(name, info.default))
        if opts is not None:
            info.check_options(opts)
            plan.steps.append((name, opts))
    return plan


def run_passes(gm: fx.GraphModule, plan: PassPlan, record: Conversion, *, shape_inputs: tuple,
               callers_inputs: bool, shapes_note: dict[str, Any] | None, calibration: list[tuple] | None,
               seconds: dict[str, float]) -> None:
    """Run the plan on ``gm`` in place, adding rewrites, skips and figures to ``record`` and each pass's time
    to ``seconds``.

    Args:
        shape_inputs: inputs for ``ShapeProp`` (empty: none).
        callers_inputs: they are the caller's ``example_inputs`` (a failure to propagate them is raised);
            otherwise they were derived, and a failure leaves the graph without shapes, noted in ``shapes_note``.
        calibration: batches handed to every pass with a ``calibration`` option its options do not set.
    """
    shapes_stale = True  # ShapeProp's node.meta["tensor_meta"] stay valid until a pass rewrites something
    for name, opts in plan.steps:
        info = get_pass(name)
        t = time.perf_counter()
        if info.needs_shapes and shape_inputs and shapes_stale:
            shape_inputs = _propagate(gm, shape_inputs, callers_inputs, shapes_note, record)
            shapes_stale = False
        call_opts = opts
        if calibration is not None and "calibration" in info.options() and "calibration" not in opts:
            call_opts = {**opts, "calibration": calibration}
        before, code = _graph_state(gm.graph), gm.code
        with kept_state(gm, only=forward_written_buffers(gm)):  # the pass's own probes leave no trace either
            result = info.fn(gm, **call_opts)
        shapes_stale = shapes_stale or bool(result.rewrites)
        result.stamp(name)
        # passes end with lint + recompile (STYLE.md); do both for one that changed the graph and did not
        if gm.code is code and not _same_graph(before, _graph_state(gm.graph)):
            gm.graph.lint()
            gm.recompile()
        record.rewrites += result.rewrites
        record.skipped += result.skipped
        record.extras.update(result.figures)  # pass-level figures (e.g. budgets)
        seconds[name] = time.perf_counter() - t
    gm.meta.pop(NOMINAL_SHAPES_KEY, None)
    if shapes_note is not None and shapes_note.get("source") == "probe" and shape_inputs:
        for r in record.rewrites:
            if any(k.endswith("macs") for k in r.details):
                r.details["macs_at"] = (f"the nominal probe input {shapes_note['input_shapes'][0]}, not the model's "
                                        "input size: pass example_inputs= for true counts")


def _propagate(gm: fx.GraphModule, shape_inputs: tuple, callers_inputs: bool, shapes_note: dict[str, Any] | None,
               record: Conversion) -> tuple:
    """ShapeProp on ``gm`` in eval mode; returns the inputs to use next time (none after a derived one failed)."""
    with kept_state(gm):
        gm.eval()
        try:
            if callers_inputs:
                propagate_shapes(gm, *shape_inputs)
            else:  # ShapeProp prints the traceback of a failed node; a derived example may fail quietly
                with contextlib.redirect_stderr(io.StringIO()):
                    propagate_shapes(gm, *shape_inputs)
        except Exception as exc:
            if callers_inputs:  # the caller's own example: its failure is theirs to see
                raise
            for n in gm.graph.nodes:  # a derived example the model does not take: no shapes
                n.meta.pop("tensor_meta", None)
            first = (str(exc).strip().splitlines() or [""])[0]
            if shapes_note is not None:
                shapes_note["failed"] = f"{type(exc).__name__}: {first[:200]}"
            record.tracing.pop("example_inputs", None)
            return ()
    return shape_inputs
