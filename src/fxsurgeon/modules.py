"""Modules that fxsurgeon's rewrites emit, with the pure builders that make them from existing layers."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .forms.decompose import SeparableFactors, separable_factors

__all__ = ["SeparableConv2d", "depthwise_conv_class", "make_separable"]


class SeparableConv2d(nn.Sequential):
    """Depthwise k×k (channel multiplier m) followed by pointwise 1×1: the MobileNet block's conv part.

    A plain ``nn.Sequential`` with named children (``depthwise``, ``pointwise``, and ``reduce`` first for the
    pointwise → depthwise → pointwise form), so ``state_dict`` keys read ``layer1.0.conv1.depthwise.weight``
    and tracing, export and fvcore see two ordinary convs.
    """

    def __init__(self, depthwise: nn.Conv2d, pointwise: nn.Conv2d, reduce: nn.Conv2d | None = None) -> None:
        parts: OrderedDict[str, nn.Module] = OrderedDict()
        if reduce is not None:
            parts["reduce"] = reduce
        parts["depthwise"] = depthwise
        parts["pointwise"] = pointwise
        super().__init__(parts)

    @property
    def multiplier(self) -> int:
        dw = self.depthwise
        return dw.out_channels // dw.in_channels


def depthwise_conv_class(conv: nn.Conv2d) -> type[nn.Conv2d] | None:
    """The conv class to build the depthwise half with, or None when ``conv``'s forward is not a plain conv.

    Subclasses that only change construction behave like ``nn.Conv2d``. timm's ``Conv2dSame`` pads the input
    dynamically before an ordinary conv; the same padding rule is right for the depthwise half, so it is
    reused. Anything else that overrides ``forward`` (weight standardisation, QAT fake-quant, ...) computes
    something a plain pair would not, so it is refused.
    """
    cls = type(conv)
    if cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward:
        return cls if cls is nn.Conv2d else nn.Conv2d
    if cls.__name__ == "Conv2dSame" and cls.__module__.startswith("timm."):
        return cls
    return None


def make_separable(
    conv: nn.Conv2d, multiplier: int, init: str = "svd"
) -> tuple[SeparableConv2d, SeparableFactors | None]:
    """Build the depthwise + pointwise replacement for a groups=1 k×k ``conv``.

    The depthwise conv carries stride, padding (including ``"same"``), dilation and ``padding_mode``; the
    pointwise conv carries the bias. With ``init="svd"`` the weights come from :func:`separable_factors`
    (exact at ``multiplier >= min(C_out, k²)``); with ``init="random"`` both convs keep PyTorch's default
    initialisation, for training from scratch.

    >>> sep, f = make_separable(nn.Conv2d(32, 64, 3, padding=1, bias=False), 1)
    >>> sum(p.numel() for p in sep.parameters())
    2336
    """
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    cls = depthwise_conv_class(conv)
    if cls is None:
        raise TypeError(f"{type(conv).__qualname__} overrides forward; cannot be split into plain convs")
    c_out, c_in, kh, kw = conv.weight.shape
    factors = separable_factors(conv.weight, multiplier) if init == "svd" else None
    m = factors.multiplier if factors is not None else min(multiplier, c_out, kh * kw)
    factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    if factors is not None and not conv.weight.is_meta:
        # the weights are overwritten below: build on the meta device and skip PyTorch's random init
        factory = {"device": "meta", "dtype": conv.weight.dtype}
    if cls is nn.Conv2d:
        dw = nn.Conv2d(
            c_in, c_in * m, (kh, kw), stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            groups=c_in, bias=False, padding_mode=conv.padding_mode, **factory,
        )
    else:  # timm Conv2dSame: pads in forward, takes no factory kwargs
        dw = cls(c_in, c_in * m, (kh, kw), stride=conv.stride, dilation=conv.dilation, groups=c_in, bias=False)
        dw = dw.to(**factory)
    pw = nn.Conv2d(c_in * m, c_out, 1, bias=conv.bias is not None, **factory)
    if factory["device"] == "meta":
        dw, pw = dw.to_empty(device=conv.weight.device), pw.to_empty(device=conv.weight.device)
    with torch.no_grad():
        if factors is not None:
            dw.weight.copy_(factors.depthwise)
            pw.weight.copy_(factors.pointwise)
        if conv.bias is not None:
            pw.bias.copy_(conv.bias)
    for p_new in (*dw.parameters(), *pw.parameters()):
        p_new.requires_grad_(conv.weight.requires_grad)
    sep = SeparableConv2d(dw, pw)
    sep.train(conv.training)
    return sep, factors
