"""Which model sources a saved file may name, and how a name from a file is turned into a callable.

A file written by :func:`fxsurgeon.save` says where its original model comes from (a timm name or a
``package.module:function`` factory) and which leaf-module types and autowrapped functions its tracing used.
Those strings come from the file, so they are data, not instructions: :func:`fxsurgeon.load` never imports a
module or calls a function named there unless the caller allowed it. Allowed by default:

- timm model names, looked up in timm's registry (``timm.is_model``) and built by ``timm.create_model``
  (nothing is imported by name);
- ``fxsurgeon.models:*`` (the CIFAR ResNets) and ``fxsurgeon.fuzz:FuzzNet`` (the fuzzer's nets);
- torchvision model builders ``torchvision.models:NAME``, where ``NAME`` is checked against
  ``torchvision.models.list_models()`` before anything is looked up.

Everything else needs a trust pattern from the caller: an exact ``"package.module:function"`` or a whole module
``"package.module:*"``, which covers the module and its submodules (``load(path, trust_factories=["mypkg.models:*"])``, CLI ``--trust-factory``). A
``source=`` or ``model=`` the caller passes to ``load`` is the caller's own choice and is trusted as given.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterable
from typing import Any

from .errors import SurgeryError

__all__ = [
    "DEFAULT_TRUSTED_FACTORIES",
    "TRUST_ALL",
    "check_timm_name",
    "check_trust_patterns",
    "resolve_factory",
    "resolve_symbol",
]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
#: ``package.module:function`` or ``package.module:Class.attr``: identifiers only (no "..", no leading dot)
_SPEC_RE = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*$")
_PATTERN_RE = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*:(?:\*|{_IDENT}(?:\.{_IDENT})*)$")

#: factories a saved file may name without the caller's say-so (timm names and torchvision builders aside)
DEFAULT_TRUSTED_FACTORIES: tuple[str, ...] = ("fxsurgeon.models:*", "fxsurgeon.fuzz:FuzzNet")
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
