"""Dense low-rank forms: rewrites that run on fast GEMM / dense-conv kernels instead of depthwise ones.

Depthwise convs do little arithmetic per byte moved, so on CPUs and tensor-core GPUs a depthwise + pointwise
pair often runs *slower* than the dense k×k conv it replaces, whatever its MAC count. These two forms keep
every conv dense:

* ``"tucker2"`` — 1×1 (C_in → r) → dense k×k core (r → r) → 1×1 (r → C_out), from a Tucker-2 decomposition
  of the weight along its two channel modes (Kim et al., ICLR 2016): HOSVD, then a few HOOI sweeps. Rank r
  caps both channel ranks: ``(min(r, C_out), min(r, C_in))``; exact once r reaches ``max(C_in, C_out)``.
* ``"spatial-svd"`` — k×1 (C_in → r) → 1×k (r → C_out), from the SVD of the weight reshaped to
  ``(C_in·kh) × (C_out·kw)`` (Jaderberg et al., BMVC 2014, scheme 2; AIMET's spatial SVD); exact once r
  reaches ``min(C_in·kh, C_out·kw)``.

Both are plain ``nn.Sequential`` blocks of ordinary convs ending in a groups=1 conv, so calibration refits
their last conv and fvcore, tracing and ONNX export see ordinary convs. A 1×1 conv without bias commutes with
every padding mode, and a k×1 conv acts on each column separately, so both are exact at full rank for any
stride, padding (``"same"`` too), dilation and padding mode. They join ``form="auto"`` only under a latency
target (``target_latency``), where speed is what is measured; by name they work with every option.

>>> from fxsurgeon.forms import get_form
>>> conv = nn.Conv2d(16, 24, 3, padding=1, bias=False)
>>> block, details = get_form("tucker2").build(conv, 24)
>>> details["exact"], [tuple(p.shape) for p in block.parameters()]
(True, [(16, 16, 1, 1), (24, 16, 3, 3), (24, 24, 1, 1)])
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError
from ..modules import depthwise_conv_class
from .base import LayerChoice, check_weight, register_form

__all__ = [
    "SpatialSVD",
    "SpatialSeparableConv2d",
    "Tucker2",
    "TuckerConv2d",
    "TuckerFactors",
    "balanced_svd",
    "rank_grid",
    "spatial_svd_error_curve",
    "svd_tail_curve",
    "tucker2_error_table",
    "tucker2_factors",
]

#: HOOI sweeps after the HOSVD start: each never raises the error; two take most of the gain
HOOI_SWEEPS = 2
#: ranks per layer that the dense forms' :meth:`choices` list (any rank can still be asked for by name)
CHOICE_POINTS = 12


def check_rank(rank: Any, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SurgeryError(f"{what}: rank must be an int >= 1, got {rank!r}")
    return rank


def rank_grid(top: int, points: int = CHOICE_POINTS, multiple: int = 1) -> list[int]:
    """At most ``points`` ranks in 1 … ``top``, evenly spaced, the largest included.

    With ``multiple`` > 1 and ``top`` ≥ ``multiple``, only multiples of it (``top`` rounded down): channel
    counts that fill the SIMD lanes or tensor-core tiles.

    >>> rank_grid(64, points=5), rank_grid(64, points=5, multiple=8), rank_grid(5, points=8)
    ([1, 17, 33, 48, 64], [8, 24, 40, 48, 64], [1, 2, 3, 4, 5])
    """
    if top < 1:
        return []
    if multiple > 1 and top >= multiple:
        steps = list(range(multiple, top + 1, multiple))
        if len(steps) > points:
            idx = {round(i * (len(steps) - 1) / (points - 1)) for i in range(points)}
            steps = [steps[i] for i in sorted(idx)]
        return steps
    if top <= points:
        return list(range(1, top + 1))
    step = (top - 1) / (points - 1)
    return sorted({1 + round(i * step) for i in range(points)})


def tucker2_error_table(weight: torch.Tensor) -> torch.Tensor:
    """Squared error of the truncated HOSVD at every (r_out, r_in): ``E[r_out, r_in]``, shape (C_out+1, C_in+1).

    One eigen-decomposition per channel mode gives every rank at once: with orthonormal factors the error is
    ``||W||² − ||U_outᵀ W U_in||²``, and the full rotation's core, summed cumulatively, gives that for every
    truncation. HOOI (what :meth:`Tucker2.build` adds) only lowers it: these are upper bounds.

    >>> e = tucker2_error_table(torch.randn(6, 4, 3, 3))
    >>> e.shape, float(e[-1, -1]) < 1e-9, bool((e[:, 1:] <= e[:, :-1] + 1e-9).all())
    (torch.Size([7, 5]), True, True)
    """
    check_weight(weight, "tucker2")
    c_out, c_in = weight.shape[:2]
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    u_in = _top_eigvecs(w.transpose(0, 1).reshape(c_in, -1), c_in)
    u_out = _top_eigvecs(w.reshape(c_out, -1), c_out)
    energy = torch.einsum("oikl,os,ir->srkl", w, u_out, u_in).pow(2).sum((2, 3))  # (C_out, C_in)
    kept = torch.zeros(c_out + 1, c_in + 1, dtype=torch.float64)
    kept[1:, 1:] = energy.cumsum(0).cumsum(1)
    return (float(w.pow(2).sum()) - kept).clamp_min(0)


def _top_eigvecs(a: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` leading left singular vectors of ``a`` (float64), from the eigen-decomposition of a aᵀ."""
    _, evecs = torch.linalg.eigh(a @ a.T)
    return evecs.flip(-1)[:, :r]


