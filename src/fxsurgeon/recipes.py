"""Recipe files: YAML that names passes and their options with the same keys as :func:`fxsurgeon.convert`.

A recipe is a mapping whose keys are ``convert()`` keywords: every registered pass (``separable``,
``conv_head``, ...) taking ``true`` / ``false`` or a mapping of that pass's options, plus the YAML-expressible
convert options ``verify`` and ``tolerance``. A pass the recipe does not name runs with ``convert()``'s
default (``separable`` is on by default), so shipped recipes name every pass they mean to turn off.

Validation is derived from the pass registry, never from a list kept here: the allowed options of a pass
are the keyword-only parameters of its function (:meth:`fxsurgeon.passes.PassInfo.options`), and each value
is checked against the parameter's annotation (``int | str | None``, ``Iterable[int]``, ``dict[str, ...]``)
or, without one, the type of its default. A new pass or option is picked up as soon as it is registered.
Value checks beyond the type (``multiplier >= 1``, ...) stay with the pass, which runs them in ``convert()``.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "r.yaml")
>>> _ = open(path, "w").write("separable:\\n  multiplier: full\\n")
>>> load_recipe(path)
{'separable': {'multiplier': 'full'}}
"""

from __future__ import annotations

import collections.abc as cabc
import difflib
import inspect
import os
import types
import typing
from pathlib import Path
from typing import Any

from .errors import SurgeryError
from .passes import get_pass, list_passes

__all__ = ["CONVERT_KEYS", "allowed_keys", "load_recipe", "validate_recipe"]

#: convert() keywords a recipe may set besides the passes (the others take Python objects, not YAML values)
CONVERT_KEYS = ("verify", "tolerance")

