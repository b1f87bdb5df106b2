"""Which model sources a saved file may name, and how a name from a file is turned into a callable.

A file written by :func:`fxsurgeon.save` says where its original model comes from (a timm name or a
``package.module:function`` factory) and which leaf-module types and autowrapped functions its tracing used.
Those strings come from the file, so they are data, not instructions: :func:`fxsurgeon.load` never imports a
module or calls a function named there unless the caller allowed it. Allowed by default:

- timm model names, looked up in timm's registry (``timm.is_model``) and built by ``timm.create_model``
  (nothing is imported by name);
- ``fxsurgeon.models:*`` (the CIFAR ResNets) and ``fxsurgeon.testing.fuzz:FuzzNet`` (the fuzzer's nets);
- torchvision model builders ``torchvision.models:NAME``, where ``NAME`` is checked against
  ``torchvision.models.list_models()`` before anything is looked up.

Everything else needs a trust pattern from the caller: an exact ``"package.module:function"`` or a whole module
``"package.module:*"``, which covers the module and its submodules (``load(path, trust_factories=["mypkg.models:*"])``, CLI ``--trust-factory``). A
``source=`` or ``model=`` the caller passes to ``load`` is the caller's own choice and is trusted as given.

The other direction lives here too: :func:`normalize_source`, :func:`infer_source` and :func:`describe_tracing` put
a model's source and tracing options into the JSON form that ``convert()`` records and ``save`` writes (they sit
below both, so ``convert`` need not import :mod:`fxsurgeon.io`).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError
from .moved import MOVED

__all__ = [
    "DEFAULT_TRUSTED_FACTORIES",
    "TRUST_ALL",
    "check_timm_name",
    "check_trust_patterns",
    "describe_tracing",
    "infer_source",
    "json_path_error",
    "normalize_source",
    "qualified_name",
    "resolve_factory",
    "resolve_symbol",
]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
#: ``package.module:function`` or ``package.module:Class.attr``: identifiers only (no "..", no leading dot)
_SPEC_RE = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*$")
_PATTERN_RE = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*:(?:\*|{_IDENT}(?:\.{_IDENT})*)$")

#: factories a saved file may name without the caller's say-so (timm names and torchvision builders aside)
DEFAULT_TRUSTED_FACTORIES: tuple[str, ...] = ("fxsurgeon.models:*", "fxsurgeon.testing.fuzz:FuzzNet")
#: sentinel for sources the caller gave itself (``load(source=...)``, ``save``, ``convert``): not checked
TRUST_ALL = "*trust-all*"
_TORCHVISION = "torchvision.models"

HOW_TO_TRUST = ("to allow it, pass load(path, trust_factories=['{mod}:{attr}']) (or '{mod}:*' for the whole "
                "module; CLI: --trust-factory '{mod}:{attr}'), or rebuild from a source you name: "
                "load(path, source=...) or load(path, model=...)")


def check_trust_patterns(patterns: Any, option: str = "trust_factories") -> tuple[str, ...]:
    """Validate the caller's trust patterns: a list of ``"pkg.mod:name"`` / ``"pkg.mod:*"`` strings.

    >>> check_trust_patterns(["mypkg.models:*", "other.nets:build"])
    ('mypkg.models:*', 'other.nets:build')
    """
    if patterns is None:
        return ()
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise SurgeryError(f"{option} must be a list of 'package.module:function' or 'package.module:*' "
                           f"patterns, got {type(patterns).__name__}: {patterns!r:.80}")
    for p in patterns:
        if not isinstance(p, str) or not _PATTERN_RE.fullmatch(p):
            raise SurgeryError(f"{option} entry {p!r:.80} is not 'package.module:function' or 'package.module:*' "
                               "(dotted identifiers only)")
    return tuple(patterns)


def _matches(spec: str, patterns: Iterable[str]) -> bool:
    mod, _, attr = spec.partition(":")
    for p in patterns:
        p_mod, _, p_attr = p.partition(":")
        if p_mod == mod and p_attr == attr:
            return True
        # a wildcard covers the public names of the module and its submodules, never a path through them
        # (pkg.mod:torch.load)
        if p_attr == "*" and (mod == p_mod or mod.startswith(p_mod + ".")) and "." not in attr \
                and not attr.startswith("_"):
            return True
    return False


def _check_spec(spec: Any, what: str) -> str:
    if not isinstance(spec, str) or len(spec) > 300 or not _SPEC_RE.fullmatch(spec):
        raise SurgeryError(f"{what} {spec!r:.100} in the file is not of the form 'package.module:name' "
                           "(dotted identifiers only); refused")
    if any(part.startswith("__") for part in re.split(r"[.:]", spec)):
        raise SurgeryError(f"{what} {spec!r:.100} in the file names a dunder attribute; refused")
    return spec


def check_timm_name(name: Any) -> str:
    """A timm model name from a file, checked against timm's registry (nothing is imported by this name)."""
    if not isinstance(name, str) or len(name) > 200:
        raise SurgeryError(f"source 'timm' in the file must be a model name, got {name!r:.80}")
    try:
        import timm
    except ImportError as exc:
        raise SurgeryError(f"rebuilding timm model {name!r} needs timm installed") from exc
    if not timm.is_model(name):
        raise SurgeryError(f"source 'timm' {name!r:.80} in the file is not a model in timm's registry "
                           f"(timm {timm.__version__}); pass load(path, source=...) to rebuild from another source")
    return name


