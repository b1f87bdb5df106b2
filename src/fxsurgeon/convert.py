"""convert(): copy → trace → run passes → lint/recompile → verify → record on the converted model."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import SurgeryError
from .passes.base import NOMINAL_SHAPES_KEY
from .passes.manager import (
    PROBE_SIZE,
    derived_example,
    dropped_by_trace,
    forward_written_buffers,
    plan_passes,
    refuse_spatial_options,
    run_passes,
    unsupported_modules,
)
from .record import RECORD_ATTR, Conversion
from .runtime import (
    check_parameters,
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
    absent_args,
    check_concrete_args,
    check_mode,
    check_trace_report,
    check_tracing_options,
    hooked_modules,
    private_copy,
    trace_with_report,
)
from .verify import (
    DEFAULT_TOLERANCE,
    compare_outputs,
    nonfinite_count,
    nonfinite_mismatch,
    verify_converted,
    verify_traced,
    warn_lost_hooks,
)

# compare_outputs, nonfinite_*, DEFAULT_TOLERANCE (fxsurgeon.verify) and derived_example, PROBE_SIZE,
# forward_written_buffers (fxsurgeon.passes.manager) are re-exported: they were importable from here before
__all__ = ["DEFAULT_TOLERANCE", "PROBE_SIZE", "compare_outputs", "convert", "derived_example", "forward_written_buffers",
           "kept_state", "model_name", "nonfinite_count", "nonfinite_mismatch", "normalize_inputs"]


_PRESERVED_KEY = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")

# Plain attributes timm and torchvision code reads off a model; copied so the converted model still answers.
_CARRIED_ATTRS = ("pretrained_cfg", "default_cfg", "num_classes", "num_features", "head_hidden_size",
                  "global_pool", "drop_rate", "feature_info", "grad_checkpointing")


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
    plan = plan_passes(passes)
    check_parameters(model)

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
    check_trace_report(model, report, mode)
    for attr in _CARRIED_ATTRS:
        if hasattr(model, attr) and not hasattr(gm, attr):
            val = getattr(model, attr)
            if not isinstance(val, (nn.Module, torch.Tensor)):
                setattr(gm, attr, val)
    params_before = sum(p.numel() for p in gm.parameters())
    calib_batches = original = synthetic = None
    if calibration is not None:
        from .calibrate.data import as_batches, check_batches, synthetic_calibration
        from .synthetic import SyntheticData

        if on_meta:
            raise SurgeryError("calibration needs real weights; the model is on the meta device")
        with kept_state(gm):
            if isinstance(calibration, (str, SyntheticData)):
                calibration, synthetic = synthetic_calibration(gm, calibration, inputs)
            calib_batches = [to_device(b, device) for b in as_batches(calibration)]
        check_batches(calib_batches)
        original = copy.deepcopy(gm)  # the targets of the refit: the traced model before any pass

    shape_inputs, shapes_note = inputs, None
    if not inputs and plan.needs_shapes():
        shape_inputs, shapes_note = derived_example(gm, calib_batches)
        if shapes_note.get("source") == "probe":
            refuse_spatial_options(plan.steps, shapes_note)
            gm.meta[NOMINAL_SHAPES_KEY] = True  # passes: spatial sizes are not the model's
        if shape_inputs and shapes_note.get("source") != "probe":
            # real sizes (calibration, pretrained_cfg) are replayed by load(); a probe is derived again there, so
            # the replay marks its shapes nominal and takes the same decisions
            tracing["example_inputs"] = describe_tracing(None, None, None, shape_inputs)["example_inputs"]

    traced_error = None
    if verify:
        traced_error = verify_traced(model, gm, reference, inputs, tolerance, baked, hooked, report)

    record = Conversion(model=model_name(model), options=plan.options(), source=source_spec,
                        tracing=tracing)
    if report.reads_training:
        record.extras["mode"] = {"baked": baked, "reads_training": sorted(report.reads_training)}
    if synthetic is not None:
        record.extras["synthetic_calibration"] = synthetic
    if shapes_note is not None:
        record.extras["shapes"] = shapes_note
    record.skipped += dropped_by_trace(model, gm)
    record.skipped += unsupported_modules(gm)
    run_passes(gm, plan, record, shape_inputs=shape_inputs, callers_inputs=bool(inputs), shapes_note=shapes_note,
               calibration=calib_batches, seconds=seconds)
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
        record.verification = verify_converted(gm, record, reference, inputs, tolerance, baked, hooked, device,
                                               traced_error)
        seconds["verify"] = time.perf_counter() - t
    record.params_before = params_before
    record.params_after = sum(p.numel() for p in gm.parameters())
    record.seconds = seconds
    record.versions = conversion_versions()
    gm.meta["fxsurgeon"] = record
    setattr(gm, RECORD_ATTR, record)  # survives torch.save/torch.load, which rebuild ``meta`` empty
    # GraphModule.__deepcopy__ keeps only graph-referenced attributes, plus those listed under this meta key
    gm.meta[_PRESERVED_KEY] = {a: gm.__dict__[a] for a in (RECORD_ATTR, *_CARRIED_ATTRS) if a in gm.__dict__}
    warn_lost_hooks(hooked, gm)
    return gm


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


