"""convert(): copy → trace → run passes → lint/recompile → verify → record on the converted model."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from . import __version__
from .bench import ieee_fp32
from .errors import SurgeryError
from .graph import describe, propagate_shapes
from .io import describe_tracing, infer_source, normalize_source
from .modes import modes as _modes
from .modes import restore_modes as _restore_modes
from .passes import Skip, get_pass, list_passes
from .record import RECORD_ATTR, Conversion, Verification
from .tracing import absent_args, hooked_modules, lost_hooks, trace

__all__ = ["DEFAULT_TOLERANCE", "compare_outputs", "convert", "model_name", "normalize_inputs"]

#: relative L2 error allowed for rewrites that claim to be exact, by output dtype
DEFAULT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

_PRESERVED_KEY = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")

# Plain attributes timm and torchvision code reads off a model; copied so the converted model still answers.
_CARRIED_ATTRS = ("pretrained_cfg", "default_cfg", "num_classes", "num_features", "head_hidden_size",
                  "global_pool", "drop_rate", "feature_info", "grad_checkpointing")


def model_name(model: nn.Module) -> str:
    """timm architecture name when there is one, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(model).__name__


def normalize_inputs(example_inputs: Any) -> tuple:
    """A tensor or a sequence of tensors → a tuple; anything else is a SurgeryError saying what it got."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise SurgeryError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )


def _device_of(model: nn.Module) -> torch.device | None:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


def _to_device(inputs: tuple, device: torch.device | None) -> tuple:
    if device is None or device.type == "meta":
        return inputs
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


def _run(model: nn.Module, inputs: tuple, what: str) -> Any:
    """Forward in eval mode without grad; the caller restores modes. A failure names what was running."""
    model.eval()
    try:
        # TF32 (cuDNN's float32 default on Ampere+) moves outputs ~1e-3: compare in full float32
        with torch.no_grad(), ieee_fp32():
            return model(*inputs)
    except Exception as exc:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        dtypes = [str(x.dtype) if isinstance(x, torch.Tensor) else "-" for x in inputs]
        raise SurgeryError(
            f"{what} failed on example_inputs of shapes {shapes}, dtypes {dtypes}: {type(exc).__name__}: {exc}. "
            "Check that the inputs have the shape and dtype the model expects."
        ) from exc


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
        if d.numel():
            max_abs = max(max_abs, float(d.abs().max()))
        diff2 += float(d.pow(2).sum())
        ref2 += float(r.double().pow(2).sum())
    rel = (diff2 / ref2) ** 0.5 if ref2 > 0 else (0.0 if diff2 == 0 else float("inf"))
    return max_abs, rel


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
        verify: compare outputs on ``example_inputs`` (default: whenever they are given). Rewrites that
            claim exactness must stay within ``tolerance`` or :class:`SurgeryError` is raised.
        tolerance: relative L2 error allowed for exact rewrites (default by dtype: 1e-4 for float32).
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
        **passes: ``separable=dict(multiplier=2)``, ``conv_head=True``, ...

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

    inputs = normalize_inputs(example_inputs)
    if inputs:  # forward parameters the inputs leave out keep their None default in the traced graph
        concrete_args = absent_args(model, len(inputs), concrete_args)
    source_spec = normalize_source(source) if source is not None else infer_source(model)
    tracing = describe_tracing(leaf_modules, autowrap_functions, concrete_args, inputs)
    hooked = hooked_modules(model)
    verify = bool(inputs) if verify is None else verify
    if verify and not inputs:
        raise SurgeryError("verify=True needs example_inputs")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    gm = trace(model, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
               concrete_args=concrete_args, copy_model=not inplace, warn_hooks=False)
    seconds["trace"] = time.perf_counter() - t0
    for attr in _CARRIED_ATTRS:
        if hasattr(model, attr) and not hasattr(gm, attr):
            val = getattr(model, attr)
            if not isinstance(val, (nn.Module, torch.Tensor)):
                setattr(gm, attr, val)
    modes = _modes(gm)
    device = _device_of(gm)
    on_meta = device is not None and device.type == "meta"
    if on_meta and verify:
        raise SurgeryError(
            f"{model_name(model)} is on the meta device (structure only, no weight values): it cannot be run to "
            "verify the conversion. Pass verify=False (example_inputs then only give shapes), or load real weights."
        )
    # on meta, shapes still propagate: the example inputs become meta tensors of the same shapes
    inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs) if on_meta else \
        _to_device(inputs, device)
    params_before = sum(p.numel() for p in gm.parameters())
    calib_batches = original = synthetic = None
    if calibration is not None:
        from .calibrate import as_batches
        from .synthetic import SyntheticData

        if on_meta:
            raise SurgeryError("calibration needs real weights; the model is on the meta device")
        if isinstance(calibration, (str, SyntheticData)):
            calibration, synthetic = _synthetic_calibration(gm, calibration, inputs)
        calib_batches = [_to_device(b, device) for b in as_batches(calibration)]
        original = copy.deepcopy(gm)  # the targets of the refit: the traced model before any pass

    reference = None
    if verify:
        t = time.perf_counter()
        reference = _run(gm, inputs, "the original model")
        _restore_modes(gm, modes, model.training)
        seconds["reference"] = time.perf_counter() - t

    record = Conversion(model=model_name(model), options={n: o for n, o in plan}, source=source_spec,
                        tracing=tracing)
    if synthetic is not None:
        record.extras["synthetic_calibration"] = synthetic
    record.skipped += _dropped_by_trace(model, gm)
    record.skipped += _unsupported_modules(gm)
    shapes_stale = True  # ShapeProp's node.meta["tensor_meta"] stay valid until a pass rewrites something
    for name, opts in plan:
        info = get_pass(name)
        t = time.perf_counter()
        if info.needs_shapes and inputs and shapes_stale:
            modes_now = _modes(gm)
            gm.eval()
            propagate_shapes(gm, *inputs)
            _restore_modes(gm, modes_now, model.training)
            shapes_stale = False
        call_opts = opts
        if calib_batches is not None and "calibration" in info.options() and "calibration" not in opts:
            call_opts = {**opts, "calibration": calib_batches}
        before, code = _graph_state(gm.graph), gm.code
        result = info.fn(gm, **call_opts)
        shapes_stale = shapes_stale or bool(result.rewrites)
        result.stamp(name)
        # passes end with lint + recompile (STYLE.md); do both for one that changed the graph and did not
        if gm.code is code and not _same_graph(before, _graph_state(gm.graph)):
            gm.graph.lint()
            gm.recompile()
        record.rewrites += result.rewrites
        record.skipped += result.skipped
        record.extras.update(gm.meta.pop("fxsurgeon_extras", None) or {})  # pass-level figures (e.g. budgets)
        seconds[name] = time.perf_counter() - t

    if calib_batches is not None:
        from .calibrate import annotate_record, calibrate

        t = time.perf_counter()
        # layers no rewrite replaced are refit on real data only: fit to synthetic images they follow the
        # images' quirks (the ResNet-20's logit error rose 0.173 → 0.177 at 0.45× MACs)
        annotate_record(record, calibrate(gm, original, calib_batches, rewrites=record.rewrites,
                                          downstream=synthetic is None))
        del original
        seconds["calibrate"] = time.perf_counter() - t

    if verify:
        t = time.perf_counter()
        modes_now = _modes(gm)
        output = _run(gm, inputs, "the converted model")
        _restore_modes(gm, modes_now, model.training)
        max_abs, rel = compare_outputs(reference, output)
        dtype = _output_dtype(reference)
        tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dtype, 1e-4)
        exact = bool(record.rewrites) and record.exact
        record.verification = Verification(
            max_abs_error=max_abs, rel_error=rel, tolerance=tol, exact_expected=exact,
            input_shapes=[list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
            device=str(device) if device is not None else "cpu", dtype=str(dtype).replace("torch.", ""),
        )
        seconds["verify"] = time.perf_counter() - t
        if exact and not rel <= tol:
            targets = ", ".join(r.target for r in record.rewrites[:5])
            raise SurgeryError(
                f"rewrites that claim to be exact changed {record.model}'s output: relative L2 error {rel:.3g} "
                f"> tolerance {tol:g} (max abs {max_abs:.3g}); rewrites include {targets}. "
                "This is a bug in fxsurgeon: please report it with the model."
            )
    record.params_before = params_before
    record.params_after = sum(p.numel() for p in gm.parameters())
    record.seconds = seconds
    record.versions = _versions()
    gm.meta["fxsurgeon"] = record
    setattr(gm, RECORD_ATTR, record)  # survives torch.save/torch.load, which rebuild ``meta`` empty
    # GraphModule.__deepcopy__ keeps only graph-referenced attributes, plus those listed under this meta key
    gm.meta[_PRESERVED_KEY] = {a: gm.__dict__[a] for a in (RECORD_ATTR, *_CARRIED_ATTRS) if a in gm.__dict__}
    _warn_lost_hooks(hooked, gm)
    return gm


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


def _versions() -> dict[str, str]:
    out = {"fxsurgeon": __version__, "torch": torch.__version__}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:
        pass
    return out