# ---------------------------------------------------------------------------------------------- Tucker-2


@dataclass(frozen=True)
class TuckerFactors:
    """Weights of 1×1 → k×k → 1×1 approximating one conv weight.

    Attributes:
        reduce: (r_in, C_in, 1, 1), orthonormal rows.
        core: (r_out, r_in, kh, kw).
        pointwise: (C_out, r_out, 1, 1), orthonormal columns.
        error: squared Frobenius error ||W − Ŵ||² (= ||W||² − ||core||², the factors being orthonormal).
        norm2: ||W||².
    """

    reduce: torch.Tensor
    core: torch.Tensor
    pointwise: torch.Tensor
    error: float
    norm2: float

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.error / self.norm2) if self.norm2 > 0 else 0.0


def tucker2_factors(weight: torch.Tensor, rank_out: int, rank_in: int, *, sweeps: int = HOOI_SWEEPS) -> TuckerFactors:
    """Tucker-2 decomposition of a conv weight along its output and input channel modes.

    HOSVD start (leading eigenvectors of each mode's Gram matrix), then ``sweeps`` HOOI sweeps (each factor
    recomputed from the weight projected on the other), in float64 on the CPU; deterministic.

    >>> w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    >>> f = tucker2_factors(w, 8, 6)
    >>> f.error < 1e-20 * f.norm2, f.core.shape
    (True, torch.Size([8, 6, 3, 3]))
    """
    check_weight(weight, "tucker2")
    c_out, c_in = weight.shape[:2]
    r_out, r_in = min(rank_out, c_out), min(rank_in, c_in)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    norm2 = float(w.pow(2).sum())
    u_in = _top_eigvecs(w.transpose(0, 1).reshape(c_in, -1), r_in)
    u_out = _top_eigvecs(w.reshape(c_out, -1), r_out)
    for _ in range(sweeps if (r_out < c_out or r_in < c_in) else 0):
        y = torch.einsum("oikl,ir->orkl", w, u_in)
        u_out = _top_eigvecs(y.reshape(c_out, -1), r_out)
        z = torch.einsum("oikl,os->sikl", w, u_out)
        u_in = _top_eigvecs(z.transpose(0, 1).reshape(c_in, -1), r_in)
    core = torch.einsum("oikl,os,ir->srkl", w, u_out, u_in)
    err = max(norm2 - float(core.pow(2).sum()), 0.0)
    if r_out == c_out and r_in == c_in:
        err = float((torch.einsum("srkl,os,ir->oikl", core, u_out, u_in) - w).pow(2).sum())
    like = {"dtype": weight.dtype, "device": weight.device}
    return TuckerFactors(u_in.T.reshape(r_in, c_in, 1, 1).to(**like), core.to(**like),
                         u_out.reshape(c_out, r_out, 1, 1).to(**like), err, norm2)


