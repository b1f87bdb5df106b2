"""Pure maths of calibration: ridge-regularised least squares from sufficient statistics, and conjugate
gradients for systems too large to form."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DEFAULT_RIDGE", "conjugate_gradient", "residual", "ridge_cg", "ridge_refit"]


#: default ridge: λ as a fraction of the mean eigenvalue of ZᵀZ. Small enough to leave a well-determined
#: fit alone, large enough to keep an under-determined one (few samples, dead channels) near W₀.
DEFAULT_RIDGE = 1e-3


# ---------------------------------------------------------------------------------------------------------
# pure maths


def ridge_refit(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve ``argmin_W ||Z W − Y||² + λ||W − W₀||²`` from ``gram = ZᵀZ`` (d×d) and ``cross = ZᵀY`` (d×c).

    ``λ = ridge · tr(ZᵀZ) / d``; ``ridge=0`` is plain least squares (pseudo-inverse when singular).

    >>> z = torch.randn(100, 3, dtype=torch.float64); w = torch.randn(3, 2, dtype=torch.float64)
    >>> torch.allclose(ridge_refit(z.T @ z, z.T @ (z @ w), torch.zeros(3, 2, dtype=torch.float64), 0.0), w)
    True
    """
    d = gram.shape[0]
    lam = ridge * float(torch.diagonal(gram).sum()) / max(d, 1)
    a = gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device)
    b = cross + lam * w0
    if lam > 0:
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(b, chol)
    return torch.linalg.lstsq(a, b, driver="gelsd" if a.device.type == "cpu" else None).solution


def ridge_cg(
    gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float, *, start: torch.Tensor | None = None,
    iterations: int = 60, tol: float = 1e-6,
) -> torch.Tensor:
    """:func:`ridge_refit` for one right-hand side by Jacobi-preconditioned conjugate gradients.

    For systems too large to factorise each time; ``start`` warm-starts it.

    >>> a = torch.randn(50, 8, dtype=torch.float64); x = torch.randn(8, dtype=torch.float64)
    >>> g, c = a.T @ a, a.T @ (a @ x)
    >>> torch.allclose(ridge_cg(g, c, torch.zeros(8, dtype=torch.float64), 0.0, iterations=50), x)
    True
    """
    return conjugate_gradient(lambda v: gram @ v, torch.diagonal(gram), cross, w0, ridge, start=start, iterations=iterations,
               tol=tol)


def conjugate_gradient(
    matvec: Any, diag: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float, *,
    start: torch.Tensor | None = None, iterations: int = 60, tol: float = 1e-6,
) -> torch.Tensor:
    """Solve ``(A + λI) x = cross + λ w0`` given ``v ↦ A v`` and ``diag(A)``; λ = ridge · tr(A) / n."""
    n = diag.shape[0]
    lam = ridge * float(diag.sum()) / max(n, 1)
    b = cross + lam * w0
    d = diag + lam
    inv = torch.where(d > 0, 1.0 / d, torch.ones_like(d))
    x = (start if start is not None else w0).clone()
    r = b - (matvec(x) + lam * x)
    z = inv * r
    p = z.clone()
    rz = float(r @ z)
    stop = tol * float(b.norm())
    for _ in range(iterations):
        if float(r.norm()) <= stop:
            break
        ap = matvec(p) + lam * p
        pap = float(p @ ap)
        if pap <= 0:
            break
        alpha = rz / pap
        x += alpha * p
        r -= alpha * ap
        z = inv * r
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def residual(gram: torch.Tensor, cross: torch.Tensor, yy: float, w: torch.Tensor) -> float:
    """``||Z W − Y||²`` from the sufficient statistics (clamped at 0 against rounding)."""
    return max(yy - 2.0 * float((w * cross).sum()) + float((w * (gram @ w)).sum()), 0.0)
