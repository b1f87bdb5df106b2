"""The fit behind the CP form: one conv weight, one rank, a deterministic CP decomposition.

View the weight as the 3-way tensor (C_out, C_in, k²). The start is the best of three slice-SVD
factorisations (:func:`slice_svd_init`: each exact at its full rank; the one along C_in is the depthwise →
pointwise form's own SVD), refined by ALS with Bro's line search and a small ridge in float64
(:mod:`fxsurgeon.forms.als`), then normalised so that every scale sits in the last 1×1 conv
(:class:`CPFactors`). How many sweeps, which ranks, which ridge and the caches in front of this are the
form's business, :mod:`fxsurgeon.forms.cp`.

>>> w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
>>> fit_cp(w, cp_max_rank(w.shape), iterations=0, tol=0.0, ridge=0.0).relative_error < 1e-6
True
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import SurgeryError
from .als import cp_als, cp_error
from .base import check_weight

__all__ = ["CPFactors", "clear_svds", "cp_max_rank", "fit_cp", "fit_threads", "slice_svd_init"]


@dataclass(frozen=True)
class CPFactors:
    """Weights of the 1×1 → depthwise k×k → 1×1 block approximating one conv weight.

    Attributes:
        reduce: (R, C_in, 1, 1), unit-norm filters b_r.
        depthwise: (R, 1, kh, kw), unit-norm filters c_r.
        pointwise: (C_out, R, 1, 1), columns λ_r·a_r: the CP weights are folded in here.
        rank: R.
        error: squared Frobenius error ||W − Ŵ||² (float64).
        norm2: ||W||².
        init: which slice SVD started ALS (``"c_out"``, ``"c_in"`` or ``"kernel"``).
        init_error: squared error of that starting point (ALS only lowers it).
        iterations: ALS sweeps run.
    """

    reduce: torch.Tensor
    depthwise: torch.Tensor
    pointwise: torch.Tensor
    rank: int
    error: float
    norm2: float
    init: str
    init_error: float
    iterations: int

    @property
    def relative_error(self) -> float:
        """||W − Ŵ||_F / ||W||_F."""
        return math.sqrt(self.error / self.norm2) if self.norm2 > 0 else 0.0


_MODES = ("c_out", "c_in", "kernel")


def cp_max_rank(shape: tuple[int, ...] | torch.Size) -> int:
    """The CP rank at which the form is exact by construction: the smallest slice-SVD total.

    Each mode of the (C_out, C_in, k²) tensor gives an exact CP of rank ``n_mode · min(other two)`` (one SVD
    per slice); the smallest of the three bounds the tensor's CP rank.

    >>> cp_max_rank((64, 64, 3, 3)), cp_max_rank((16, 4, 3, 3))
    (576, 36)
    """
    c_out, c_in, kh, kw = shape
    k = kh * kw
    return min(c_out * min(c_in, k), c_in * min(c_out, k), k * min(c_out, c_in))


def _tensor3(weight: torch.Tensor) -> torch.Tensor:
    c_out, c_in, kh, kw = weight.shape
    return weight.detach().to(device="cpu", dtype=torch.float64).reshape(c_out, c_in, kh * kw)


def _slice_svd(t: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of every slice along ``mode``: U (n, a, r), S (n, r), Vh (n, r, b) and the descending triplet order."""
    u, s, vh = torch.linalg.svd(t.movedim(mode, 0), full_matrices=False)
    order = torch.argsort(s.pow(2).flatten(), descending=True, stable=True)
    return u, s, vh, order


# The three slice SVDs of a weight do not depend on the rank: a menu asks for up to
# fxsurgeon.forms.cp.CHOICE_POINTS ranks of one weight in a row, so keep the last few (about a second each
# on a 512×512×3×3 weight).
_SVDS: OrderedDict[tuple, list] = OrderedDict()
_SVDS_KEPT = 4
_SVDS_LOCK = threading.Lock()


def _slice_svds(t: torch.Tensor) -> list:
    key = (tuple(t.shape), str(t.dtype), hash(t.detach().cpu().contiguous().numpy().tobytes()))
    with _SVDS_LOCK:
        hit = _SVDS.get(key)
        if hit is not None:
            _SVDS.move_to_end(key)
            return hit
    svds = [_slice_svd(t, mode) for mode in range(3)]
    with _SVDS_LOCK:
        _SVDS[key] = svds
        while len(_SVDS) > _SVDS_KEPT:
            _SVDS.popitem(last=False)
    return svds


def clear_svds() -> None:
    """Forget the kept slice SVDs (a speed-up only)."""
    with _SVDS_LOCK:
        _SVDS.clear()


