"""Pure tensor maths for the rewrites: no fx, no module graphs.

The separable factorisation follows Network Decoupling (Guo et al., BMVC 2018): for each input channel c the
slice ``W[:, c]`` of a k×k conv weight, viewed as a (C_out × k²) matrix, is factored by SVD. Keeping the top
``m`` singular triplets gives ``m`` depthwise k×k filters for that channel and the matching pointwise columns.
By Eckart–Young this is the best rank-m approximation of every slice, so the squared Frobenius error of the
whole weight is exactly the sum of the discarded squared singular values, and it is zero once
``m >= min(C_out, k²)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SurgeryError
from .base import check_weight

__all__ = [
    "SeparableFactors",
    "channel_singular_values",
    "multiplier_for_energy",
    "separable_error_curve",
    "separable_factors",
]


@dataclass(frozen=True)
class SeparableFactors:
    """Weights of a depthwise k×k (C_in·m filters) + pointwise 1×1 pair approximating one conv weight.

    Attributes:
        depthwise: (C_in·m, 1, kh, kw); output channel ``c·m + j`` reads input channel ``c``.
        pointwise: (C_out, C_in·m, 1, 1).
        multiplier: the channel multiplier m actually used (capped at ``min(C_out, kh·kw)``).
        kept_energy: sum of kept squared singular values.
        discarded_energy: sum of discarded squared singular values = ||W - W_m||_F².
    """

    depthwise: torch.Tensor
    pointwise: torch.Tensor
    multiplier: int
    kept_energy: float
    discarded_energy: float

    @property
    def relative_error(self) -> float:
        """||W - W_m||_F / ||W||_F."""
        total = self.kept_energy + self.discarded_energy
        return (self.discarded_energy / total) ** 0.5 if total > 0 else 0.0


def _slices(weight: torch.Tensor) -> torch.Tensor:
    """(C_in, C_out, kh·kw) float64 slices, one matrix per input channel."""
    c_out, c_in, kh, kw = weight.shape
    return weight.detach().to(torch.float64).permute(1, 0, 2, 3).reshape(c_in, c_out, kh * kw)


def _gram_eig(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Eigen-decomposition of the smaller Gram matrix of each (C_out × k²) slice, largest first.

    A batched ``eigh`` of a k²×k² (or C_out×C_out) Gram matrix is several times cheaper than a batched SVD of
    the tall slices and, in float64, accurate far beyond what the float32 weights hold. Returns the squared
    singular values (clamped ≥ 0), the eigenvectors, and whether they are right (k²-side) vectors.
    """
    right = a.shape[-2] >= a.shape[-1]
    gram = a.transpose(-1, -2) @ a if right else a @ a.transpose(-1, -2)
    evals, evecs = torch.linalg.eigh(gram)
    return evals.flip(-1).clamp_min(0), evecs.flip(-1), right


def channel_singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of every input channel's (C_out × k²) slice: shape (C_in, min(C_out, k²)), descending.

    >>> channel_singular_values(torch.ones(4, 2, 3, 3)).shape
    torch.Size([2, 4])
    """
    check_weight(weight, "dw-pw")
    c_out, _, kh, kw = weight.shape
    s2, _, _ = _gram_eig(_slices(weight))
    return s2[:, : min(c_out, kh * kw)].sqrt()


def separable_error_curve(weight: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius error of the rank-m factorisation for m = 0 … min(C_out, k²) (length r + 1)."""
    s2 = channel_singular_values(weight).pow(2).sum(0)  # energy at each rank position, over channels
    total = s2.sum()
    kept = torch.cat([s2.new_zeros(1), s2.cumsum(0)])
    return (total - kept).clamp_min(0)


def multiplier_for_energy(weight: torch.Tensor, energy: float) -> int:
    """Smallest m whose factorisation keeps at least ``energy`` of the weight's squared Frobenius norm."""
    if not 0.0 < energy <= 1.0:
        raise SurgeryError(f"energy must be in (0, 1], got {energy}")
    curve = separable_error_curve(weight)
    total = float(curve[0])
    if total == 0.0:
        return 1
    for m in range(1, len(curve)):
        if 1.0 - float(curve[m]) / total >= energy - 1e-12:
            return m
    return len(curve) - 1


def separable_factors(weight: torch.Tensor, multiplier: int) -> SeparableFactors:
    """Per-input-channel truncated SVD of a conv weight into depthwise + pointwise weights.

    One batched eigen-decomposition of the slices' Gram matrices (equivalent to their SVD), in float64; results come back in the weight's
    dtype and device. Singular values are split evenly (√s on each side) so both factors have similar scale.

    Args:
        weight: (C_out, C_in, kh, kw) conv weight.
        multiplier: channel multiplier m ≥ 1; values above ``min(C_out, kh·kw)`` are capped there (exact).

    >>> w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    >>> f = separable_factors(w, 8)
    >>> f.depthwise.shape, f.pointwise.shape, f.discarded_energy < 1e-20
    (torch.Size([32, 1, 3, 3]), torch.Size([8, 32, 1, 1]), True)
    """
    check_weight(weight, "dw-pw")
    if not isinstance(multiplier, int) or isinstance(multiplier, bool) or multiplier < 1:
        raise SurgeryError(f"multiplier must be an int >= 1, got {multiplier!r}")
    c_out, c_in, kh, kw = weight.shape
    m = min(multiplier, c_out, kh * kw)
    a = _slices(weight)  # (C_in, C_out, k²)
    s2, vecs, right = _gram_eig(a)
    s2 = s2[:, : min(c_out, kh * kw)]
    vecs = vecs[:, :, :m]
    # Balanced split: depthwise √s·v, pointwise u·√s with u = A v / s. Each kept pair contributes A v vᵀ (or
    # u uᵀ A), so the product is exact at full rank whatever the conditioning; a (numerically) zero singular
    # value keeps an unscaled pair instead of dividing by zero.
    root = s2[:, :m].sqrt()
    tiny = root <= root[:, :1].clamp_min(1e-300) * 1e-12
    scale = torch.where(tiny, torch.ones_like(root), root)
    if right:  # vecs are right singular vectors v (k²): depthwise filters
        dw = (vecs * scale.unsqueeze(1)).transpose(1, 2)  # (C_in, m, k²)
        pw = (a @ vecs) / scale.unsqueeze(1)  # (C_in, C_out, m)
    else:  # vecs are left singular vectors u (C_out): pointwise columns
        pw = vecs * scale.unsqueeze(1)
        dw = (vecs.transpose(1, 2) @ a) / scale.unsqueeze(-1)
    dw = dw.reshape(c_in * m, 1, kh, kw)
    pw = pw.permute(1, 0, 2).reshape(c_out, c_in * m, 1, 1)
    kept = float(s2[:, :m].sum())
    discarded = float(s2[:, m:].sum())
    return SeparableFactors(
        depthwise=dw.to(dtype=weight.dtype, device=weight.device),
        pointwise=pw.to(dtype=weight.dtype, device=weight.device),
        multiplier=m,
        kept_energy=kept,
        discarded_energy=discarded,
    )
