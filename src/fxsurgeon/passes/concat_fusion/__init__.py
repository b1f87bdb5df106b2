"""Concat fusion pass: a 1×1 fusion conv after channel concatenation, exact or channel-reducing.

Matches ``torch.cat`` / ``torch.concat`` / ``torch.concatenate`` (and ``aten.cat``) nodes of two or more
tensors along the channel axis of 4-D tensors (``dim=1`` or ``dim=-3``, read from ``ShapeProp`` shapes):
U-Net skip connections, DenseNet layers, Inception/GoogLeNet branches, CSP/DLA/VoVNet aggregation, FPN fusion.
Every other concat is accounted for as a skip with its reason.

* ``mode="identity"`` (default): ``Conv2d(C, C, 1, bias=False)`` initialised to the identity right after the
  concat. Exact for finite activations (an ±Inf channel turns every output channel NaN, 0·Inf; the record's
  ``details["exact_for"]`` says so and verification flags it); it adds C² parameters and C²·H·W MACs per sample (in the record), a trainable mixing point.
* ``mode="reduce"`` (``out_channels=`` or ``ratio=``): walks forward from the concat through ops that act on
  each channel alone (BatchNorm, activations, dropout, pooling, upsampling, spatial padding, reshapes of
  1×1 maps) to the first channel-mixing consumers (``Conv2d`` with ``groups=1``, ``Linear``), and puts a
  ``Conv2d(C, r, 1, bias=False)`` right before them (after the per-channel ops: channel mixing does not
  commute with a per-channel nonlinearity), narrowing the consumers to r input channels. Weights come from
  :func:`fxsurgeon.forms.fusion_math.fusion_factors`: a truncated SVD of the consumers' stacked weights (exact when
  r reaches its rank; otherwise the discarded energy is recorded), or, with ``calibration=`` batches, the
  subspace that keeps the most of the consumers' output on that data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.fx as fx

from ...graph.ops import (
    CONCAT_FUNCTIONS,
)
from ..base import PassResult
from ..options import OptionError, PassOptions
from ..registry import register_pass
from .build import identity_fusions, reduce_concats
from .match import Concat, find_concats
from .moments import second_moments
from .walk import FusionSite

__all__ = [
    "CONCAT_FUNCTIONS", "Concat", "ConcatFusionOptions", "FusionSite", "concat_fusion", "find_concats",
    "second_moments",
]


def _check_options(mode: str, out_channels: Any, ratio: Any, force: bool) -> None:
    if not isinstance(mode, str) or mode not in ("identity", "reduce"):
        raise OptionError(f"concat_fusion: mode must be 'identity' or 'reduce', got {mode!r}")
    if not isinstance(force, bool):
        raise OptionError(f"concat_fusion: force must be True or False, got {force!r}")
    if mode == "identity":
        given = [k for k, v in (("out_channels", out_channels), ("ratio", ratio)) if v is not None]
        if given or force:
            raise OptionError(
                f"concat_fusion: {', '.join(given) or 'force'} only applies to mode='reduce' "
                "(identity mode keeps every channel)"
            )
        return
    if not isinstance(force, bool):
        raise OptionError(f"concat_fusion: force must be True or False, got {force!r}")
    if (out_channels is None) == (ratio is None):
        raise OptionError("concat_fusion: mode='reduce' needs exactly one of out_channels= or ratio=")
    if out_channels is not None and (isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1):
        raise OptionError(f"concat_fusion: out_channels must be an int >= 1, got {out_channels!r}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
        raise OptionError(f"concat_fusion: ratio must be a number in (0, 1], got {ratio!r}")


@dataclass(frozen=True)
class ConcatFusionOptions(PassOptions):
    """Options of the :func:`concat_fusion` pass (frozen; build one with keywords or :meth:`from_dict`).

    Attributes:
        mode: ``"identity"``: ``Conv2d(C, C, 1, bias=False)`` set to the identity after the concat (exact,
            C²·H·W more MACs per sample). ``"reduce"``: ``Conv2d(C, r, 1, bias=False)`` before the concat's
            first channel-mixing consumers, which are narrowed to r input channels.
        out_channels: r for every concat (``mode="reduce"``); concats with C ≤ r are skipped.
        ratio: instead, r = round(ratio·C) per concat.
        calibration: input batches for the whole model (an iterable of tensors or tuples of positional inputs;
            a single tensor is one batch). With them, ``reduce`` keeps the subspace that preserves the
            consumers' output on that data instead of their weights. ``convert(calibration=...)`` fills this
            in unless the pass options set it (``calibration=None`` there forces data-free weights).
            Identity mode ignores it.
        force: reduce even where the fusion conv plus the narrowed consumers cost as many MACs as before or
            more (skipped by default, with the figures).
        exclude: fnmatch patterns of concats to leave alone, matched against the record target
            (``"<module>:<node>"``), the enclosing module's name and the node name.
    """

    pass_name: ClassVar[str] = "concat_fusion"

    mode: str = "identity"
    out_channels: int | None = None
    ratio: float | None = None
    calibration: Any = None
    force: bool = False
    exclude: Iterable[str] | None = None

    def validate(self) -> None:
        _check_options(self.mode, self.out_channels, self.ratio, self.force)
        exclude = self.exclude
        if isinstance(exclude, str):
            exclude = [exclude]
        if exclude is not None and not isinstance(exclude, Iterable):
            raise OptionError(f"concat_fusion: exclude must be a list of fnmatch patterns, got {exclude!r}",
                              key="exclude")
        exclude = list(exclude or ())
        for i, pattern in enumerate(exclude):
            if not isinstance(pattern, str):
                raise OptionError(f"concat_fusion: exclude[{i}] must be a string (an fnmatch pattern of qualified "
                                  f"names), got {type(pattern).__name__}: {pattern!r}", key="exclude")
        object.__setattr__(self, "exclude", exclude)


@register_pass(order=200, needs_shapes=True, default=False, options=ConcatFusionOptions)
def concat_fusion(gm: fx.GraphModule, options: ConcatFusionOptions | None = None, /, **kwargs: Any) -> PassResult:
    """Add a 1×1 fusion conv after every channel concatenation: exact identity, or channel-reducing.

    Needs ``ShapeProp`` shapes (``convert(..., example_inputs=...)``). Off by default: identity mode adds cost.

    Args:
        gm: the traced model, edited in place.
        options: a :class:`ConcatFusionOptions`, or its fields as keyword arguments (not both).

    Returns:
        A :class:`PassResult`. Rewrites name the concat (``"<module>:<node>"``); their details carry the new
        module(s), channels, MACs and parameters per sample before/after (identity: ``added_macs``,
        ``added_params``) and, for ``reduce``, each fusion site's rank, discarded energy and relative error.

    >>> import torch, torch.nn as nn
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> class Fuse(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.mix = nn.Conv2d(96, 48, 1)
    ...     def forward(self, a, b):
    ...         return self.mix(torch.cat([a, b], 1))
    >>> gm = torch.fx.symbolic_trace(Fuse())
    >>> _ = ShapeProp(gm).propagate(torch.randn(1, 32, 16, 16), torch.randn(1, 64, 16, 16))
    >>> res = concat_fusion(gm)
    >>> res.rewrites[0].exact, res.rewrites[0].details["added_params"]
    (True, 9216)
    """
    o = ConcatFusionOptions.coerce(options, kwargs)
    mode, out_channels, ratio, calibration, force, exclude = (o.mode, o.out_channels, o.ratio, o.calibration,
                                                              o.force, o.exclude)
    concats, skipped = find_concats(gm, exclude=exclude or ())
    if mode == "identity":
        return identity_fusions(gm, concats, skipped)
    return reduce_concats(gm, concats, skipped, out_channels, ratio, calibration, force)
