"""Uniform settings across separable forms: each layer gets the MACs of ``dw-pw`` at multiplier m.

``multiplier=m`` means "depthwise k×k with m filters per input channel, then 1×1" for ``dw-pw``. Other forms
have their own rank (the CP rank R for ``pw-dw-pw``), so a uniform multiplier is read as a MAC *allotment*:
each layer may spend what ``dw-pw`` at m would, and a form takes its largest rank that fits. ``form="auto"``
builds every registered form at its fitting rank and keeps the one whose weight approximation has the least
error — so it is never worse than any single form at that allotment. ``multiplier="full"`` asks for an exact
rewrite: every form at its exact rank, and ``auto`` keeps the one with the fewest MACs.

MACs count at the layer's real spatial sizes when ShapeProp saw the layer (``convert(example_inputs=...)``);
otherwise per output position, with a first 1×1 conv paying stride_h·stride_w positions per output position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from ..errors import SurgeryError
from ..forms.registry import FORMS, LayerChoice, conv_cost, forms_for, get_form

__all__ = ["Allotted", "allot", "check_form", "layer_positions", "macs_of", "rank_within"]


def layer_positions(gm: fx.GraphModule, names: list[str], conv: nn.Conv2d) -> tuple[int, int, bool]:
    """(input H·W, output H·W, measured) for the conv called as any of ``names``.

    From ShapeProp's ``tensor_meta`` on its call_module node and that node's input when present
    (``measured=True``); otherwise ``(stride_h·stride_w, 1, False)``: costs per output position.
    """
    for node in gm.graph.nodes:
        if node.op != "call_module" or str(node.target) not in names:
            continue
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        mi = src.meta.get("tensor_meta") if src is not None else None
        mo = node.meta.get("tensor_meta")
        if hasattr(mi, "shape") and hasattr(mo, "shape") and len(mi.shape) == 4 and len(mo.shape) == 4:
            return int(mi.shape[2] * mi.shape[3]), int(mo.shape[2] * mo.shape[3]), True
        break
    sh, sw = conv.stride
    return sh * sw, 1, False


def rank_within(form: Any, conv: nn.Conv2d, macs: float, positions_in: int, positions_out: int) -> int:
    """Largest rank of ``form`` whose MACs at these positions stay within ``macs`` (0: none fits).

    >>> conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    >>> rank_within(get_form("pw-dw-pw"), conv, 3 * 16 * (9 + 16), 1, 1)  # dw-pw at m=3: 1,200 MACs
    29
    """
    lo, hi = 0, form.full_rank(conv)
    while lo < hi:  # cost grows with rank: bisect
        mid = (lo + hi + 1) // 2
        if form.cost(conv, mid).macs(positions_in, positions_out) <= macs:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Allotted:
    """What :func:`allot` chose for one layer: the form, its rank, the module built and its details."""

    form: str
    rank: int
    module: nn.Module
    details: dict[str, Any]
    considered: dict[str, dict[str, Any]] = field(default_factory=dict)


def _squared_error(details: dict[str, Any]) -> float:
    if details.get("exact"):
        return 0.0
    err = details.get("discarded_energy")
    return float(err) if err is not None else math.inf


def allot(
    conv: nn.Conv2d,
    form: str,
    multiplier: int | str | None,
    positions_in: int,
    positions_out: int,
    *,
    init: str = "svd",
) -> Allotted | None:
    """Form and rank for one layer under a uniform ``multiplier`` (see the module docstring), built.

    Args:
        conv: the conv to decompose (possibly importance-scaled by the caller).
        form: a registered form, or ``"auto"`` for every registered form.
        multiplier: m (default 1) or ``"full"``.
        positions_in / positions_out: the conv's input and output H·W (see :func:`layer_positions`).
        init: passed to the forms' ``build``.

    Returns:
        The choice, or None when no rank of the form fits the allotment (the caller skips the layer).

    >>> conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    >>> a = allot(conv, "auto", 2, 64, 64)
    >>> a.form in ("dw-pw", "pw-dw-pw"), sorted(a.considered)
    (True, ['dw-pw', 'pw-dw-pw'])
    """
    names = forms_for(form, conv)
    forms = [get_form(n) for n in names]
    base = get_form("dw-pw")
    full = multiplier == "full"
    m = base.full_rank(conv) if full else min(int(multiplier or 1), base.full_rank(conv))
    allotment = base.cost(conv, m).macs(positions_in, positions_out)
    best: tuple[tuple, Allotted] | None = None
    considered: dict[str, dict[str, Any]] = {}
    for name, impl in zip(names, forms):
        if full:
            rank = impl.full_rank(conv)
        elif name == "dw-pw":
            rank = m
        else:
            rank = rank_within(impl, conv, allotment, positions_in, positions_out)
        if rank < 1:
            considered[name] = {"rank": 0, "note": "no rank fits the allotment"}
            continue
        choice: LayerChoice = impl.cost(conv, rank)
        macs = choice.macs(positions_in, positions_out)
        module, details = impl.build(conv, rank, init=init)
        err = _squared_error(details) if init == "svd" else math.nan
        considered[name] = {"rank": rank, "macs": macs, "discarded_energy": err,
                            "relative_error": details.get("relative_error")}
        # auto: least error; with "full" (all exact) or random init, fewest MACs; ties go to the listed order
        key = (macs, 0.0) if full or init != "svd" else (err, macs)
        if best is None or key < best[0]:
            best = (key, Allotted(name, rank, module, details))
    if best is None:
        return None
    out = best[1]
    out.considered = considered if form == "auto" else {}
    return out


def macs_of(conv: nn.Conv2d, choice: LayerChoice, positions_in: int, positions_out: int) -> tuple[int, int]:
    """(original conv MACs, replacement MACs) at these positions."""
    return conv_cost(conv).macs(positions_in, positions_out), choice.macs(positions_in, positions_out)


def check_form(form: str) -> None:
    """``"auto"`` or a registered form; a :class:`SurgeryError` naming the known ones otherwise."""
    if form != "auto":
        try:
            get_form(form)
        except SurgeryError:
            raise SurgeryError(
                f"separable: unknown form {form!r}; known: 'auto', {', '.join(repr(f) for f in sorted(FORMS))}"
            ) from None
