"""Low-rank 1×1 convs: the ``"pw-pw"`` form, for the convs the spatial forms cannot touch.

A 1×1 conv (C_in → C_out) is a matrix product at every position. ``"pw-pw"`` replaces it by two: a 1×1
``reduce`` (C_in → r, carrying the stride, padding and padding mode) and a 1×1 ``pointwise`` (r → C_out,
carrying the bias), from the truncated SVD of its (C_out × C_in) matrix — by Eckart–Young the least squared
weight error of any rank-r pair, and exact once r reaches ``min(C_in, C_out)``. It saves MACs only below
``C_in·C_out / (C_in + C_out)`` (half the smaller width for a square conv), so it is for budgets, not for exact
rewrites.

In bottleneck networks the 1×1 convs carry most of the time (on timm resnet50 at batch 1 on a CPU the sixteen
3×3 convs are about a quarter of it), so a latency target far below 1 can only be met with them. The separable
pass rewrites them when ``kernel_sizes`` contains 1 — the default under ``target_latency`` with ``form="auto"``
— and only under a budget or with a rank in ``layers``; ``form="auto"`` gives 1×1 convs this form and k×k convs
the spatial ones (:func:`fxsurgeon.forms.base.applies`).

>>> from fxsurgeon.forms import get_form
>>> conv = nn.Conv2d(64, 32, 1, stride=2)
>>> block, details = get_form("pw-pw").build(conv, 32)
>>> details["exact"], [tuple(p.shape) for p in block.parameters()]
(True, [(32, 64, 1, 1), (32, 32, 1, 1), (32,)])
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError
from .base import LayerChoice, check_weight, register_form
from .dense import (
    balanced_svd,
    check_conv,
    check_rank,
    core_conv,
    finish_block,
    rank_grid,
    svd_tail_curve,
    with_error,
)

__all__ = ["LowRankConv2d", "PointwisePair", "pointwise_error_curve"]

#: ranks per layer that :meth:`PointwisePair.choices` lists (the error curve itself is exact and cheap)
CHOICE_POINTS = 48


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    """The (C_out × C_in) float64 matrix of a 1×1 conv weight, on the CPU."""
    return weight.detach().to(device="cpu", dtype=torch.float64).reshape(weight.shape[0], weight.shape[1])


def pointwise_error_curve(weight: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius error of the rank-r SVD of a 1×1 conv's matrix for r = 0 … min(C_out, C_in).

    >>> w = torch.randn(6, 4, 1, 1)
    >>> e = pointwise_error_curve(w)
    >>> len(e), float(e[-1]) < 1e-9, abs(float(e[0]) - float(w.double().pow(2).sum())) < 1e-9
    (5, True, True)
    """
    check_weight(weight, "pw-pw")
    return svd_tail_curve(_matrix(weight))


class LowRankConv2d(nn.Sequential):
    """1×1 ``reduce`` (C_in → r; the conv's stride, padding and padding mode) → 1×1 ``pointwise`` (r → C_out;
    the bias). The names are the ones the other forms' first and last convs have, so weighting, bias
    correction and calibration treat it like them."""

    def __init__(self, reduce: nn.Conv2d, pointwise: nn.Conv2d) -> None:
        super().__init__(OrderedDict(reduce=reduce, pointwise=pointwise))


@register_form
class PointwisePair:
    """A 1×1 conv → 1×1 (C_in → r) → 1×1 (r → C_out), from the truncated SVD of its matrix."""

    name = "pw-pw"
    pointwise = True  # rewrites 1×1 convs only (fxsurgeon.forms.base.applies)

    def full_rank(self, conv: nn.Conv2d) -> int:
        c_out, c_in = conv.weight.shape[:2]
        return min(c_out, c_in)

    def cost(self, conv: nn.Conv2d, rank: int) -> LayerChoice:
        # the first conv carries the stride, so both run at the output positions
        c_out, c_in = conv.weight.shape[:2]
        r = min(rank, self.full_rank(conv))
        n = r * (c_in + c_out)
        return LayerChoice(self.name, r, n, 0, n, float("nan"), r >= self.full_rank(conv))

    def error_at(self, conv: nn.Conv2d, ranks: list[int]) -> list[float]:
        """Squared Frobenius weight error at each rank (Eckart–Young: exactly what :meth:`build` gives)."""
        curve = pointwise_error_curve(conv.weight)
        return [float(curve[min(r, len(curve) - 1)]) for r in ranks]

    def choices(self, conv: nn.Conv2d, max_rank: int | None = None) -> list[LayerChoice]:
        top = min(max_rank or self.full_rank(conv), self.full_rank(conv))
        ranks = rank_grid(top, points=CHOICE_POINTS)
        return [with_error(self.cost(conv, r), e) for r, e in zip(ranks, self.error_at(conv, ranks))]

    def build(self, conv: nn.Conv2d, rank: int, init: str = "svd") -> tuple[nn.Module, dict[str, Any]]:
        check_conv(conv, "pw-pw")
        if tuple(conv.kernel_size) != (1, 1):
            raise SurgeryError(f"pw-pw: rewrites 1×1 convs only, got a {conv.kernel_size[0]}×{conv.kernel_size[1]} "
                               "kernel (the spatial forms dw-pw, pw-dw-pw, tucker2, spatial-svd take those)")
        rank = check_rank(rank, "pw-pw")
        if init not in ("svd", "random"):
            raise SurgeryError(f"pw-pw: init must be 'svd' or 'random', got {init!r}")
        c_out, c_in = conv.weight.shape[:2]
        r = min(rank, self.full_rank(conv))
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        reduce = core_conv(conv, c_in, r, (1, 1), conv.stride, conv.padding, conv.dilation, factory)
        pointwise = nn.Conv2d(r, c_out, 1, bias=conv.bias is not None, **factory)
        details: dict[str, Any] = {"full_rank": self.full_rank(conv)}
        if init == "svd":
            check_weight(conv.weight, "pw-pw")
            left, right, fit, exact = balanced_svd(_matrix(conv.weight), r)
            with torch.no_grad():
                reduce.weight.copy_(right.reshape(r, c_in, 1, 1).to(reduce.weight.dtype))
                pointwise.weight.copy_(left.reshape(c_out, r, 1, 1).to(pointwise.weight.dtype))
            details.update(fit)
            details["exact"] = r >= self.full_rank(conv) or exact
        else:
            details["exact"] = False
        block = LowRankConv2d(reduce, pointwise)
        finish_block(conv, block, pointwise)
        return block, details
