"""Pure maths for the concat fusion pass: a channel-reducing 1×1 fusion in front of channel-mixing layers.

Every layer that mixes the C channels of one tensor (a ``Conv2d`` with ``groups=1`` or a ``Linear``) is, per
output position, a matrix acting on channel vectors. Stacking the consumers' weights reshaped to
``(C_o·k_h·k_w, C)`` gives one matrix ``M`` whose row space is everything the consumers can see of the
channels. A rank-r factorisation ``M ≈ A·B`` with ``B`` of shape (r, C) is a 1×1 fusion conv (``B``) feeding
the consumers with their input width shrunk to r (``A``, reshaped back). A 1×1 conv without bias commutes
with zero padding, stride and dilation, so the rewrite is exact whenever ``M = A·B``.

* Data-free (:func:`fusion_factors` without ``second_moment``): truncated SVD ``M = U S Vᵀ``; ``B = V_rᵀ``,
  ``A = U_r S_r``. By Eckart–Young the squared Frobenius error of ``M`` is the sum of the discarded squared
  singular values, zero once r reaches the rank of ``M``.
* Data-aware (with the second moment ``Σ = E[x xᵀ]`` of the channel vectors reaching the consumers): minimise
  ``E‖(M − A·B) x‖² = ‖(M − A·B) Σ^{1/2}‖_F²``. With ``U_r`` the top-r left singular vectors of ``M Σ^{1/2}``
  the minimum is reached by ``A·B = U_r U_rᵀ M`` (no inverse of ``Σ`` needed, so a singular ``Σ`` is fine).
  For a 1×1 consumer this is exactly the expected output error; for a k×k consumer it is the sum over the k²
  taps, ignoring correlations between neighbouring pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import SurgeryError

__all__ = [
    "FusionFactors",
    "fusion_factors",
    "numerical_rank",
    "stack_consumer_weights",
    "unstack_consumer_weights",
]


@dataclass(frozen=True)
class FusionFactors:
    """A rank-r factorisation ``M ≈ consumer @ fusion`` of stacked consumer weights, with its error.

    Attributes:
        fusion: (r, C) weight of the 1×1 fusion conv (orthonormal rows).
        consumer: (R, r) new stacked consumer weights (split back with :func:`unstack_consumer_weights`).
        rank: numerical rank of ``M`` at the precision of the weights' dtype.
        kept_energy: ``‖consumer @ fusion‖_F²``.
        discarded_energy: ``‖M − consumer @ fusion‖_F²``: the weights' squared error.
        weighting: ``"weights"`` (data-free truncated SVD) or ``"activations"`` (weighted by ``Σ``).
        weighted_total: ``‖M Σ^{1/2}‖_F²`` (None without ``Σ``): the consumers' mean squared output per position.
        weighted_discarded: ``‖(M − consumer @ fusion) Σ^{1/2}‖_F²`` (None without ``Σ``).
    """

    fusion: torch.Tensor
    consumer: torch.Tensor
    rank: int
    kept_energy: float
    discarded_energy: float
    weighting: str
    weighted_total: float | None = None
    weighted_discarded: float | None = None

    @property
    def out_channels(self) -> int:
        return self.fusion.shape[0]

    @property
    def exact(self) -> bool:
        """True when r reaches the numerical rank of ``M``: the factorisation reproduces it."""
        return self.out_channels >= self.rank

    @property
    def relative_error(self) -> float:
        """``‖M − A·B‖_F / ‖M‖_F``."""
        total = self.kept_energy + self.discarded_energy
        return (self.discarded_energy / total) ** 0.5 if total > 0 else 0.0

    @property
    def weighted_relative_error(self) -> float | None:
        """``‖(M − A·B) Σ^{1/2}‖_F / ‖M Σ^{1/2}‖_F``: relative RMS output error on the data behind ``Σ``."""
        if self.weighted_total is None or self.weighted_discarded is None:
            return None
        return (self.weighted_discarded / self.weighted_total) ** 0.5 if self.weighted_total > 0 else 0.0


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.is_meta:
        raise SurgeryError("a consumer weight is on the meta device: a factorisation needs real values")
    if weight.dim() == 4:  # (C_o, C, kh, kw) → rows indexed by (o, i, j)
        c_o, c, kh, kw = weight.shape
        return weight.detach().to(torch.float64).permute(0, 2, 3, 1).reshape(c_o * kh * kw, c)
    if weight.dim() == 2:
        return weight.detach().to(torch.float64)
    raise SurgeryError(f"expected a conv (4-D) or linear (2-D) weight, got shape {tuple(weight.shape)}")


def stack_consumer_weights(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Consumers' weights → one float64 matrix (Σ C_o·k_h·k_w, C) acting on channel vectors.

    >>> stack_consumer_weights([torch.ones(4, 6, 3, 3), torch.ones(5, 6)]).shape
    torch.Size([41, 6])
    """
    if not weights:
        raise SurgeryError("no consumer weights to stack")
    mats = [_matrix(w) for w in weights]
    widths = {m.shape[1] for m in mats}
    if len(widths) != 1:
        raise SurgeryError(f"consumers read different channel counts {sorted(widths)}: they cannot share a fusion")
    return torch.cat(mats, 0)


