"""convert(): copy → trace → run passes → lint/recompile → verify → record on the converted model."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from .errors import SurgeryError
from .graph import alias_classes, describe, mutated_inputs, propagate_shapes
from .passes import Skip, get_pass, list_passes
from .passes.conv_head import NOMINAL_SHAPES_KEY
from .record import RECORD_ATTR, Conversion, Verification
from .runtime import (
    conversion_versions,
    device_of,
    kept_state,
    model_name,
    normalize_inputs,
    run_forward,
    to_device,
)
from .sources import describe_tracing, infer_source, normalize_source
from .tracing import (
    TraceReport,
    absent_args,
    check_concrete_args,
    check_mode,
    check_tracing_options,
    dropped_contexts_message,
    hooked_modules,
    lost_hooks,
    private_copy,
    trace_with_report,
)

__all__ = ["DEFAULT_TOLERANCE", "PROBE_SIZE", "compare_outputs", "convert", "derived_example", "forward_written_buffers",
           "kept_state", "model_name", "nonfinite_count", "nonfinite_mismatch", "normalize_inputs"]

#: relative L2 error allowed for rewrites that claim to be exact, by output dtype
DEFAULT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

_PRESERVED_KEY = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")

# Plain attributes timm and torchvision code reads off a model; copied so the converted model still answers.
_CARRIED_ATTRS = ("pretrained_cfg", "default_cfg", "num_classes", "num_features", "head_hidden_size",
                  "global_pool", "drop_rate", "feature_info", "grad_checkpointing")


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


def _loosest_dtype(output: Any, model: nn.Module) -> torch.dtype:
    """The lowest-precision floating dtype among the outputs and the model's parameters: a float32 model with
    float16 layers rounds like float16 there, so exact rewrites are held to float16's tolerance."""
    dtypes = {_output_dtype(output)}
    dtypes |= {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    return max(dtypes, key=lambda d: _PRECISION.get(d, 1))


def _output_dtype(output: Any) -> torch.dtype:
    leaves, _ = tree_flatten(output)
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32


def _pass_options(name: str, value: Any) -> dict[str, Any] | None:
    """Keyword value → options dict, or None when the pass is off."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        return dict(value)
    raise SurgeryError(f"{name}= takes True, False or a dict of options, got {type(value).__name__}: {value!r}")


def _synthetic_calibration(gm: nn.Module, what: Any, inputs: tuple) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """``calibration="synthetic"``: BatchNorm-matched images shaped like the example input (and a summary);
    a :class:`~fxsurgeon.synthetic.SyntheticData` already made is used as it is (``reused: True``)."""
    from .synthetic import SyntheticData, synthesize

    if isinstance(what, SyntheticData):
        data, reused = what, True
    else:
        if what != "synthetic":
            raise SurgeryError(f"calibration= takes input batches or 'synthetic', got the string {what!r}")
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() < 2:
            raise SurgeryError("calibration='synthetic' needs example_inputs: one batched input tensor (its shape "
                               "without the batch dimension is the shape of the images made)")
        data, reused = synthesize(gm, tuple(inputs[0].shape[1:])), False
    summary = {"images": int(data.images.shape[0]), "steps": data.steps, "batchnorms": data.batchnorms,
               "loss_start": data.loss_start, "loss_end": data.loss_end, "seconds": data.seconds,
               "reused": reused}
    return data.batches(), summary


def convert(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    inplace: bool = False,
    verify: bool | None = None,
    tolerance: float | None = None,
    leaf_modules: Iterable[type[nn.Module]] | None = None,
    autowrap_functions: Iterable[Callable] | None = None,
    concrete_args: dict[str, Any] | None = None,
    source: Any = None,
    calibration: Any = None,
    mode: str | None = None,
    **passes: Any,
) -> fx.GraphModule:
    """Rewrite ``model``'s architecture with fxsurgeon's passes, keeping its trained weights.

    Each pass is a keyword named after it (see :func:`fxsurgeon.list_passes`) taking ``True`` / ``False`` or
    a dict of that pass's options; a pass not named runs with its defaults when it is on by default.
    By default ``separable`` runs (m=1: the MobileNet form, approximate; fine-tune or calibrate after) and
    ``conv_head`` runs where it is registered (exact).

    Args:
        model: any ``nn.Module`` torch.fx can trace. Never modified unless ``inplace=True``.
        example_inputs: a tensor or tuple of positional inputs. Used for shapes (passes that need them) and,
            unless ``verify=False``, to compare the converted model with the original.
        inplace: skip the deep copy (PyTorch ``optimization.fuse`` semantics): the result shares modules
            with ``model``, which may be left partly modified and should not be used afterwards.
        verify: compare outputs on ``example_inputs`` (default: whenever they are given) with those of the
            caller's model itself, run as the caller runs it (a copy, with its hooks and the ``autocast`` /
            ``no_grad`` blocks of its forward). A :class:`SurgeryError` is raised when the traced model already
            differs from it by more than ``tolerance`` (torch.fx dropped behaviour), when the converted model
            produces NaN/Inf the original does not, and when rewrites that claim exactness exceed ``tolerance``.
        tolerance: relative L2 error allowed for exact rewrites: a finite number >= 0 (default by the least
            precise floating dtype among outputs and parameters: 1e-4 for float32, 2e-2 for float16).
        leaf_modules / autowrap_functions / concrete_args: tracing controls, see :func:`fxsurgeon.trace`.
        source: where ``model`` came from, recorded for :func:`fxsurgeon.save`: a timm name (``"resnet18"``),
            ``"package.module:factory"``, an importable factory function, or ``{"timm" | "factory": ...,
            "kwargs": {...}}``. timm models are recognised without it (name, ``num_classes``, ``in_chans``).
        calibration: input batches from the training distribution (an iterable of tensors or tuples of
            positional inputs; a tensor is one batch), e.g. a few thousand images. Handed to every pass that
            takes a keyword-only ``calibration`` option (unless its options set one), then used to refit the
            rewritten layers on real activations, in network order (:func:`fxsurgeon.calibrate.calibrate`),
            and the plain layers after them (``downstream=True``); the effect per layer is in
            ``record.extras["calibration"]`` and each rewrite's ``details["calibration"]``.
            ``"synthetic"``: no data at hand — images whose activations match the model's BatchNorm
            statistics are made first (:func:`fxsurgeon.synthesize` with its defaults, shaped like
            ``example_inputs``; seeded, so the conversion stays deterministic) and used instead, for the
            rewritten layers only (``downstream=False``); what they cost and how well they match is in
            ``record.extras["synthetic_calibration"]``. A :class:`~fxsurgeon.SyntheticData` from
            :func:`fxsurgeon.synthesize` is used the same way, so one set of images serves several budgets.
        mode: ``"eval"`` (default) or ``"train"``: the mode whose ``if self.training:`` branches the converted
            graph keeps (torch.fx fixes each such branch while tracing), and the mode verification runs both
            models in (train: under one fixed seed). Each submodule's own flag is put back afterwards; the record
            says which mode was baked (``record.tracing["mode"]``).
        **passes: ``separable=dict(multiplier=2)``, ``conv_head=True``, ...

    convert()'s own forward passes (verification, shape propagation, the passes' probes) leave the model's
    buffers as they found them (BatchNorm statistics, counters a forward updates).

    Returns:
        A ``torch.fx.GraphModule`` on the model's device and dtype, in its train/eval modes, with the
        :class:`~fxsurgeon.record.Conversion` record at ``converted.meta["fxsurgeon"]``.

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
    >>> small = convert(net, separable=dict(multiplier="full"), example_inputs=torch.randn(1, 16, 8, 8))
    >>> small.meta["fxsurgeon"].verification.rel_error < 1e-5
    True
    """
    if not isinstance(model, nn.Module):
        raise SurgeryError(
            f"convert() takes a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}"
        )
    _check_flag("inplace", inplace)
    if verify is not None:
        _check_flag("verify", verify)
    tolerance = _check_tolerance(tolerance)
    baked = check_mode(mode) or "eval"
    check_tracing_options(leaf_modules, autowrap_functions, concrete_args)
    check_concrete_args(model, concrete_args)
    known = list_passes()
    unknown = [k for k in passes if k not in known]
    if unknown:
        raise SurgeryError(f"unknown convert() option(s) {unknown}; passes: {known}")
    plan: list[tuple[str, dict[str, Any]]] = []
    for name in known:
        info = get_pass(name)
        opts = _pass_options(name, passes.get(name, info.default))
        if opts is not None:
            info.check_options(opts)
            plan.append((name, opts))
    _check_parameters(model)

    inputs = normalize_inputs(example_inputs)
    if inputs:  # forward parameters the inputs leave out keep their None default in the traced graph
        concrete_args = absent_args(model, len(inputs), concrete_args)
    source_spec = normalize_source(source) if source is not None else infer_source(model)
    tracing = describe_tracing(leaf_modules, autowrap_functions, concrete_args, inputs)
    tracing["mode"] = baked
    hooked = hooked_modules(model)
    verify = bool(inputs) if verify is None else verify
    if verify and not inputs:
        raise SurgeryError("verify=True needs example_inputs")
    device = device_of(model)
    on_meta = device is not None and device.type == "meta"
    if on_meta and verify:
        raise SurgeryError(
            f"{model_name(model)} is on the meta device (structure only, no weight values): it cannot be run to "
            "verify the conversion. Pass verify=False (example_inputs then only give shapes), or load real weights."
        )
    meta_inputs = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.device.type == "meta"]
    if meta_inputs and not on_meta and (verify or calibration is not None):
        raise SurgeryError(
            f"example_inputs[{meta_inputs[0]}] is on the meta device (a shape without values): it cannot be run "
            "to verify the conversion. Pass real tensors, or verify=False to use it for shapes only."
        )
    if verify:
        for i, bad in nonfinite_count(inputs):
            raise SurgeryError(
                f"example_inputs[{i}] has {bad} NaN/Inf value(s): verification compares outputs on them, which needs "
                "finite inputs. Pass finite example_inputs (or verify=False to use them for shapes only)."
            )
    # on meta, shapes still propagate: the example inputs become meta tensors of the same shapes
    inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs) if on_meta or meta_inputs \
        else to_device(inputs, device)
    seconds: dict[str, float] = {}

    reference = None
    if verify:
        # the reference is the caller's model itself (a copy), run as the caller runs it: hooks, autocast and
        # no_grad blocks in forward, train/eval branches — all that torch.fx may leave out of the graph
        t = time.perf_counter()
        ref_model = model if inplace else private_copy(model)
        reference = run_forward(ref_model, inputs, "the original model", baked)
        del ref_model
        seconds["reference"] = time.perf_counter() - t

    t0 = time.perf_counter()
    gm, report = trace_with_report(model, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                                   concrete_args=concrete_args, copy_model=not inplace, mode=baked)
    seconds["trace"] = time.perf_counter() - t0
    _check_trace_report(model, report, mode)
    for attr in _CARRIED_ATTRS:
        if hasattr(model, attr) and not hasattr(gm, attr):
            val = getattr(model, attr)
            if not isinstance(val, (nn.Module, torch.Tensor)):
                setattr(gm, attr, val)
    params_before = sum(p.numel() for p in gm.parameters())
    calib_batches = original = synthetic = None
    if calibration is not None:
        from .calibrate import as_batches
        from .synthetic import SyntheticData

        if on_meta:
            raise SurgeryError("calibration needs real weights; the model is on the meta device")
        with kept_state(gm):
            if isinstance(calibration, (str, SyntheticData)):
                calibration, synthetic = _synthetic_calibration(gm, calibration, inputs)
            calib_batches = [to_device(b, device) for b in as_batches(calibration)]
        _check_calibration(calib_batches)
        original = copy.deepcopy(gm)  # the targets of the refit: the traced model before any pass

    shape_inputs, shapes_note = inputs, None
    if not inputs and any(get_pass(n).needs_shapes for n, _ in plan):
        shape_inputs, shapes_note = derived_example(gm, calib_batches)
        if shapes_note.get("source") == "probe":
            _refuse_spatial_options(plan, shapes_note)
            gm.meta[NOMINAL_SHAPES_KEY] = True  # passes: spatial sizes are not the model's
        if shape_inputs and shapes_note.get("source") != "probe":
            # real sizes (calibration, pretrained_cfg) are replayed by load(); a probe is derived again there, so
            # the replay marks its shapes nominal and takes the same decisions
            tracing["example_inputs"] = describe_tracing(None, None, None, shape_inputs)["example_inputs"]

    traced_error = None
    if verify:
        # what tracing alone changed: the traced copy, before any pass, against the caller's model
        traced_error = compare_outputs(reference, run_forward(gm, inputs, "the traced model", baked))[1]
        tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(_loosest_dtype(reference, gm), 1e-4)
        if not traced_error <= tol:
            raise SurgeryError(_traced_differs(model, traced_error, tol, hooked, gm, report))

    record = Conversion(model=model_name(model), options={n: o for n, o in plan}, source=source_spec,
                        tracing=tracing)
    if report.reads_training:
        record.extras["mode"] = {"baked": baked, "reads_training": sorted(report.reads_training)}
    if synthetic is not None:
        record.extras["synthetic_calibration"] = synthetic
    if shapes_note is not None:
        record.extras["shapes"] = shapes_note
    record.skipped += _dropped_by_trace(model, gm)
    record.skipped += _unsupported_modules(gm)
    shapes_stale = True  # ShapeProp's node.meta["tensor_meta"] stay valid until a pass rewrites something
    for name, opts in plan:
        info = get_pass(name)
        t = time.perf_counter()
        if info.needs_shapes and shape_inputs and shapes_stale:
            with kept_state(gm):
                gm.eval()
                try:
                    if inputs:
                        propagate_shapes(gm, *shape_inputs)
                    else:  # ShapeProp prints the traceback of a failed node; a derived example may fail quietly
                        with contextlib.redirect_stderr(io.StringIO()):
                            propagate_shapes(gm, *shape_inputs)
                except Exception as exc:
                    if inputs:  # the caller's own example: its failure is theirs to see
                        raise
                    for n in gm.graph.nodes:  # a derived example the model does not take: no shapes
                        n.meta.pop("tensor_meta", None)
                    first = (str(exc).strip().splitlines() or [""])[0]
                    shapes_note["failed"] = f"{type(exc).__name__}: {first[:200]}"
                    tracing.pop("example_inputs", None)
                    shape_inputs = ()
            shapes_stale = False
        call_opts = opts
        if calib_batches is not None and "calibration" in info.options() and "calibration" not in opts:
            call_opts = {**opts, "calibration": calib_batches}
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
    if calib_batches is not None:
        from .calibrate import annotate_record, calibrate

        t = time.perf_counter()
        # layers no rewrite replaced are refit on real data only: fit to synthetic images they follow the
        # images' quirks (the ResNet-20's logit error rose 0.173 → 0.177 at 0.45× MACs)
        with kept_state(gm, only=forward_written_buffers(gm)):
            annotate_record(record, calibrate(gm, original, calib_batches, rewrites=record.rewrites,
                                              downstream=synthetic is None))
        del original
        seconds["calibrate"] = time.perf_counter() - t

    if verify:
        t = time.perf_counter()
        output = run_forward(gm, inputs, "the converted model", baked)
        nonfinite = nonfinite_mismatch(reference, output)
        max_abs, rel = compare_outputs(reference, output)
        dtype = _output_dtype(reference)
        tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(_loosest_dtype(reference, gm), 1e-4)
        exact = bool(record.rewrites) and record.exact
        record.verification = Verification(
            max_abs_error=max_abs, rel_error=rel, tolerance=tol, exact_expected=exact,
            input_shapes=[list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
            device=str(device) if device is not None else "cpu", dtype=str(dtype).replace("torch.", ""),
            reference=f"the original model (a copy, with its hooks and forward contexts), {baked} mode",
            traced_rel_error=traced_error,
        )
        seconds["verify"] = time.perf_counter() - t
        if nonfinite:
            raise SurgeryError(
                f"the converted {record.model} produces {nonfinite} on example_inputs: "
                f"{_nonfinite_cause(record)}"
            )
        if exact and not rel <= tol:
            raise SurgeryError(_exact_failed(record, rel, tol, max_abs, hooked, gm, baked))
    record.params_before = params_before
    record.params_after = sum(p.numel() for p in gm.parameters())
    record.seconds = seconds
    record.versions = conversion_versions()
    gm.meta["fxsurgeon"] = record
    setattr(gm, RECORD_ATTR, record)  # survives torch.save/torch.load, which rebuild ``meta`` empty
    # GraphModule.__deepcopy__ keeps only graph-referenced attributes, plus those listed under this meta key
    gm.meta[_PRESERVED_KEY] = {a: gm.__dict__[a] for a in (RECORD_ATTR, *_CARRIED_ATTRS) if a in gm.__dict__}
    _warn_lost_hooks(hooked, gm)
    return gm


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


def _refuse_spatial_options(plan: list[tuple[str, dict[str, Any]]], how: dict[str, Any]) -> None:
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


def _check_flag(option: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise SurgeryError(f"{option}= takes True or False, got {type(value).__name__}: {value!r}")


def _check_tolerance(tolerance: Any) -> float | None:
    if tolerance is None:
        return None
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) \
            or tolerance < 0:
        raise SurgeryError(f"tolerance= takes a finite number >= 0 (the relative L2 error allowed for exact "
                           f"rewrites), got {type(tolerance).__name__}: {tolerance!r}")
    return float(tolerance)


def _check_parameters(model: nn.Module) -> None:
    """Uninitialised (lazy) and non-finite weights: refused up front, naming the tensor, before any pass sees them."""
    from torch.nn.parameter import is_lazy

    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if is_lazy(t):
                raise SurgeryError(
                    f"{kind} '{name}' of {type(owner).__name__} is uninitialised (a lazy module): run one forward "
                    "of the model (or build it with explicit in_features / in_channels) before converting"
                )
            if t.is_floating_point() and t.device.type != "meta" and t.numel():
                bad = int((~t.detach().isfinite()).sum())
                if bad:
                    raise SurgeryError(
                        f"{kind} '{name}' of {type(owner).__name__} has {bad} NaN/Inf value(s) out of {t.numel()}: "
                        "fxsurgeon's rewrites need finite weights. Fix or re-initialise that tensor first."
                    )


def _check_calibration(batches: list[tuple]) -> None:
    for i, batch in enumerate(batches):
        for j, x in enumerate(batch):
            if not isinstance(x, torch.Tensor):
                continue
            if x.dim() == 0 or x.shape[0] == 0:
                raise SurgeryError(f"calibration batch {i} input {j} has shape {list(x.shape)}: no rows. Every "
                                   "batch needs at least one sample along its first dimension.")
            if x.is_floating_point() and not bool(x.isfinite().all()):
                raise SurgeryError(f"calibration batch {i} input {j} has {int((~x.isfinite()).sum())} NaN/Inf "
                                   "value(s): the refit solves least squares on the activations, which needs "
                                   "finite data. Drop or clean that batch.")


def _check_trace_report(model: nn.Module, report: TraceReport, mode: str | None) -> None:
    """Refuse autocast blocks fx drops (they change the numbers); warn about grad-mode blocks and baked branches."""
    autocast = [c for c in report.context_changes if c["state"].startswith("autocast")]
    if autocast:
        raise SurgeryError(dropped_contexts_message(autocast, "converted model") + " (an autocast block changes "
                           "the numbers, so fxsurgeon refuses to convert it as traced)")
    if report.written_buffers:
        warnings.warn(
            f"tracing {model_name(model)} changed buffer(s) {', '.join(repr(b) for b in report.written_buffers[:4])}"
            ": forward writes them in Python, which torch.fx runs once while tracing and leaves out of the graph, "
            "so the converted model will not update them (they were put back). Make the module that writes them "
            "a leaf (leaf_modules=[...]) to keep the update.", stacklevel=3)
    grads = [c for c in report.context_changes if not c["state"].startswith("autocast")]
    if grads:
        warnings.warn(dropped_contexts_message(grads, "converted model")
                      + " Values are the same; gradients flow where the original stopped them.", stacklevel=3)
    if mode is None and report.reads_training and any(m.training for m in model.modules()):
        names = ", ".join(f"'{n or '<root>'}' ({w})" for n, w in sorted(report.reads_training.items())[:4])
        warnings.warn(
            f"{model_name(model)} is in train mode and the forward of {names} reads self.training: the converted "
            "graph keeps the eval-mode branches (torch.fx fixes them while tracing), and .train() will not bring "
            "the others back. Pass mode='train' to keep the train-mode branches instead, or mode='eval' to "
            "silence this.", stacklevel=3)


def _lost_forward_hooks(hooked: dict[str, list[str]], gm: fx.GraphModule) -> str:
    lost = {n: k for n, k in lost_hooks(hooked, gm).items() if any(x.startswith("forward") for x in k)}
    return ", ".join(f"'{n or '<root>'}' ({'/'.join(k)})" for n, k in sorted(lost.items())[:4])


def _traced_differs(model: nn.Module, err: float, tol: float, hooked: dict[str, list[str]], gm: fx.GraphModule,
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


def _nonfinite_cause(record: Conversion) -> str:
    exact = sorted({r.pass_name for r in record.rewrites if r.exact})
    if exact:
        return (f"rewrites of {', '.join(exact)} are exact for finite activations only — an ±Inf reaching a "
                "rewritten layer becomes NaN (0·Inf), so the original overflows inside. Scale the inputs or "
                "weights so activations stay finite, or leave those layers out of the conversion.")
    return ("the approximate rewrites overflow where the original does not; convert with fewer layers "
            "(exclude=...) or a larger multiplier, or calibrate.")


def _exact_failed(record: Conversion, rel: float, tol: float, max_abs: float, hooked: dict[str, list[str]],
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


def _graph_state(graph: fx.Graph) -> list[tuple]:
    """What a pass can change in a graph: its nodes and their ops, targets, args and kwargs (kept alive, by identity)."""
    return [(n, n.op, n.target, n.args, n.kwargs) for n in graph.nodes]


def _same_graph(a: list[tuple], b: list[tuple]) -> bool:
    """No node added, removed, reordered or re-pointed: then the generated code is still current."""
    return len(a) == len(b) and all(x[0] is y[0] and x[1] == y[1] and x[2] is y[2] and x[3] is y[3] and x[4] is y[4]
                                    for x, y in zip(a, b))


def _warn_lost_hooks(hooked: dict[str, list[str]], gm: fx.GraphModule) -> None:
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


_QUANTIZED_PACKAGES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized",
                       "torch.nn.intrinsic.quantized", "torch.ao.nn.sparse.quantized")


def _unsupported_modules(gm: fx.GraphModule) -> list[Skip]:
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


def _dropped_by_trace(model: nn.Module, gm: fx.GraphModule) -> list[Skip]:
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
