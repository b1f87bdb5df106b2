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
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import SurgeryError

__all__ = ["SurgeryTracer", "absent_args", "hooked_modules", "lost_hooks", "private_copy", "timm_notrace", "trace"]

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
        out = super().call_module(m, forward, args, kwargs)
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


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type[nn.Module]] | None = None,
    autowrap_functions: Iterable[Callable] | None = None,
    concrete_args: dict[str, Any] | None = None,
    use_timm_notrace: bool = True,
    copy_model: bool = True,
    warn_hooks: bool = True,
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
            no longer runs: the root and every module torch.fx traced through rather than called as a leaf.

    Returns:
        A GraphModule sharing submodules with the traced copy, in the model's train/eval mode.

    Raises:
        SurgeryError: tracing failed; the message names the module and the source line that broke it.

    >>> import torch.nn as nn
    >>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"expected a torch.nn.Module to trace, got {type(model).__module__}.{type(model).__qualname__}")
    leaves = list(leaf_modules or ())
    wraps = list(autowrap_functions or ())
    for t in leaves:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise SurgeryError(f"leaf_modules must be nn.Module subclasses, got {t!r}")
    for f in wraps:
        if not callable(f):
            raise SurgeryError(f"autowrap_functions must be callables, got {f!r}")
    if use_timm_notrace:
        timm_modules, timm_functions = timm_notrace()
        leaves += timm_modules
        wraps += timm_functions
    root = private_copy(model) if copy_model else model
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
    name = type(root).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.training = root.training
    if warn_hooks:
        lost = lost_hooks(hooked_modules(root), gm)
        if lost:
            names = ", ".join(f"'{n or '<root>'}' ({'/'.join(k)})" for n, k in sorted(lost.items()))
            warnings.warn(
                f"hooks on {len(lost)} module(s) do not run in the traced graph: {names}. torch.fx inlines the "
                "forward of non-leaf modules and of the root; make those module types leaf_modules to keep them.",
                stacklevel=2,
            )
    return gm