def slice_svd_init(t: torch.Tensor, rank: int) -> tuple[list[torch.Tensor], float, str]:
    """Deterministic CP starting point: the ``rank`` largest singular triplets over all slices of one mode.

    For the mode along C_in this is exactly the depthwise→pointwise form's per-channel SVD, regrouped: its
    triplets (σ, u, v) of channel c become CP components ``σu ∘ e_c ∘ v``. Its squared error is the sum of the
    discarded σ² (exact), so the best of the three modes is picked without reconstructing anything.

    Args:
        t: (C_out, C_in, k²) float tensor.
        rank: R ≥ 1.

    Returns:
        ``([A (C_out, R), B (C_in, R), C (k², R)], squared error, mode name)``. Components beyond the
        available triplets (only when the init is already exact) are zero.

    >>> fac, err, mode = slice_svd_init(torch.eye(4, dtype=torch.float64).reshape(4, 4, 1).expand(4, 4, 2), 4)
    >>> err < 1e-24, [f.shape[1] for f in fac]
    (True, [4, 4, 4])
    """
    total = float(t.pow(2).sum())
    best: tuple[list[torch.Tensor], float, str] | None = None
    for mode, (u, s, vh, order) in enumerate(_slice_svds(t)):
        n, r = s.shape
        take = order[:rank]
        ch, j = take // r, take % r
        kept = float(s[ch, j].pow(2).sum())
        err = max(total - kept, 0.0)
        if best is not None and not err < best[1]:
            continue
        sel = torch.zeros(n, len(take), dtype=t.dtype)
        sel[ch, torch.arange(len(take))] = 1.0
        left = u[ch, :, j].T * s[ch, j]  # (a, R): the slice's left vectors carry σ
        right = vh[ch, j, :].T  # (b, R)
        others = [d for d in range(3) if d != mode]
        fac: list[torch.Tensor] = [sel, sel, sel]
        fac[mode], fac[others[0]], fac[others[1]] = sel, left, right
        if len(take) < rank:
            fac = [torch.cat([f, f.new_zeros(f.shape[0], rank - len(take))], 1) for f in fac]
        best = (fac, err, _MODES[mode])
    assert best is not None
    return best


def fit_threads(work: int) -> int:
    """Intra-op threads a decomposition of ``work`` (tensor elements × rank) runs on: one below 5·10⁷, where
    thread hand-offs cost more than they save (7× slower with 2 threads on a 24×16×9 tensor on a busy 2-core
    machine), else the process's."""
    n = torch.get_num_threads()
    return 1 if work < 50_000_000 else n


@contextlib.contextmanager
def _threads_for(work: int) -> Iterator[None]:
    """Run on :func:`fit_threads` threads; restored after."""
    n, fit = torch.get_num_threads(), fit_threads(work)
    if fit != n:
        torch.set_num_threads(fit)
        try:
            yield
        finally:
            torch.set_num_threads(n)
    else:
        yield


def _finish(factors: list[torch.Tensor], shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise b_r and c_r, fold every scale into the last 1×1 conv, order components by weight."""
    a, b, c = factors
    nb = b.norm(dim=0)
    nc = c.norm(dim=0)
    live = (nb > 0) & (nc > 0)
    b = torch.where(live, b / torch.where(live, nb, 1.0), 0.0)
    c = torch.where(live, c / torch.where(live, nc, 1.0), 0.0)
    a = torch.where(live, a * (nb * nc), 0.0)
    # deterministic, readable order: strongest component first; sign so that the depthwise peak is positive
    order = torch.argsort(a.norm(dim=0), descending=True, stable=True)
    a, b, c = a[:, order], b[:, order], c[:, order]
    peak = c.gather(0, c.abs().argmax(0, keepdim=True)).sign()
    peak = torch.where(peak == 0, 1.0, peak)
    c, a = c * peak, a * peak
    c_out, c_in, kh, kw = shape
    rank = a.shape[1]
    return b.T.reshape(rank, c_in, 1, 1), c.T.reshape(rank, 1, kh, kw), a.reshape(c_out, rank, 1, 1)


def fit_cp(weight: torch.Tensor, rank: int, *, iterations: int, tol: float, ridge: float) -> CPFactors:
    """Rank-R CP decomposition of a conv weight into 1×1 → depthwise → 1×1 weights.

    Deterministic: slice-SVD start (:func:`slice_svd_init`), then ALS with line search
    (:func:`fxsurgeon.forms.als.cp_als`) in float64 on the CPU, on :func:`fit_threads` threads. A result
    worse than the start is not kept. Results come back in the weight's dtype and device.

    Args:
        weight: (C_out, C_in, kh, kw) conv weight (groups=1).
        rank: R ≥ 1; capped at :func:`cp_max_rank`, where the result is exact.
        iterations: most ALS sweeps (0: the slice-SVD start alone).
        tol: stop once a sweep improves the relative error by less than this.
        ridge: the ALS updates' Tikhonov ridge, relative to the normal matrix's mean diagonal (0: plain ALS).

    >>> w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    >>> f = fit_cp(w, 8, iterations=100, tol=1e-7, ridge=1e-5)
    >>> f.reduce.shape, f.depthwise.shape, f.pointwise.shape, f.error <= f.init_error
    (torch.Size([8, 4, 1, 1]), torch.Size([8, 1, 3, 3]), torch.Size([6, 8, 1, 1]), True)
    """
    check_weight(weight, "pw-dw-pw")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise SurgeryError(f"CP rank must be an int >= 1, got {rank!r}")
    rank = min(rank, cp_max_rank(weight.shape))
    t = _tensor3(weight)
    norm2 = float(t.pow(2).sum())
    with _threads_for(t.numel() * rank):
        factors, init_err, mode = slice_svd_init(t, rank)
        err, sweeps = init_err, 0
        if iterations > 0 and init_err > 1e-20 * norm2:
            try:
                refined, sweeps = cp_als(t, factors, iterations, tol, ridge=ridge)
                new_err = cp_error(t, refined)
            except (RuntimeError, ValueError):  # a singular normal equation: keep the exact-SVD start
                refined, new_err = factors, init_err
            if math.isfinite(new_err) and new_err <= init_err:
                factors, err = refined, new_err
        else:
            err = cp_error(t, factors)
        red, dw, pw = _finish(factors, weight.shape)
    like = {"dtype": weight.dtype, "device": weight.device}
    return CPFactors(red.to(**like), dw.to(**like), pw.to(**like), rank, err, norm2, mode, init_err, sweeps)
