"""Symbolic tracing with torch.fx, aware of timm's no-trace registry.

timm registers modules and functions that plain ``symbolic_trace`` cannot trace through (dynamic padding,
shape-dependent position embeddings, ...). :func:`trace` treats those as leaf modules / autowrapped functions
whenever timm is installed, exactly as timm's own ``create_feature_extractor`` does, plus whatever the user
adds. It always traces a private deep copy unless told otherwise: several timm models cache tensors keyed by
device string, and a trace would poison that cache in the caller's instance.
"""

from __future__ import annotations

import copy
import linecache
import math
import os
import traceback
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import SurgeryError
from .runtime import model_name

__all__ = [
    "SurgeryTracer", "TraceReport", "absent_args", "check_concrete_args", "check_mode", "check_trace_report",
    "check_tracing_options", "dropped_contexts_message", "hooked_modules", "lost_hooks", "private_copy",
    "reads_training", "timm_notrace", "trace", "trace_with_report",
]

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)


def timm_notrace() -> tuple[list[type[nn.Module]], list[Callable]]:
    """timm's registered no-trace modules and functions, or two empty lists without timm."""
    try:
        import timm  # noqa: F401  (importing timm fills the registry)
        from timm.layers import _fx as timm_fx
    except ImportError:  # timm is optional for tracing
        return [], []
    modules = list(timm_fx.get_notrace_modules())
    functions = [f for f in timm_fx.get_notrace_functions() if callable(f)]
    return modules, functions