_SEQUENCES = (list, tuple, set, frozenset, cabc.Iterable, cabc.Sequence, cabc.Collection, cabc.Set)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def allowed_keys() -> dict[str, str]:
    """Top-level recipe keys with what each takes: every registered pass, then ``verify`` and ``tolerance``."""
    out = {name: "true, false or a mapping of its options" for name in list_passes()}
    hints = _convert_hints()
    for key in CONVERT_KEYS:
        out[key] = _describe(hints[key][0], hints[key][1])
    return out


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a recipe file; returns keyword arguments for :func:`fxsurgeon.convert`.

    Args:
        path: a YAML (or JSON) file holding a mapping, e.g. ``separable: {multiplier: full}``.

    Returns:
        A dict such as ``{"separable": {"multiplier": "full"}, "conv_head": True}``: pass it as
        ``fxsurgeon.convert(model, **recipe)``. An empty file gives ``{}`` (convert's defaults).

    Raises:
        SurgeryError: the file is missing or not YAML, or a key or value is not allowed; the message names
            the key (with its line), the file, and the allowed keys or the expected type and default.
    """
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SurgeryError(f"cannot read recipe {str(p)!r}: {exc.strerror or exc}") from exc
    try:
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SurgeryError(f"recipe {str(p)!r} is not valid YAML: {exc}") from exc
    return validate_recipe({} if data is None else data, source=str(p), lines=lines)


def validate_recipe(
    data: Any, source: str = "<recipe>", lines: dict[tuple[str, ...], int] | None = None
) -> dict[str, Any]:
    """Check a recipe already parsed into Python values (see :func:`load_recipe`); returns a clean copy.

    ``lines`` maps key paths such as ``("separable", "multiplier")`` to 1-based line numbers for messages.

    >>> validate_recipe({"separable": {"multiplier": 2}, "verify": True})
    {'separable': {'multiplier': 2}, 'verify': True}
    """
    lines = lines or {}

    def where(*key: str) -> str:
        line = lines.get(tuple(key))
        return f"{source}:{line}" if line else source

    if not isinstance(data, dict):
        raise SurgeryError(
            f"recipe {source} must be a mapping of convert() keywords (e.g. `separable: {{multiplier: 2}}`), "
            f"got {type(data).__name__}"
        )
    allowed = allowed_keys()
    passes = set(list_passes())
    hints = _convert_hints()
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in allowed:
            raise SurgeryError(
                f"unknown key {key!r} in recipe {where(str(key))}{_did_you_mean(key, allowed)}; allowed keys: "
                + "; ".join(f"{k} ({v})" for k, v in allowed.items())
            )
        if key in passes:
            out[key] = _check_pass(key, value, where)
        else:
            hint, default = hints[key]
            if not _matches(value, hint, default):
                raise SurgeryError(
                    f"wrong type for {key!r} in recipe {where(key)}: expected {_describe(hint, default)}, "
                    f"got {type(value).__name__} {value!r}"
                )
            out[key] = value
    return out


def _check_pass(name: str, value: Any, where) -> bool | dict[str, Any]:
    info = get_pass(name)
    if isinstance(value, bool):
        return value
    if value is None:  # `separable:` with nothing after it: the pass with its defaults
        return True
    if not isinstance(value, dict):
        raise SurgeryError(
            f"wrong type for pass {name!r} in recipe {where(name)}: expected true, false or a mapping of its "
            f"options ({', '.join(info.options())}), got {type(value).__name__} {value!r}"
        )
    options = info.options()
    hints = _pass_hints(info.fn)
    clean: dict[str, Any] = {}
    for opt, val in value.items():
        if opt not in options:
            listing = ", ".join(f"{k} (default {options[k]!r})" for k in options)
            raise SurgeryError(
                f"unknown option {opt!r} for pass {name!r} in recipe {where(name, str(opt))}"
                f"{_did_you_mean(opt, options)}; allowed: {listing}"
            )
        hint = hints.get(opt, inspect.Parameter.empty)
        if not _matches(val, hint, options[opt]):
            raise SurgeryError(
                f"wrong type for {name}.{opt} in recipe {where(name, opt)}: expected "
                f"{_describe(hint, options[opt])}, got {type(val).__name__} {val!r}"
            )
        clean[opt] = val
    return clean


def _did_you_mean(key: Any, allowed: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _pass_hints(fn) -> dict[str, Any]:
    """Resolved annotations of a pass function; an unresolvable one is left out (checked by its default)."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # a forward reference the module cannot resolve: fall back to defaults
        out = {}
        for p in inspect.signature(fn).parameters.values():
            if not isinstance(p.annotation, str) and p.annotation is not inspect.Parameter.empty:
                out[p.name] = p.annotation
        return out


def _convert_hints() -> dict[str, tuple[Any, Any]]:
    from .convert import convert

    sig = inspect.signature(convert)
    hints = _pass_hints(convert)
    return {k: (hints.get(k, inspect.Parameter.empty), sig.parameters[k].default) for k in CONVERT_KEYS}


def _matches(value: Any, hint: Any, default: Any = inspect.Parameter.empty) -> bool:
    """Whether a YAML value fits a type annotation (or, without one, the type of the default)."""
    if hint is inspect.Parameter.empty:
        if default is inspect.Parameter.empty or default is None:
            return True  # nothing to check against; the pass validates the value itself
        hint = type(default)
        if hint in (tuple, list, set, frozenset):
            hint = cabc.Iterable
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in _MAPPINGS:
        if not isinstance(value, dict):
            return False
        if len(args) == 2:
            return all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
        return True
    if container in _SEQUENCES:
        # YAML sequences arrive as lists; a string is iterable but never meant as a sequence of items
        if not isinstance(value, (list, tuple)):
            return False
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return all(_matches(v, item) for v in value)
    if isinstance(container, type):
        return isinstance(value, container)
    return False  # callables, tensors, ...: not expressible in a recipe


def _describe(hint: Any, default: Any) -> str:
    if hint is inspect.Parameter.empty:
        text = type(default).__name__ if default not in (None, inspect.Parameter.empty) else "any value"
    else:
        text = _hint_text(hint)
    return text + ("" if default is inspect.Parameter.empty else f" (default {default!r})")


def _hint_text(hint: Any) -> str:
    if hint is type(None) or hint is None:
        return "null"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_hint_text(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    container = origin or hint
    if container in _SEQUENCES:
        return f"list of {_hint_text(args[0])}" if args and args[0] is not Ellipsis else "list"
    if container in _MAPPINGS:
        return f"mapping of {_hint_text(args[0])} to {_hint_text(args[1])}" if len(args) == 2 else "mapping"
    if hint is Any:
        return "any value"
    return getattr(hint, "__name__", str(hint))


def _key_lines(node: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Line numbers (1-based) of mapping keys in a composed YAML node tree, by key path."""
    import yaml

    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = (*prefix, str(k.value))
            out[path] = k.start_mark.line + 1
            out.update(_key_lines(v, path))
    return out
