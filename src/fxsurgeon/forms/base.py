"""The table of separable forms and what a form answers: :class:`LayerChoice`, the :class:`Form` protocol,
:data:`FORMS` with :func:`register_form` / :func:`get_form` / :func:`auto_forms`.

Kept apart from :mod:`fxsurgeon.forms` (which re-exports all of it and defines ``dw-pw``) so that the forms of
:mod:`fxsurgeon.forms.cp` and :mod:`fxsurgeon.forms.dense` register themselves without importing the module that
imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import SurgeryError

__all__ = ["FORMS", "Form", "LayerChoice", "applies", "auto_forms", "check_weight", "conv_cost", "default_form",
           "forms_for", "get_form", "is_pointwise", "layer_form", "register_form"]


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
    """What a registered form answers for one conv. Optional class attributes: ``pointwise = True`` for a form
    that rewrites 1×1 convs only (the others take k×k convs, :func:`applies`); ``in_mac_auto = False`` for one
    that joins ``form="auto"`` only under a latency target; ``rank_is_channels = False`` when the rank is not
    a channel count (no hardware multiples for it)."""

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


def check_weight(weight: torch.Tensor, what: str) -> None:
    """A :class:`SurgeryError` naming ``what`` (the form) unless ``weight`` is a 4-D conv weight with real, finite
    values: every form decomposes the numbers, so the meta device and NaN are refused before any work."""
    if weight.dim() != 4:
        raise SurgeryError(f"{what}: expected a 4-D conv weight (C_out, C_in, kh, kw), got shape {tuple(weight.shape)}")
    if weight.is_meta:
        raise SurgeryError(f"{what}: the conv weight is on the meta device and cannot be decomposed; load the "
                           "weights first, or convert with init='random' for the structure only")
    if not torch.isfinite(weight).all():
        raise SurgeryError(f"{what}: the conv weight has NaN or infinite values: it cannot be decomposed")


def register_form(cls: type) -> type:
    """Class decorator: instantiate and register a form under ``cls.name``."""
    FORMS[cls.name] = cls()
    return cls


def is_pointwise(conv: nn.Conv2d) -> bool:
    """A 1×1 conv: nothing spatial to separate; only the ``pointwise`` forms (``"pw-pw"``) rewrite it."""
    return tuple(conv.kernel_size) == (1, 1)


def applies(name: str, conv: nn.Conv2d) -> bool:
    """Form ``name`` can rewrite ``conv``: a form with ``pointwise = True`` takes 1×1 convs only, the others
    take k×k convs with k > 1 only.

    >>> applies("dw-pw", nn.Conv2d(8, 8, 3)), applies("dw-pw", nn.Conv2d(8, 8, 1)), applies("pw-pw", nn.Conv2d(8, 8, 1))
    (True, False, True)
    """
    return bool(getattr(get_form(name), "pointwise", False)) == is_pointwise(conv)


def auto_forms(latency: bool = False, pointwise: bool | None = False) -> list[str]:
    """The forms ``form="auto"`` chooses among: every registered form under a latency target, else those
    meant to compete on MACs (a form with ``in_mac_auto = False``, such as the dense low-rank ones of
    :mod:`fxsurgeon.forms.dense`, is there for speed and joins only when speed is measured).

    ``pointwise`` picks the forms for k×k convs (False), for 1×1 convs (True, :func:`applies`) or both (None).

    >>> auto_forms(), auto_forms(pointwise=True)
    (['dw-pw', 'pw-dw-pw'], ['pw-pw'])
    """
    names = sorted(n for n, f in FORMS.items() if latency or getattr(f, "in_mac_auto", True))
    if pointwise is None:
        return names
    return [n for n in names if bool(getattr(FORMS[n], "pointwise", False)) == pointwise]


def forms_for(form: str, conv: nn.Conv2d, latency: bool = False) -> list[str]:
    """The forms that may rewrite ``conv`` when the pass asks for ``form`` (``"auto"`` or a name): for a name
    that cannot (a spatial form on a 1×1 conv, ``"pw-pw"`` on a k×k one), none."""
    if form == "auto":
        return auto_forms(latency, pointwise=is_pointwise(conv))
    return [form] if applies(form, conv) else []


def default_form(form: str, conv: nn.Conv2d, latency: bool = False) -> str:
    """The form of a layer whose settings name none: ``form``, or for ``"auto"`` the first that applies."""
    names = forms_for(form, conv, latency) if form == "auto" else [form]
    return names[0] if names else form


def layer_form(spec: Any, form: str, conv: nn.Conv2d, latency: bool = False) -> str:
    """The form of a layer set by ``layers={name: spec}``: the spec's ``"form"``, else :func:`default_form`.

    >>> layer_form({"rank": 2, "form": "tucker2"}, "auto", nn.Conv2d(4, 4, 3)), layer_form({"rank": 2}, "auto", nn.Conv2d(4, 4, 1))
    ('tucker2', 'pw-pw')
    """
    return str(spec["form"]) if isinstance(spec, dict) and "form" in spec else default_form(form, conv, latency)


def get_form(name: str) -> Form:
    try:
        return FORMS[name]
    except KeyError:
        raise SurgeryError(f"unknown separable form {name!r}; known: {', '.join(sorted(FORMS))}") from None