def _torchvision_builder(spec: str) -> Any:
    mod, _, attr = spec.partition(":")
    try:
        import torchvision.models as tvm
    except ImportError as exc:
        raise SurgeryError(f"rebuilding {spec!r} needs torchvision installed") from exc
    if attr not in tvm.list_models():  # checked by name before anything is looked up
        raise SurgeryError(f"factory {spec!r} in the file is not a torchvision model builder "
                           f"(torchvision.models.list_models()); " + HOW_TO_TRUST.format(mod=mod, attr=attr))
    return _import_attr(spec, "model factory")


def _import_attr(spec: str, what: str) -> Any:
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SurgeryError(f"cannot import {what} {spec!r}: {type(exc).__name__}: {exc}") from exc
    return obj


def resolve_factory(spec: Any, trust: Iterable[str] | str) -> Any:
    """The factory a file names, after checking it against the allow-list and the caller's ``trust`` patterns.

    ``trust`` is :data:`TRUST_ALL` for a source the caller gave itself. Nothing is imported before the check.

    >>> resolve_factory("fxsurgeon.models:resnet20", ()).__name__
    'resnet20'
    >>> resolve_factory("fxsurgeon.fuzz:FuzzNet", ()).__module__  # named where it was before the move
    'fxsurgeon.testing.fuzz'
    >>> resolve_factory("os:system", ())
    Traceback (most recent call last):
    ...
    fxsurgeon.errors.SurgeryError: model factory 'os:system' in the file is not allowed: ...
    """
    if trust == TRUST_ALL:
        if not isinstance(spec, str) or ":" not in spec:
            raise SurgeryError(f"model factory {spec!r} is not of the form 'package.module:name'")
        return _import_attr(spec, "model factory")
    spec = _check_spec(spec, "model factory")
    mod, _, attr = spec.partition(":")
    if mod in MOVED:  # a file written before fxsurgeon's modules moved into folders (fxsurgeon.fuzz:FuzzNet)
        mod = MOVED[mod]
        spec = f"{mod}:{attr}"
    if (mod == _TORCHVISION or mod.startswith(_TORCHVISION + ".")) and not _matches(spec, trust):
        return _torchvision_builder(spec)
    if not (_matches(spec, DEFAULT_TRUSTED_FACTORIES) or _matches(spec, trust)):
        raise SurgeryError(f"model factory {spec!r} in the file is not allowed: load only imports timm models, "
                           "fxsurgeon.models, torchvision builders and factories the caller trusts; "
                           + HOW_TO_TRUST.format(mod=mod, attr=attr))
    obj = _import_attr(spec, "model factory")
    if not callable(obj) or isinstance(obj, type(sys)):
        raise SurgeryError(f"model factory {spec!r} in the file is a {type(obj).__name__}, not a function or class")
    owner = getattr(obj, "__module__", None) or ""
    if spec not in trust and spec not in DEFAULT_TRUSTED_FACTORIES and not (
            owner == mod or owner.startswith(mod + ".")):
        # a wildcard covers what the module defines, not what it imported from elsewhere
        raise SurgeryError(f"model factory {spec!r} in the file is defined in {owner!r}, not in {mod!r}; refused. "
                           + HOW_TO_TRUST.format(mod=mod, attr=attr))
    return obj