class TuckerConv2d(nn.Sequential):
    """1×1 ``reduce`` (C_in → r_in) → dense k×k ``core`` (r_in → r_out, carries stride/padding/dilation) →
    1×1 ``pointwise`` (r_out → C_out, carries the bias)."""

    def __init__(self, reduce: nn.Conv2d, core: nn.Conv2d, pointwise: nn.Conv2d) -> None:
        super().__init__(OrderedDict(reduce=reduce, core=core, pointwise=pointwise))


def core_conv(conv: nn.Conv2d, c_in: int, c_out: int, kernel: tuple[int, int], stride: Any, padding: Any,
               dilation: Any, factory: dict[str, Any]) -> nn.Conv2d:
    """A plain conv (or timm's Conv2dSame, which pads in forward) like ``conv`` with the given geometry."""
    cls = depthwise_conv_class(conv)
    if cls is None:
        raise SurgeryError(f"{type(conv).__qualname__} overrides forward; it cannot be split into plain convs")
    if cls is nn.Conv2d:
        return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, bias=False,
                         padding_mode=conv.padding_mode, **factory)
    return cls(c_in, c_out, kernel, stride=stride, dilation=dilation, bias=False).to(**factory)


def finish_block(conv: nn.Conv2d, block: nn.Module, last: nn.Conv2d) -> None:
    if conv.bias is not None:
        with torch.no_grad():
            last.bias.copy_(conv.bias)
    for p in block.parameters():
        p.requires_grad_(conv.weight.requires_grad)
    block.train(conv.training)


def check_conv(conv: nn.Conv2d, what: str) -> None:
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise SurgeryError(f"{what}: needs a groups=1 nn.Conv2d, got {conv!r}")


@register_form
class Tucker2:
    """1×1 → dense k×k core → 1×1 from a Tucker-2 decomposition; rank r caps both channel ranks."""

    name = "tucker2"
    in_mac_auto = False  # joins form="auto" under a latency target only (see the module docstring)

    def full_rank(self, conv: nn.Conv2d) -> int:
        c_out, c_in = conv.weight.shape[:2]
        return max(c_out, c_in)

    def ranks(self, conv: nn.Conv2d, rank: int) -> tuple[int, int]:
        """(r_out, r_in) at ``rank``."""
        c_out, c_in = conv.weight.shape[:2]
        return min(rank, c_out), min(rank, c_in)

    def cost(self, conv: nn.Conv2d, rank: int) -> LayerChoice:
        c_out, c_in, kh, kw = conv.weight.shape
        r = min(rank, self.full_rank(conv))
        r_out, r_in = self.ranks(conv, r)
        params = c_in * r_in + r_out * r_in * kh * kw + c_out * r_out
        return LayerChoice(self.name, r, params, c_in * r_in, r_out * r_in * kh * kw + c_out * r_out,
                           float("nan"), r >= self.full_rank(conv))

    def error_at(self, conv: nn.Conv2d, ranks: list[int]) -> list[float]:
        """Squared Frobenius weight error at each rank: the truncated HOSVD's (:func:`tucker2_error_table`), an
        upper bound on what :meth:`build` reaches after its HOOI sweeps."""
        table = tucker2_error_table(conv.weight)
        return [float(table[self.ranks(conv, r)]) for r in ranks]

    def choices(self, conv: nn.Conv2d, max_rank: int | None = None) -> list[LayerChoice]:
        top = min(max_rank or self.full_rank(conv), self.full_rank(conv))
        ranks = rank_grid(top)
        return [with_error(self.cost(conv, r), e) for r, e in zip(ranks, self.error_at(conv, ranks))]

    def build(self, conv: nn.Conv2d, rank: int, init: str = "svd") -> tuple[nn.Module, dict[str, Any]]:
        check_conv(conv, "tucker2")
        rank = check_rank(rank, "tucker2")
        if init not in ("svd", "random"):
            raise SurgeryError(f"tucker2: init must be 'svd' or 'random', got {init!r}")
        c_out, c_in, kh, kw = conv.weight.shape
        r = min(rank, self.full_rank(conv))
        r_out, r_in = self.ranks(conv, r)
        f = tucker2_factors(conv.weight, r_out, r_in) if init == "svd" else None
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        reduce = nn.Conv2d(c_in, r_in, 1, bias=False, **factory)
        core = core_conv(conv, r_in, r_out, (kh, kw), conv.stride, conv.padding, conv.dilation, factory)
        pointwise = nn.Conv2d(r_out, c_out, 1, bias=conv.bias is not None, **factory)
        if f is not None:
            with torch.no_grad():
                reduce.weight.copy_(f.reduce)
                core.weight.copy_(f.core)
                pointwise.weight.copy_(f.pointwise)
        block = TuckerConv2d(reduce, core, pointwise)
        finish_block(conv, block, pointwise)
        details: dict[str, Any] = {"tucker_ranks": [r_out, r_in], "full_rank": self.full_rank(conv)}
        details["exact"] = f is not None and (r >= self.full_rank(conv) or f.error <= 1e-12 * (f.norm2 + 1e-300))
        if f is not None:
            details.update(relative_error=f.relative_error, discarded_energy=f.error)
        return block, details


