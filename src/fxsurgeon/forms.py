"""Separable forms: the shapes a k×k conv can be rewritten into, each with its cost and error per rank.

A form is registered by name (``"dw-pw"`` here; ``"pw-dw-pw"`` in :mod:`fxsurgeon.cp`) and answers two
questions for one conv: what every rank would cost and lose (:meth:`Form.choices`, data-free, from the
weight alone), and the module for one rank (:meth:`Form.build`). The separable pass, budget allocation and
save/load replay all go through this table, so a new form needs no change to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from .decompose import separable_error_curve
from .errors import SurgeryError
from .modules import make_separable

__all__ = ["FORMS", "Form", "LayerChoice", "auto_forms", "get_form", "register_form"]


@dataclass(frozen=True)
class LayerChoice:
    """One way to rewrite one conv.

    Attributes:
        form: registered form name.
        rank: the form's size knob (channel multiplier m for ``dw-pw``, CP rank R for ``pw-dw-pw``).
        params: weight parameters of the replacement (bias excluded).
        macs_in: MACs per *input* spatial position (a pointwise conv that runs before the stride).
        macs_out: MACs per *output* spatial position.
        error: squared Frobenius error of the weight approximation, data-free (``nan`` if unknown).
        exact: the replacement computes the same function (up to float rounding).
    """

    form: str
    rank: int
    params: int
    macs_in: int
    macs_out: int
    error: float
    exact: bool
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def macs(self, positions_in: int, positions_out: int) -> int:
        """MACs (fvcore's "flops": one multiply-add each) at the given input/output spatial sizes (H·W)."""
        return self.macs_in * positions_in + self.macs_out * positions_out


def conv_cost(conv: nn.Conv2d) -> LayerChoice:
    """The original conv as a choice: its weights and MACs per output position, zero error."""
    c_out, c_in_g, kh, kw = conv.weight.shape
    n = c_out * c_in_g * kh * kw
    return LayerChoice("original", 0, n, 0, n, 0.0, True)


class Form(Protocol):
    name: str

    def full_rank(self, conv: nn.Conv2d) -> int:
        """The rank at which the form is exact (or the form's natural cap)."""
        ...

    def cost(self, conv: nn.Conv2d, rank: int) -> LayerChoice:
        """Cost at ``rank`` without computing the error (``error`` is ``nan``)."""
        ...

    def choices(self, conv: nn.Conv2d, max_rank: int | None = None) -> list[LayerChoice]:
        """Every rank 1 … max_rank (form's default cap when None) with its cost and data-free error."""
        ...

    def build(self, conv: nn.Conv2d, rank: int, init: str = "svd") -> tuple[nn.Module, dict[str, Any]]:
        """The replacement module at ``rank`` and record details; ``details["exact"]`` says if it is exact."""
        ...


FORMS: dict[str, Form] = {}


def register_form(cls: type) -> type:
    """Class decorator: instantiate and register a form under ``cls.name``."""
    FORMS[cls.name] = cls()
    return cls


def auto_forms(latency: bool = False) -> list[str]:
    """The forms ``form="auto"`` chooses among: every registered form under a latency target, else those
    meant to compete on MACs (a form with ``in_mac_auto = False``, such as the dense low-rank ones of
    :mod:`fxsurgeon.forms_dense`, is there for speed and joins only when speed is measured).

    >>> auto_forms()
    ['dw-pw', 'pw-dw-pw']
    """
    return sorted(n for n, f in FORMS.items() if latency or getattr(f, "in_mac_auto", True))


def get_form(name: str) -> Form:
    try:
        return FORMS[name]
    except KeyError:
        raise SurgeryError(f"unknown separable form {name!r}; known: {', '.join(sorted(FORMS))}") from None


@register_form
class DepthwisePointwise:
    """Depthwise k×k with channel multiplier m, then pointwise 1×1 (per-input-channel SVD init)."""

    name = "dw-pw"
    rank_is_channels = False  # the rank multiplies C_in: hardware-friendly multiples do not apply to it

    def full_rank(self, conv: nn.Conv2d) -> int:
        c_out, _, kh, kw = conv.weight.shape
        return min(c_out, kh * kw)

    def cost(self, conv: nn.Conv2d, rank: int) -> LayerChoice:
        c_out, c_in, kh, kw = conv.weight.shape
        m = min(rank, self.full_rank(conv))
        per_out = c_in * m * (kh * kw + c_out)
        return LayerChoice(self.name, m, per_out, 0, per_out, float("nan"), m >= self.full_rank(conv))

    def choices(self, conv: nn.Conv2d, max_rank: int | None = None) -> list[LayerChoice]:
        full = self.full_rank(conv)
        curve = separable_error_curve(conv.weight)
        top = min(max_rank or full, full)
        out = []
        for m in range(1, top + 1):
            c = self.cost(conv, m)
            out.append(LayerChoice(c.form, m, c.params, c.macs_in, c.macs_out, float(curve[m]), c.exact))
        return out

    def error_at(self, conv: nn.Conv2d, ranks: list[int]) -> list[float]:
        """Squared Frobenius weight error at each rank (the exact per-channel SVD curve)."""
        curve = separable_error_curve(conv.weight)
        return [float(curve[min(r, len(curve) - 1)]) for r in ranks]

    def build(self, conv: nn.Conv2d, rank: int, init: str = "svd") -> tuple[nn.Module, dict[str, Any]]:
        sep, factors = make_separable(conv, rank, init=init)
        full = self.full_rank(conv)
        details: dict[str, Any] = {"multiplier": sep.multiplier, "full_rank": full}
        details["exact"] = factors is not None and (
            sep.multiplier >= full or factors.discarded_energy <= 1e-12 * (factors.kept_energy + 1e-300)
        )
        if factors is not None:
            details["relative_error"] = factors.relative_error
            details["discarded_energy"] = factors.discarded_energy
        return sep, details



# The CP and dense forms register themselves on import; they need the table above, so they come last.
from . import cp as _cp  # noqa: E402, F401
from . import forms_dense as _dense  # noqa: E402, F401
