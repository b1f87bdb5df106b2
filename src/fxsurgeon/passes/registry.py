"""The pass registry itself: :class:`PassInfo`, :func:`register_pass`, :func:`get_pass`, :func:`list_passes`.

Kept apart from ``fxsurgeon.passes`` (which re-exports it and imports the built-in passes so they register) so
that a pass module registers itself without importing the package that imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SurgeryError
from .base import PassResult
from .options import PassOptions, options_from_signature

__all__ = ["PassInfo", "get_pass", "list_passes", "register_pass"]


@dataclass(frozen=True)
class PassInfo:
    """A registered pass.

    Attributes:
        name: the keyword of ``convert()`` that enables it.
        fn: ``fn(gm, **options) -> PassResult``.
        order: passes run in ascending order.
        needs_shapes: run ``ShapeProp`` (``node.meta["tensor_meta"]``) before this pass.
        default: enabled when ``convert()`` is called without this keyword.
        options_class: the pass's frozen :class:`~fxsurgeon.passes.options.PassOptions` dataclass, the one
            place its options are declared and validated; derived from ``fn``'s keyword-only parameters when
            the pass registers none.
        replay: ``replay(recorded options, recorded rewrites of this pass, rebuilt original) -> options``
            that rebuild the same modules when a saved model is loaded (:func:`fxsurgeon.io.load`); None: the
            recorded options replay as they are (passes whose result the architecture alone determines).
    """

    name: str
    fn: Callable[..., PassResult]
    order: int
    needs_shapes: bool
    default: bool
    options_class: type[PassOptions] | None = None
    replay: Callable[[dict[str, Any], list[dict], Any], dict[str, Any]] | None = None

    def option_class(self) -> type[PassOptions]:
        """The options dataclass (derived from ``fn``'s signature, once, if none was registered)."""
        if self.options_class is None:
            object.__setattr__(self, "options_class", options_from_signature(self.name, self.fn))
        return self.options_class

    def options(self) -> dict[str, Any]:
        """Option name → default, in declaration order."""
        return self.option_class().defaults()

    def check_options(self, options: dict[str, Any], *, strict: bool = False) -> PassOptions:
        """Validate ``options`` through the options dataclass; returns the options object.

        Raises :class:`~fxsurgeon.passes.options.OptionError` (a ``SurgeryError``) for an unknown key, a flag
        that is not a bool (``"no"`` is truthy: it must not act as True), or a value the pass refuses.
        """
        return self.option_class().from_dict(options, strict=strict)


_PASSES: dict[str, PassInfo] = {}


def register_pass(
    name: str | None = None, *, order: int = 100, needs_shapes: bool = False, default: bool = False,
    options: type[PassOptions] | None = None, replay: Callable[..., dict[str, Any]] | None = None,
) -> Callable[[Callable[..., PassResult]], Callable[..., PassResult]]:
    """Decorator registering a pass function under ``name`` (default: the function's name).

    ``options`` is the pass's options dataclass and ``replay`` its replay hook (see :class:`PassInfo`).
    """
    if options is not None and not (isinstance(options, type) and issubclass(options, PassOptions)):
        raise SurgeryError(f"register_pass(options=...) takes a PassOptions dataclass, got {options!r}")

    def deco(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        key = name or fn.__name__
        _PASSES[key] = PassInfo(key, fn, order, needs_shapes, default, options, replay)
        return fn

    return deco


def get_pass(name: str) -> PassInfo:
    """The registered pass called ``name``; :class:`SurgeryError` listing the known ones otherwise."""
    try:
        return _PASSES[name]
    except KeyError:
        raise SurgeryError(f"no pass named {name!r}; known passes: {', '.join(list_passes())}") from None


def list_passes() -> list[str]:
    """Registered pass names in the order ``convert()`` runs them."""
    return [p.name for p in sorted(_PASSES.values(), key=lambda p: p.order)]