class SurgeryTracer(fx.Tracer):
    """fx tracer with explicit leaf module types and autowrapped functions.

    Leaf modules stay single ``call_module`` nodes; their own submodules are still reachable by name, so a
    pass that swaps a submodule (``separable``) works inside them, while passes that need the graph skip them.
    The tracer remembers which module it was inside when tracing broke, for the error message.
    """

    def __init__(
        self,
        leaf_modules: Iterable[type[nn.Module]] = (),
        autowrap_functions: Iterable[Callable] = (),
    ) -> None:
        self.leaf_module_types = tuple(leaf_modules)
        super().__init__(autowrap_modules=(math,), autowrap_functions=tuple(autowrap_functions))
        self.surgery_stack: list[str] = []
        #: qualified name → module, for every module whose forward the trace ran (inlined): the root and non-leaves
        self.traced_through: dict[str, nn.Module] = {}
        #: grad / autocast modes forward switched while operations were recorded: fx keeps the operations only
        self.context_changes: list[dict[str, str]] = []
        self._outer: dict[str, Any] = {}
        self._inlined: list[str] = []  # the inlined forwards being traced, innermost last

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._outer = _context_state()
        if isinstance(root, nn.Module):
            self.traced_through[""] = root
        return super().trace(root, concrete_args)

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                    type_expr: Any = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind not in ("placeholder", "output", "get_attr") and self._outer:
            now = _context_state()
            if now != self._outer:
                where = self._inlined[-1] if self._inlined else ""
                for key, value in now.items():
                    seen = {(c["state"], c["module"]) for c in self.context_changes}
                    if value != self._outer[key] and (key, where) not in seen:
                        self.context_changes.append({
                            "state": key, "value": str(value), "outside": str(self._outer[key]), "module": where,
                            "node": node.name, "at": _user_frame_now() or "",
                        })
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_module_types and isinstance(m, self.leaf_module_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:  # a module built inside forward(): not registered in the root
            path = f"<unregistered {type(m).__name__}>"
        self.surgery_stack.append(path)
        inlined = not self.is_leaf_module(m, path)
        if inlined:
            self.traced_through.setdefault(path, m)
            self._inlined.append(path)
        out = super().call_module(m, forward, args, kwargs)
        if inlined:
            self._inlined.pop()
        # popped only on success, so after a failure the stack still says where tracing broke
        self.surgery_stack.pop()
        return out


def private_copy(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` that also works when forward left non-leaf tensors in attribute caches.

    timm models such as levit cache attention biases per device; after a forward with autograd on, those
    are non-leaf tensors, which ``copy.deepcopy`` refuses. They are copied detached instead (they are caches,
    recomputed from the parameters).
    """
    memo: dict[int, Any] = {}
    for m in model.modules():
        for v in m.__dict__.values():
            for t in v.values() if isinstance(v, dict) else (v,):
                if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and not t.is_leaf:
                    memo[id(t)] = t.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:
        raise SurgeryError(
            f"could not deep-copy {type(model).__name__} to work on a private copy: {type(exc).__name__}: {exc}. "
            "Pass inplace=True to convert (or copy_model=False to trace) to work on the model itself."
        ) from exc


_HOOK_KINDS = {
    "_forward_pre_hooks": "forward pre-hook",
    "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook",
    "_backward_hooks": "backward hook",
}


def hooked_modules(model: nn.Module) -> dict[str, list[str]]:
    """``{qualified name: [hook kinds]}`` for every module with forward/backward hooks registered on it."""
    out: dict[str, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        kinds = [label for attr, label in _HOOK_KINDS.items() if getattr(mod, attr, None)]
        if kinds and name not in out:
            out[name] = kinds
    return out


def lost_hooks(hooked: dict[str, list[str]], gm: fx.GraphModule) -> dict[str, list[str]]:
    """The entries of ``hooked`` (from the original) whose hooks no longer run in ``gm``.

    A hook survives only on a module that the graph still calls as a module (``call_module``, or inside a
    leaf module that is called) and that is still the hooked object (a deep copy of it), not a replacement.
    Modules torch.fx traced through, and the root itself, lose theirs.
    """
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    lost = {}
    for name, kinds in hooked.items():
        try:
            mod = gm.get_submodule(name) if name else None
        except AttributeError:
            mod = None
        inside_leaf = any(name.startswith(c + ".") for c in called)
        still = mod is not None and (name in called or inside_leaf) and all(
            getattr(mod, attr, None) for attr, label in _HOOK_KINDS.items() if label in kinds
        )
        if not still:
            lost[name] = kinds
    return lost


def _context_state() -> dict[str, Any]:
    """The thread's autograd and autocast modes: what ``torch.no_grad()`` / ``torch.autocast(...)`` change."""
    state: dict[str, Any] = {"grad": torch.is_grad_enabled(), "inference_mode": torch.is_inference_mode_enabled()}
    for device in ("cpu", "cuda"):
        try:
            on = torch.is_autocast_enabled(device)
        except (TypeError, RuntimeError):  # a torch without per-device autocast queries
            continue
        state[f"autocast_{device}"] = (torch.get_autocast_dtype(device) if on else False)
    return state


def _user_frame_now() -> str | None:
    """The innermost frame of the current stack outside torch and fxsurgeon: the user's line being traced."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith((_TORCH_DIR, _OWN_DIR)):
            code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
            return f"{frame.filename}:{frame.lineno} in {frame.name}: `{code}`"
    return None


def reads_training(modules: dict[str, nn.Module]) -> dict[str, str]:
    """``{qualified name: "file:line"}`` for the given modules whose ``forward`` source reads ``self.training``.

    fx evaluates ``if self.training:`` (and ``training=self.training`` arguments) once, while tracing, and bakes
    the branch taken into the graph. Only the ``forward`` methods themselves are read (not helpers they call);
    torch's own modules are left out (they are leaves or read no flag that fx inlines).
    """
    import ast
    import inspect
    import textwrap

    cache: dict[type, str | None] = {}
    out: dict[str, str] = {}
    for name, mod in modules.items():
        cls = type(mod)
        if cls not in cache:
            cache[cls] = None
            fwd = getattr(cls, "forward", None)
            try:
                src_file = inspect.getsourcefile(fwd) or ""
                if src_file.startswith(_TORCH_DIR):
                    continue
                lines, first = inspect.getsourcelines(fwd)
                tree = ast.parse(textwrap.dedent("".join(lines)))
            except (TypeError, OSError, SyntaxError, IndentationError):
                continue
            for n in ast.walk(tree):
                if isinstance(n, ast.Attribute) and n.attr == "training" and isinstance(n.ctx, ast.Load):
                    cache[cls] = f"{src_file}:{first + n.lineno - 1}"
                    break
        if cache[cls]:
            out[name] = cache[cls]
    return out


def _user_frame(exc: BaseException) -> str | None:
    """The deepest traceback frame outside torch itself: the line of user/timm code that broke tracing."""
    best = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if not frame.filename.startswith((_TORCH_DIR, _OWN_DIR)):
            best = frame
    if best is None:
        return None
    code = (best.line or linecache.getline(best.filename, best.lineno)).strip()
    return f"{best.filename}:{best.lineno} in {best.name}: `{code}`"


def absent_args(model: nn.Module, num_inputs: int, concrete_args: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``concrete_args`` plus the default of each ``forward`` parameter with a literal default that is not given.

    torch.fx turns every parameter into a placeholder, and ``if mask is not None:`` on a placeholder is always
    true: timm's Hiera ``forward(x, mask=None)`` traced that way takes the masking branch and fails when called
    as ``model(x)``; ViT's ``is_causal=False`` is a flag used in control flow the same way. Fixing the
    parameters beyond the ``num_inputs`` positional inputs to their literal defaults (None, bool, int, float,
    str) traces the call that will actually be made (fx inserts a check that they keep those values).

    >>> import torch.nn as nn
    >>> class Net(nn.Module):
    ...     def forward(self, x, mask=None, scale=2.0):
    ...         return x if mask is None else x * mask
    >>> absent_args(Net(), 1), absent_args(Net(), 2), absent_args(Net(), 1, {"scale": 3.0})
    ({'mask': None, 'scale': 2.0}, {'scale': 2.0}, {'scale': 3.0, 'mask': None})
    """
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C forward: nothing to read
        return concrete_args
    out = dict(concrete_args or {})
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in out or p.default is p.empty:
            continue
        # only plain literal defaults: flags like is_causal=False are control flow just as mask=None is
        if not (p.default is None or isinstance(p.default, (bool, int, float, str))):
            continue
        if p.kind is p.KEYWORD_ONLY or i >= num_inputs:
            out[p.name] = p.default
    return out or concrete_args


@dataclass
class TraceReport:
    """What a trace observed that the graph itself does not show.

    Attributes:
        mode: the train/eval mode the trace ran in: ``"eval"``, ``"train"``, or ``"as given"`` (each module's own
            flag). Branches on ``self.training`` in inlined forwards are fixed to it.
        reads_training: ``{qualified name: "file:line"}`` of inlined forwards that read ``self.training``.
        context_changes: grad / autocast modes a forward switched while operations were recorded (torch.fx keeps
            the operations and drops the ``with`` block): one dict per (state, module) with ``state`` (``grad``,
            ``inference_mode``, ``autocast_cpu``, ``autocast_cuda``), ``value`` inside, ``outside``, ``module``,
            ``node`` and the source line ``at``.
        written_buffers: buffers the trace itself changed (and were put back): forward writes them in Python
            (``self.count += 1``), which torch.fx runs once while tracing and leaves out of the graph.
    """

    mode: str
    reads_training: dict[str, str] = field(default_factory=dict)
    context_changes: list[dict[str, str]] = field(default_factory=list)
    written_buffers: list[str] = field(default_factory=list)


_MODES = ("eval", "train")


def check_mode(mode: Any, option: str = "mode") -> str | None:
    """``None``, ``"eval"`` or ``"train"``; anything else is a :class:`SurgeryError` naming ``option``."""
    if mode is None or (isinstance(mode, str) and mode in _MODES):
        return mode
    raise SurgeryError(f"{option}= takes 'eval' or 'train' (the mode whose branches the converted graph keeps), "
                       f"got {type(mode).__name__}: {mode!r}")


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type[nn.Module]] | None = None,
    autowrap_functions: Iterable[Callable] | None = None,
    concrete_args: dict[str, Any] | None = None,
    use_timm_notrace: bool = True,
    copy_model: bool = True,
    warn_hooks: bool = True,
    mode: str | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into an :class:`torch.fx.GraphModule`.

    Args:
        model: the module to trace. It is deep-copied first unless ``copy_model=False``.
        leaf_modules: extra module types to keep as single ``call_module`` nodes.
        autowrap_functions: extra free functions to record as single ``call_function`` nodes.
        concrete_args: passed to :meth:`torch.fx.Tracer.trace` to specialise arguments (e.g. flags).
        use_timm_notrace: add timm's registered no-trace modules/functions when timm is installed.
        copy_model: trace a private deep copy (default); ``False`` traces and shares the given instance.
        warn_hooks: warn (``UserWarning``) naming the modules whose forward/backward hooks the traced graph
            no longer runs (the root and every module torch.fx traced through rather than called as a leaf), and
            the ``torch.no_grad()`` / ``torch.autocast(...)`` blocks inside forward that the graph drops.
        mode: ``"eval"`` or ``"train"``: trace with every module in that mode, so ``if self.training:`` branches
            of inlined forwards are fixed to it; each module's own flag is put back after. ``None`` (default):
            trace in the modes the modules are in.

    Returns:
        A GraphModule sharing submodules with the traced copy, in the model's train/eval modes.

    Raises:
        SurgeryError: tracing failed; the message names the module and the source line that broke it.

    >>> import torch.nn as nn
    >>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    gm, report = trace_with_report(model, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                                   concrete_args=concrete_args, use_timm_notrace=use_timm_notrace,
                                   copy_model=copy_model, mode=mode)
    if warn_hooks:
        lost = lost_hooks(hooked_modules(model), gm)
        if lost:
            names = ", ".join(f"'{n or '<root>'}' ({'/'.join(k)})" for n, k in sorted(lost.items()))
            warnings.warn(
                f"hooks on {len(lost)} module(s) do not run in the traced graph: {names}. torch.fx inlines the "
                "forward of non-leaf modules and of the root; make those module types leaf_modules to keep them.",
                stacklevel=2,
            )
        if report.context_changes:
            warnings.warn(dropped_contexts_message(report.context_changes, "traced graph"), stacklevel=2)
    return gm


def dropped_contexts_message(changes: list[dict[str, str]], result: str) -> str:
    """One line naming the ``with torch.no_grad()`` / ``torch.autocast`` blocks torch.fx dropped, and the remedy."""
    parts = []
    for c in changes[:4]:
        what = {"grad": "grad mode", "inference_mode": "inference mode"}.get(c["state"], c["state"].replace("_", " "))
        parts.append(f"{what} {c['outside']} → {c['value']} in '{c['module'] or '<root>'}'"
                     + (f" at {c['at']}" if c["at"] else ""))
    more = f" (and {len(changes) - 4} more)" if len(changes) > 4 else ""
    return (f"forward switches {'; '.join(parts)}{more}: torch.fx records the operations inside such a `with` "
            f"block but not the block, so the {result} runs them without it. Make the module whose forward does "
            "this a leaf (leaf_modules=[...]) so it runs as written, or apply the context around the call instead.")


def trace_with_report(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type[nn.Module]] | None = None,
    autowrap_functions: Iterable[Callable] | None = None,
    concrete_args: dict[str, Any] | None = None,
    use_timm_notrace: bool = True,
    copy_model: bool = True,
    mode: str | None = None,
) -> tuple[fx.GraphModule, TraceReport]:
    """:func:`trace` without warnings, plus the :class:`TraceReport` of what the graph does not show."""
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"expected a torch.nn.Module to trace, got {type(model).__module__}.{type(model).__qualname__}")
    mode = check_mode(mode)
    leaves, wraps = check_tracing_options(leaf_modules, autowrap_functions, concrete_args)
    if use_timm_notrace:
        timm_modules, timm_functions = timm_notrace()
        leaves += timm_modules
        wraps += timm_functions
    root = private_copy(model) if copy_model else model
    saved = {name: m.training for name, m in root.named_modules()}
    # tracing runs Python on real buffers (``self.count += 1`` on a buffer is executed, not recorded): put them back
    buffers = [(n, b, b.detach().clone()) for n, b in root.named_buffers()
               if not b.is_inference() and b.device.type != "meta"]
    written: list[str] = []
    if mode is not None:
        root.train(mode == "train")
    tracer = SurgeryTracer(leaves, wraps)
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as exc:
        where = tracer.surgery_stack[-1] if tracer.surgery_stack else ""
        mod = root.get_submodule(where) if where else root
        location = _user_frame(exc)
        msg = (
            f"torch.fx could not trace {type(model).__name__}: in module "
            f"'{where or '<root>'}' ({type(mod).__module__}.{type(mod).__qualname__})"
            + (f" at {location}" if location else "")
            + f": {type(exc).__name__}: {exc}. "
            f"What you can do: mark that module type as a leaf (leaf_modules=[{type(mod).__qualname__}]), "
            "wrap the offending function (autowrap_functions=[...]), or fix data-dependent Python values "
            "with concrete_args={...}."
        )
        raise SurgeryError(msg) from exc
    finally:
        for name, m in root.named_modules():
            m.training = saved.get(name, m.training)
        with torch.no_grad():
            for n, b, v in buffers:
                if b.shape != v.shape or not torch.equal(b, v):
                    written.append(n)
                if b.shape == v.shape:
                    b.copy_(v)
    name = type(root).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.training = root.training
    report = TraceReport(mode or "as given", reads_training(tracer.traced_through), list(tracer.context_changes),
                         written)
    return gm, report


def check_tracing_options(leaf_modules: Any, autowrap_functions: Any,
                          concrete_args: Any) -> tuple[list[type[nn.Module]], list[Callable]]:
    """Type checks of the tracing controls: (leaf module types, autowrapped functions) as lists, else SurgeryError."""
    out = []
    for option, value, ok, want in (
            ("leaf_modules", leaf_modules, lambda t: isinstance(t, type) and issubclass(t, nn.Module),
             "nn.Module subclasses"),
            ("autowrap_functions", autowrap_functions,
             lambda f: isinstance(f, types.FunctionType), "plain Python functions (def or lambda)")):
        if value is None:
            out.append([])
            continue
        if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable) or isinstance(value, type):
            raise SurgeryError(f"{option}= takes a list of {want}, got {type(value).__name__}: {value!r}")
        items = list(value)
        for i, item in enumerate(items):
            if not ok(item):
                raise SurgeryError(f"{option}[{i}] must be one of the {want}, got {type(item).__name__}: {item!r}")
        out.append(items)
    if concrete_args is not None:
        if not isinstance(concrete_args, dict):
            raise SurgeryError(f"concrete_args= takes a dict of forward parameter names to values, got "
                               f"{type(concrete_args).__name__}: {concrete_args!r}")
        bad = [k for k in concrete_args if not isinstance(k, str)]
        if bad:
            raise SurgeryError(f"concrete_args keys must be forward parameter names (str), got {bad[0]!r}")
    return out[0], out[1]


def check_concrete_args(model: nn.Module, concrete_args: dict[str, Any] | None) -> None:
    """Every ``concrete_args`` key must name a parameter of ``model.forward``: a SurgeryError lists them otherwise."""
    import inspect

    if not concrete_args:
        return
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in concrete_args if k not in params]
    if unknown:
        raise SurgeryError(f"concrete_args names {unknown}, which {type(model).__name__}.forward does not take; "
                           f"its parameters: {list(params)}")


def check_trace_report(model: nn.Module, report: TraceReport, mode: str | None) -> None:
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