def with_error(c: LayerChoice, err: float) -> LayerChoice:
    return LayerChoice(c.form, c.rank, c.params, c.macs_in, c.macs_out, float(err), c.exact or err == 0.0)


# -------------------------------------------------------------------------------------------- spatial SVD


def _spatial_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(C_in·kh) × (C_out·kw) float64 matrix M[(i, y), (o, x)] = W[o, i, y, x]."""
    c_out, c_in, kh, kw = weight.shape
    return weight.detach().to(device="cpu", dtype=torch.float64).permute(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)


def svd_tail_curve(m: torch.Tensor) -> torch.Tensor:
    """``||M − M_r||²`` of the truncated SVD of a float64 matrix for r = 0 … min(M.shape) (Eckart–Young), from
    the eigenvalues of its smaller Gram matrix.

    >>> svd_tail_curve(torch.eye(3, dtype=torch.float64)).tolist()
    [3.0, 2.0, 1.0, 0.0]
    """
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    s2 = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)[: min(m.shape)]
    total = float(m.pow(2).sum())
    kept = torch.cat([s2.new_zeros(1), s2.cumsum(0)])
    return (total - kept).clamp_min(0)


def balanced_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], bool]:
    """The rank-``rank`` truncated SVD of a float64 matrix as ``M ≈ left @ right``, each side carrying √σ:
    ``(left, right, {"relative_error", "discarded_energy"}, exact)``, exact when nothing measurable is left.

    >>> left, right, fit, exact = balanced_svd(torch.eye(3, dtype=torch.float64), 2)
    >>> tuple(left.shape), tuple(right.shape), fit["discarded_energy"], exact
    ((3, 2), (2, 3), 1.0, False)
    """
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    norm2 = float(s.pow(2).sum())
    err = float(s[rank:].pow(2).sum())
    fit = {"relative_error": math.sqrt(err / norm2) if norm2 > 0 else 0.0, "discarded_energy": err}
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank], fit, err <= 1e-12 * (norm2 + 1e-300)


def spatial_svd_error_curve(weight: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius error of the rank-r spatial SVD for r = 0 … min(C_in·kh, C_out·kw) (Eckart–Young).

    >>> spatial_svd_error_curve(torch.ones(2, 2, 3, 3))[-1].item() < 1e-12
    True
    """
    check_weight(weight, "spatial-svd")
    return svd_tail_curve(_spatial_matrix(weight))


