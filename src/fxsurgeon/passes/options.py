"""Pass options as frozen dataclasses: the one place an option's name, type, default and allowed values live.

Each pass declares a subclass of :class:`PassOptions` and registers it with ``register_pass(options=...)``.
``convert()``, recipe files (:mod:`fxsurgeon.recipes`) and the command line all validate through
:meth:`PassOptions.from_dict`: unknown keys (with a did-you-mean), flags that are not bools, and each pass's
value checks (:meth:`PassOptions.validate`). Recipes also check each value against the field's annotation
(``strict=True``), since YAML has no generators or tuples to be lenient about. A pass registered without a
dataclass gets one derived from its keyword-only parameters (:func:`options_from_signature`).

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Toy(PassOptions):
...     pass_name = "toy"
...     level: int = 1
...     def validate(self):
...         if self.level < 0:
...             raise OptionError("toy: level must be >= 0", key="level", kind="value")
>>> Toy.from_dict({"level": 2})
Toy(level=2)
>>> Toy.from_dict({"levle": 2})
Traceback (most recent call last):
...
fxsurgeon.passes.options.OptionError: unknown option 'levle' for pass 'toy' (did you mean 'level'?); allowed: level
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from ..errors import SurgeryError

__all__ = ["OptionError", "PassOptions", "describe_hint", "did_you_mean", "matches_hint", "options_from_signature"]

_SEQUENCES = (list, tuple, set, frozenset, cabc.Iterable, cabc.Sequence, cabc.Collection, cabc.Set)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)
EMPTY = inspect.Parameter.empty


class OptionError(SurgeryError):
    """A refused pass option. ``key`` names it; ``kind`` is ``"unknown"``, ``"type"`` or ``"value"``, so a caller
    with more context (a recipe file and its line numbers) can say where it came from."""

    def __init__(self, message: str, *, key: str | None = None, kind: str = "value") -> None:
        super().__init__(message)
        self.key, self.kind = key, kind


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """Base of every pass's options dataclass (subclasses are ``@dataclass(frozen=True)``).

    Subclasses set the class attribute ``pass_name`` and may override :meth:`validate`, which runs after
    construction and may normalise a field with ``object.__setattr__`` (e.g. one pattern → a list of one).
    """

    pass_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if _is_flag(self._hints().get(f.name)):
                value = getattr(self, f.name)
                if not isinstance(value, bool) and not (value is None and f.default is None):
                    raise OptionError(f"{self.pass_name}: {f.name} must be True or False, got "
                                      f"{type(value).__name__}: {value!r}", key=f.name, kind="type")
        self.validate()

    def validate(self) -> None:
        """Value checks of this pass's options; raise :class:`OptionError` naming the option."""

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, strict: bool = False) -> PassOptions:
        """Options from keyword arguments or a recipe mapping.

        Args:
            data: option name → value; missing names take their defaults.
            strict: also check every value against its field's annotation before the pass's own checks
                (recipe files; see :func:`matches_hint`).

        Raises:
            OptionError: an unknown name, a value of the wrong type, or a value the pass refuses.
        """
        data = dict(data or {})
        defaults = cls.defaults()
        for key in data:
            if not isinstance(key, str) or key not in defaults:
                raise OptionError(f"unknown option {key!r} for pass {cls.pass_name!r}"
                                  f"{did_you_mean(key, defaults)}; allowed: {', '.join(defaults)}",
                                  key=str(key), kind="unknown")
        if strict:
            hints = cls._hints()
            for key, value in data.items():
                hint = hints.get(key, EMPTY)
                if not matches_hint(value, hint, defaults[key]):
                    raise OptionError(f"{cls.pass_name}: {key} must be {describe_hint(hint, defaults[key])}, got "
                                      f"{type(value).__name__} {value!r}", key=key, kind="type")
        return cls(**data)

    @classmethod
    def coerce(cls, options: PassOptions | None, kwargs: Mapping[str, Any]) -> PassOptions:
        """A pass function's options: an instance given positionally, or keyword arguments — not both."""
        if options is None:
            return cls.from_dict(kwargs)
        if not isinstance(options, cls):
            raise SurgeryError(f"{cls.pass_name}: options must be {cls.__name__}, got {type(options).__name__}")
        if kwargs:
            raise SurgeryError(f"{cls.pass_name}: give options as {cls.__name__} or as keywords, not both")
        return options

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Option name → default, in declaration order."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = EMPTY
        return out

    @classmethod
    def hint(cls, key: str) -> Any:
        """The resolved annotation of option ``key`` (``inspect.Parameter.empty`` without one)."""
        return cls._hints().get(key, EMPTY)

    @classmethod
    def _hints(cls) -> dict[str, Any]:
        cached = cls.__dict__.get("_fxsurgeon_hints")
        if cached is None:
            names = {f.name for f in dataclasses.fields(cls)}
            try:
                hints = typing.get_type_hints(cls)
            except Exception:  # an unresolvable forward reference: such fields are checked by their default
                hints = {}
            cached = {k: v for k, v in hints.items() if k in names}
            setattr(cls, "_fxsurgeon_hints", cached)  # noqa: B010 - a plain attribute of the class, not a field
        return cached

    def to_dict(self, *, changed_only: bool = False) -> dict[str, Any]:
        """Option name → value; ``changed_only`` keeps only the options the caller set (leaving out those at
        their default and those :meth:`validate` filled in, listed in the instance's ``defaulted``)."""
        defaults = self.defaults()
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if changed_only:
            filled = getattr(self, "defaulted", {})
            out = {k: v for k, v in out.items() if k not in filled and not _same(v, defaults[k])}
        return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a is b or a == b)
    except Exception:  # tensors and other values without a plain truth value
        return False


