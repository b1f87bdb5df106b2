"""The pass registry itself: :class:`PassInfo`, :func:`register_pass`, :func:`get_pass`, :func:`list_passes`.

Kept apart from ``fxsurgeon.passes`` (which re-exports it and imports the built-in passes so they register) so
that a pass module registers itself without importing the package that imports it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SurgeryError
from .base import PassResult

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
    """

    name: str
    fn: Callable[..., PassResult]
    order: int
    needs_shapes: bool
    default: bool

    def options(self) -> dict[str, Any]:
        """Keyword options and their defaults, from the function's signature."""
        sig = inspect.signature(self.fn)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def check_options(self, options: dict[str, Any]) -> None:
        """Unknown keys, and flags (options annotated ``bool``) given anything but a bool (``"no"`` is truthy: it
        must not act as True)."""
        allowed = self.options()
        flags = {p.name for p in inspect.signature(self.fn).parameters.values() if p.annotation in ("bool", bool)}
        for key in options:
            if key not in allowed:
                raise SurgeryError(
                    f"unknown option {key!r} for pass {self.name!r}; allowed: {', '.join(sorted(allowed))}"
                )
            if key in flags and not isinstance(options[key], bool):
                raise SurgeryError(f"{self.name}: {key} must be True or False, got "
                                   f"{type(options[key]).__name__}: {options[key]!r}")


_PASSES: dict[str, PassInfo] = {}


def register_pass(
    name: str | None = None, *, order: int = 100, needs_shapes: bool = False, default: bool = False
) -> Callable[[Callable[..., PassResult]], Callable[..., PassResult]]:
    """Decorator registering a pass function under ``name`` (default: the function's name)."""

    def deco(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        key = name or fn.__name__
        _PASSES[key] = PassInfo(key, fn, order, needs_shapes, default)
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