def unstack_consumer_weights(matrix: torch.Tensor, shapes: Sequence[torch.Size | tuple[int, ...]]) -> list[torch.Tensor]:
    """Inverse of :func:`stack_consumer_weights` for a new input width r = ``matrix.shape[1]``.

    ``shapes`` are the original weight shapes; each result has the same shape with its input width set to r.

    >>> w = [torch.randn(4, 6, 3, 3), torch.randn(5, 6)]
    >>> back = unstack_consumer_weights(stack_consumer_weights(w), [x.shape for x in w])
    >>> all(torch.equal(a.double(), b) for a, b in zip(w, back))
    True
    """
    r = matrix.shape[1]
    out, start = [], 0
    for shape in shapes:
        if len(shape) == 4:
            c_o, _, kh, kw = shape
            rows = c_o * kh * kw
            out.append(matrix[start:start + rows].reshape(c_o, kh, kw, r).permute(0, 3, 1, 2).contiguous())
        else:
            rows = shape[0]
            out.append(matrix[start:start + rows].contiguous())
        start += rows
    if start != matrix.shape[0]:
        raise SurgeryError(f"stacked matrix has {matrix.shape[0]} rows, the shapes account for {start}")
    return out


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Smallest k whose truncation error is at the rounding level of weights stored in ``dtype``.

    That is the smallest k with ``‖M − M_k‖_F ≤ eps · √max(shape) · ‖M‖_F``: rounding a matrix to ``dtype``
    perturbs it by about ``eps · ‖M‖_F``, so a rank-k matrix stored in float32 reads as rank k, while a
    claim of exactness never hides more than that relative error. ``eps`` is float32's for half-precision
    dtypes (a conservative rank, never a false claim of exactness) and float64's for float64.
    """
    total = float(singular_values.double().pow(2).sum()) if singular_values.numel() else 0.0
    if total == 0.0:
        return 0
    eps = torch.finfo(torch.float64).eps if dtype == torch.float64 else torch.finfo(torch.float32).eps
    allowed = (eps * max(shape) ** 0.5) ** 2 * total
    # tails[k] = Σ_{j ≥ k} s_j²: the squared error of keeping the first k
    tails = [*singular_values.double().pow(2).flip(0).cumsum(0).flip(0).tolist(), 0.0]
    return next(k for k, tail in enumerate(tails) if tail <= allowed)


def fusion_factors(
    matrix: torch.Tensor,
    out_channels: int,
    *,
    second_moment: torch.Tensor | None = None,
    rank_dtype: torch.dtype = torch.float32,
) -> FusionFactors:
    """Rank-``out_channels`` factorisation of stacked consumer weights: ``matrix ≈ consumer @ fusion``.

    Args:
        matrix: (R, C) stacked consumer weights (:func:`stack_consumer_weights`).
        out_channels: r, the fusion conv's width, 1 ≤ r ≤ C. When r reaches the rank of ``matrix`` the result
            is exact whatever ``second_moment`` says (the data-free SVD is used, so it is exact on any input).
        second_moment: optional (C, C) ``E[x xᵀ]`` of the channel vectors the consumers read (uncentred,
            since the consumers see the mean too). Given, the factors minimise the expected output error on
            that data instead of the weights' error.
        rank_dtype: the dtype the weights came in, for the numerical rank.

    Returns:
        :class:`FusionFactors` in float64; ``fusion`` has orthonormal rows.

    >>> m = torch.randn(20, 4, dtype=torch.float64) @ torch.randn(4, 12, dtype=torch.float64)
    >>> f = fusion_factors(m, 4)
    >>> f.rank, f.exact, torch.allclose(f.consumer @ f.fusion, m)
    (4, True, True)
    >>> round(fusion_factors(m, 2).relative_error, 6) == round(fusion_factors(m, 2).discarded_energy ** .5 / m.norm().item(), 6)
    True
    """
    if matrix.dim() != 2:
        raise SurgeryError(f"expected a 2-D stacked weight matrix, got shape {tuple(matrix.shape)}")
    rows, c = matrix.shape
    if isinstance(out_channels, bool) or not isinstance(out_channels, int) or not 1 <= out_channels <= c:
        raise SurgeryError(f"out_channels must be an int in [1, {c}], got {out_channels!r}")
    m = matrix.detach().to(torch.float64)
    r = out_channels
    u, s, vh = torch.linalg.svd(m, full_matrices=True)  # u (R, R), s (k,), vh (C, C)
    k = s.numel()
    rank = numerical_rank(s, (rows, c), rank_dtype)

    root = None
    if second_moment is not None:
        sigma = second_moment.detach().to(device=m.device, dtype=torch.float64)
        if sigma.shape != (c, c):
            raise SurgeryError(f"second_moment must be ({c}, {c}), got {tuple(sigma.shape)}")
        sigma = (sigma + sigma.T) / 2
        evals, q = torch.linalg.eigh(sigma)
        root = q * evals.clamp_min(0).sqrt()  # Σ = root rootᵀ

    if root is None or r >= rank:
        kept_cols = min(r, k)
        fusion = vh[:r]  # rows beyond k complete an orthonormal basis; their consumer columns are zero
        consumer = m.new_zeros(rows, r)
        consumer[:, :kept_cols] = u[:, :kept_cols] * s[:kept_cols]
        weighting = "weights"
    else:
        uy = torch.linalg.svd(m @ root, full_matrices=False)[0][:, :r]
        b = uy.T @ m  # (r, C): A·B = U_r U_rᵀ M
        p, d, qh = torch.linalg.svd(b, full_matrices=False)
        fusion = qh  # orthonormal rows, like the data-free V_rᵀ
        consumer = uy @ (p * d)
        weighting = "activations"
    approx = consumer @ fusion
    discarded = float((m - approx).pow(2).sum())
    kept = float(approx.pow(2).sum())
    w_total = w_discarded = None
    if root is not None:
        w_total = float((m @ root).pow(2).sum())
        w_discarded = float(((m - approx) @ root).pow(2).sum())
    return FusionFactors(
        fusion=fusion.contiguous(), consumer=consumer.contiguous(), rank=rank, kept_energy=kept,
        discarded_energy=discarded, weighting=weighting, weighted_total=w_total, weighted_discarded=w_discarded,
    )