def resolve_symbol(spec: Any, trust: Iterable[str] | str, what: str, want_type: type | None = None,
                   model: Any = None) -> Any:
    """A leaf-module type or autowrapped function named in a file's tracing record.

    Without the caller's trust, a leaf-module type must be the class (or a base class) of a module in the rebuilt
    ``model``, found by walking the model rather than by looking the name up; an autowrapped function must be a
    function of a module one of the model's classes comes from (where its ``forward`` can call it). Nothing is
    imported for either, and nothing is called.
    """
    if trust == TRUST_ALL:
        if not isinstance(spec, str) or ":" not in spec:
            raise SurgeryError(f"{what} {spec!r} is not of the form 'package.module:name'")
        return _import_attr(spec, what)
    spec = _check_spec(spec, what)
    mod, _, attr = spec.partition(":")
    classes = {cls for m in (model.modules() if model is not None else ()) for cls in type(m).__mro__}
    if _matches(spec, DEFAULT_TRUSTED_FACTORIES) or _matches(spec, trust):
        obj: Any = _import_attr(spec, what)
    elif want_type is not None:
        found = [c for c in classes if f"{c.__module__}:{c.__qualname__}" == spec]
        if not found:
            raise SurgeryError(f"{what} {spec!r} in the file is not the class of any module of the rebuilt model, "
                               "and not trusted; " + HOW_TO_TRUST.format(mod=mod, attr=attr))
        obj = found[0]
    elif mod in {c.__module__ for c in classes} and "." not in attr and mod in sys.modules:
        obj = getattr(sys.modules[mod], attr, None)
        if obj is None:
            raise SurgeryError(f"{what} {spec!r} in the file does not exist")
    else:
        raise SurgeryError(f"{what} {spec!r} in the file is not from a module the rebuilt model's layers come "
                           "from, and not trusted; " + HOW_TO_TRUST.format(mod=mod, attr=attr))
    if want_type is not None:
        ok = isinstance(obj, type) and issubclass(obj, want_type)
    else:
        import types

        ok = isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)) and \
            getattr(obj, "__module__", None) not in ("builtins", "os", "posix", "subprocess", "shutil", "sys")
    if not ok:
        kind = f"a {want_type.__name__} subclass" if want_type is not None else "a Python function"
        raise SurgeryError(f"{what} {spec!r} in the file is {type(obj).__name__} {obj!r:.60}, not {kind}; refused")
    return obj


# ------------------------------------------------------------------ naming sources and tracing for the record


def qualified_name(obj: Any) -> str:
    """``"package.module:Qual.name"`` for an importable function or class."""
    return f"{obj.__module__}:{obj.__qualname__}"


