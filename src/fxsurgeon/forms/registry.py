"""Separable forms: the shapes a k×k conv can be rewritten into, each with its cost and error per rank.

A form is registered by name (``"dw-pw"`` here; ``"pw-dw-pw"`` in :mod:`fxsurgeon.forms.cp`) and answers two
questions for one conv: what every rank would cost and lose (:meth:`Form.choices`, data-free, from the
weight alone), and the module for one rank (:meth:`Form.build`). The separable pass, budget allocation and
save/load replay all go through this table, so a new form needs no change to them. The table and the protocol
live in :mod:`fxsurgeon.forms.base`; this module re-exports them and registers every built-in form.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..modules import make_separable
from .base import (
    FORMS,
    Form,
    LayerChoice,
    applies,
    auto_forms,
    conv_cost,
    default_form,
    forms_for,
    get_form,
    is_pointwise,
    layer_form,
    register_form,
)
from .decompose import separable_error_curve

__all__ = ["FORMS", "Form", "LayerChoice", "applies", "auto_forms", "conv_cost", "default_form", "forms_for",
           "get_form", "is_pointwise", "layer_form", "register_form"]


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



# The CP and dense forms register themselves (in forms.base's table) on import; last, so that FORMS keeps
# dw-pw first, as it always has.
from . import cp as _cp  # noqa: E402, F401
from . import dense as _dense  # noqa: E402, F401
from . import pointwise as _pointwise  # noqa: E402, F401