def _is_flag(hint: Any) -> bool:
    if hint is bool:
        return True
    args = set(typing.get_args(hint))
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and args == {bool, type(None)}


def options_from_signature(name: str, fn: Callable[..., Any]) -> type[PassOptions]:
    """A :class:`PassOptions` dataclass from a pass function's keyword-only parameters (for passes registered
    without one): their names, defaults and annotations; no value checks beyond flags being bools.

    >>> def toy(gm, *, level: int = 1, names: list[str] | None = None): ...
    >>> opts = options_from_signature("toy", toy).from_dict({"level": 3})
    >>> opts.level, opts.names
    (3, None)
    """
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    spec = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        hint = hints.get(p.name, Any)
        default = None if p.default is EMPTY else p.default
        if isinstance(default, (list, dict, set)):
            spec.append((p.name, hint, dataclasses.field(default_factory=lambda d=default: type(d)(d))))
        else:
            spec.append((p.name, hint, dataclasses.field(default=default)))
    cls = dataclasses.make_dataclass(f"{name.title().replace('_', '')}Options", spec, bases=(PassOptions,),
                                     frozen=True)
    cls.pass_name = name
    cls._fxsurgeon_hints = {k: v for k, v in hints.items() if k in {s[0] for s in spec}}
    return cls


# ------------------------------------------------------------------------------------------------- type hints


def did_you_mean(key: Any, allowed: typing.Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest allowed name, or ``""``."""
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def matches_hint(value: Any, hint: Any, default: Any = EMPTY) -> bool:
    """Whether a plain (YAML/JSON) value fits a type annotation, or without one the type of the default.

    >>> matches_hint([3, 5], str | cabc.Iterable[int]), matches_hint("12", cabc.Iterable[int])
    (True, False)
    """
    if hint is EMPTY:
        if default is EMPTY or default is None:
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
        return any(matches_hint(value, a) for a in args)
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
            return all(matches_hint(k, args[0]) and matches_hint(v, args[1]) for k, v in value.items())
        return True
    if container in _SEQUENCES:
        # YAML sequences arrive as lists; a string is iterable but never meant as a sequence of items
        if not isinstance(value, (list, tuple)):
            return False
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(args) == len(value) and all(matches_hint(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return all(matches_hint(v, item) for v in value)
    if isinstance(container, type):
        return isinstance(value, container)
    return False  # callables, tensors, ...: not expressible in a recipe


def describe_hint(hint: Any, default: Any = EMPTY) -> str:
    """An annotation in words, with the default: ``"int | str | null (default None)"``."""
    if hint is EMPTY:
        text = type(default).__name__ if default not in (None, EMPTY) else "any value"
    else:
        text = _hint_text(hint)
    return text + ("" if default is EMPTY else f" (default {default!r})")


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