def json_path_error(value: Any, where: str) -> str | None:
    """Where inside ``value`` something is not plain JSON (dict with str keys, list, str, number, bool, None)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = json_path_error(v, f"{where}[{i}]")
            if bad:
                return bad
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where} has a non-string key {k!r}"
            bad = json_path_error(v, f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    return f"{where} is a {type(value).__module__}.{type(value).__qualname__} ({value!r:.80})"


def normalize_source(source: Any) -> dict[str, Any]:
    """A model source in its canonical form ``{"timm": name | "factory": "pkg.mod:fn", "kwargs": {...}}``.

    Accepts a timm model name (``"resnet18"``), a factory spec (``"package.module:function"``), an importable
    function or class, or a dict with ``"timm"`` or ``"factory"`` and optional ``"kwargs"`` (JSON values).

    >>> normalize_source("resnet18")
    {'timm': 'resnet18', 'kwargs': {}}
    >>> normalize_source({"factory": "fxsurgeon.models:resnet20", "kwargs": {"num_classes": 100}})
    {'factory': 'fxsurgeon.models:resnet20', 'kwargs': {'num_classes': 100}}
    """
    if callable(source) and not isinstance(source, str):
        qualname = getattr(source, "__qualname__", "")
        if not getattr(source, "__module__", None) or not qualname or "<" in qualname:
            raise SurgeryError(
                f"source {source!r} cannot be imported by name (a lambda or a local function?); "
                "give a module-level factory, or 'package.module:function'"
            )
        source = qualified_name(source)
    if isinstance(source, str):
        source = {"factory": source} if ":" in source else {"timm": source}
    if not isinstance(source, dict):
        raise SurgeryError(
            f"source must be a timm name, 'package.module:function', a factory function or a dict, got "
            f"{type(source).__name__}: {source!r}"
        )
    kinds = [k for k in ("timm", "factory") if k in source]
    extra = set(source) - {"timm", "factory", "kwargs"}
    if len(kinds) != 1 or extra or not isinstance(source[kinds[0]], str):
        raise SurgeryError(
            f"source dict needs exactly one of 'timm' (a model name) or 'factory' ('package.module:function') "
            f"and optionally 'kwargs', got {source!r}"
        )
    kwargs = dict(source.get("kwargs") or {})
    bad = json_path_error(kwargs, "source kwargs")
    if bad:
        raise SurgeryError(f"{bad}: source kwargs must be JSON values (str, number, bool, None, list, dict)")
    kind = kinds[0]
    if kind == "factory" and ":" not in source[kind]:
        raise SurgeryError(f"factory {source[kind]!r} is not of the form 'package.module:function'")
    return {kind: source[kind], "kwargs": kwargs}


def infer_source(model: nn.Module) -> dict[str, Any] | None:
    """The source of a model built by ``timm.create_model``: its architecture, ``num_classes`` and ``in_chans``.

    Other keyword arguments given to ``create_model`` cannot be read back from the model; :func:`save`
    rebuilds from this source before writing and refuses when the rebuilt architecture differs, asking for
    an explicit ``source=``. Returns None for models that do not come from timm.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not type(model).__module__.startswith("timm.") or not isinstance(cfg, dict) or not cfg.get("architecture"):
        return None
    kwargs: dict[str, Any] = {}
    for attr in ("num_classes", "in_chans"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            kwargs[attr] = value
    return {"timm": str(cfg["architecture"]), "kwargs": kwargs}


def _input_spec(x: Any) -> dict[str, Any]:
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
    if json_path_error(x, "") is None:
        return {"value": x}
    return {"type": f"{type(x).__module__}.{type(x).__qualname__}"}


def describe_tracing(
    leaf_modules: Iterable[type] | None,
    autowrap_functions: Iterable[Callable] | None,
    concrete_args: dict[str, Any] | None,
    inputs: tuple,
) -> dict[str, Any]:
    """JSON-ready account of how ``convert()`` traced the model, for the record and for :func:`load`.

    Types and functions are named ``"package.module:qualname"``; ``concrete_args`` is kept as is when it is
    plain JSON and described by ``repr`` otherwise (such a conversion cannot be replayed by :func:`load`);
    example inputs keep only their shapes and dtypes.
    """
    out: dict[str, Any] = {}
    if leaf_modules:
        out["leaf_modules"] = [qualified_name(t) for t in leaf_modules]
    if autowrap_functions:
        out["autowrap_functions"] = [qualified_name(f) for f in autowrap_functions]
    if concrete_args:
        if json_path_error(concrete_args, "concrete_args") is None:
            out["concrete_args"] = dict(concrete_args)
        else:
            out["concrete_args_repr"] = repr(concrete_args)
    if inputs:
        out["example_inputs"] = [_input_spec(x) for x in inputs]
    return out
