"""Recipe files: YAML that names passes and their options with the same keys as :func:`fxsurgeon.convert`.

A recipe is a mapping whose keys are ``convert()`` keywords: every registered pass (``separable``,
``conv_head``, ...) taking ``true`` / ``false`` or a mapping of that pass's options, plus the YAML-expressible
convert options ``verify`` and ``tolerance``. A pass the recipe does not name runs with ``convert()``'s
default (``separable`` is on by default), so shipped recipes name every pass they mean to turn off.

Validation is the passes' own: each pass's options dataclass (:class:`fxsurgeon.passes.PassOptions`,
registered with the pass) checks the names, the types against its annotations (``int | str | None``,
``Iterable[int]``, ``dict[str, ...]``) and the values (``multiplier >= 1``, ...); this module only adds the
recipe file and line to its messages. A new pass or option is picked up as soon as it is registered.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "r.yaml")
>>> _ = open(path, "w").write("separable:\\n  multiplier: full\\n")
>>> load_recipe(path)
{'separable': {'multiplier': 'full'}}
"""

from __future__ import annotations

import inspect
import os
import typing
from pathlib import Path
from typing import Any

from .errors import SurgeryError
from .passes import get_pass, list_passes
from .passes.options import OptionError, describe_hint, did_you_mean, matches_hint

__all__ = ["CONVERT_KEYS", "allowed_keys", "load_recipe", "validate_recipe"]

#: convert() keywords a recipe may set besides the passes (the others take Python objects, not YAML values)
CONVERT_KEYS = ("verify", "tolerance")


def allowed_keys() -> dict[str, str]:
    """Top-level recipe keys with what each takes: every registered pass, then ``verify`` and ``tolerance``."""
    out = {name: "true, false or a mapping of its options" for name in list_passes()}
    hints = _convert_hints()
    for key in CONVERT_KEYS:
        out[key] = describe_hint(hints[key][0], hints[key][1])
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
                f"unknown key {key!r} in recipe {where(str(key))}{did_you_mean(key, allowed)}; allowed keys: "
                + "; ".join(f"{k} ({v})" for k, v in allowed.items())
            )
        if key in passes:
            out[key] = _check_pass(key, value, where)
        else:
            hint, default = hints[key]
            if not matches_hint(value, hint, default):
                raise SurgeryError(
                    f"wrong type for {key!r} in recipe {where(key)}: expected {describe_hint(hint, default)}, "
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
    try:
        info.check_options(value, strict=True)
    except OptionError as exc:
        key = exc.key or ""
        if exc.kind == "unknown":
            listing = ", ".join(f"{k} (default {options[k]!r})" for k in options)
            raise SurgeryError(f"unknown option {key!r} for pass {name!r} in recipe {where(name, key)}"
                               f"{did_you_mean(key, options)}; allowed: {listing}") from None
        if exc.kind == "type" and key in value:
            val = value[key]
            raise SurgeryError(
                f"wrong type for {name}.{key} in recipe {where(name, key)}: expected "
                f"{describe_hint(info.option_class().hint(key), options[key])}, got {type(val).__name__} {val!r}"
            ) from None
        raise SurgeryError(f"{exc} (recipe {where(name, key) if key else where(name)})") from None
    return dict(value)


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