class SpatialSeparableConv2d(nn.Sequential):
    """``vertical`` kh×1 conv (C_in → r, carries the vertical stride/padding/dilation) → ``horizontal`` 1×kw
    conv (r → C_out, the horizontal ones and the bias).

    ``reduce`` and ``pointwise`` name the first and last conv for the helpers shared with the other forms
    (importance weighting divides the first conv's input channels and the last conv's rows; bias correction
    adds to the last conv's bias).
    """

    def __init__(self, vertical: nn.Conv2d, horizontal: nn.Conv2d) -> None:
        super().__init__(OrderedDict(vertical=vertical, horizontal=horizontal))

    @property
    def reduce(self) -> nn.Conv2d:
        return self.vertical

    @property
    def pointwise(self) -> nn.Conv2d:
        return self.horizontal


def _split_padding(padding: Any) -> tuple[Any, Any]:
    if isinstance(padding, str):
        return padding, padding
    ph, pw = padding
    return (ph, 0), (0, pw)


@register_form
class SpatialSVD:
    """kh×1 → 1×kw from the SVD of the weight reshaped to (C_in·kh) × (C_out·kw)."""

    name = "spatial-svd"
    in_mac_auto = False  # joins form="auto" under a latency target only (see the module docstring)

    def full_rank(self, conv: nn.Conv2d) -> int:
        c_out, c_in, kh, kw = conv.weight.shape
        return min(c_in * kh, c_out * kw)

    def cost(self, conv: nn.Conv2d, rank: int) -> LayerChoice:
        # the kh×1 conv runs at (H_out × W_in): sw input columns per output position
        c_out, c_in, kh, kw = conv.weight.shape
        r = min(rank, self.full_rank(conv))
        sw = conv.stride[1]
        return LayerChoice(self.name, r, r * (c_in * kh + c_out * kw), 0, r * (c_in * kh * sw + c_out * kw),
                           float("nan"), r >= self.full_rank(conv))

    def error_at(self, conv: nn.Conv2d, ranks: list[int]) -> list[float]:
        curve = spatial_svd_error_curve(conv.weight)
        return [float(curve[min(r, len(curve) - 1)]) for r in ranks]

    def choices(self, conv: nn.Conv2d, max_rank: int | None = None) -> list[LayerChoice]:
        top = min(max_rank or self.full_rank(conv), self.full_rank(conv))
        ranks = rank_grid(top)
        return [with_error(self.cost(conv, r), e) for r, e in zip(ranks, self.error_at(conv, ranks))]

    def build(self, conv: nn.Conv2d, rank: int, init: str = "svd") -> tuple[nn.Module, dict[str, Any]]:
        check_conv(conv, "spatial-svd")
        rank = check_rank(rank, "spatial-svd")
        if init not in ("svd", "random"):
            raise SurgeryError(f"spatial-svd: init must be 'svd' or 'random', got {init!r}")
        c_out, c_in, kh, kw = conv.weight.shape
        r = min(rank, self.full_rank(conv))
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        pad_v, pad_h = _split_padding(conv.padding)
        (sh, sw), (dh, dw) = conv.stride, conv.dilation
        vertical = core_conv(conv, c_in, r, (kh, 1), (sh, 1), pad_v, (dh, 1), factory)
        horizontal = core_conv(conv, r, c_out, (1, kw), (1, sw), pad_h, (1, dw), factory)
        if conv.bias is not None:
            horizontal.bias = nn.Parameter(torch.zeros(c_out, **factory))
        details: dict[str, Any] = {"full_rank": self.full_rank(conv)}
        if init == "svd":
            check_weight(conv.weight, "spatial-svd")
            left, right, fit, exact = balanced_svd(_spatial_matrix(conv.weight), r)
            first = left.reshape(c_in, kh, r).permute(2, 0, 1).unsqueeze(-1)
            second = right.reshape(r, c_out, kw).permute(1, 0, 2).unsqueeze(2)
            with torch.no_grad():
                vertical.weight.copy_(first.to(vertical.weight.dtype))
                horizontal.weight.copy_(second.to(horizontal.weight.dtype))
            details.update(fit)
            details["exact"] = r >= self.full_rank(conv) or exact
        else:
            details["exact"] = False
        block = SpatialSeparableConv2d(vertical, horizontal)
        finish_block(conv, block, horizontal)
        return block, details

