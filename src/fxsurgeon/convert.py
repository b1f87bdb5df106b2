"""convert(): copy → trace → run passes → lint/recompile → verify → record on the converted model."""

from __future__ import annotations

import copy
import math
import time
import warnings
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
    plan = plan_passes(passes)
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


