"""forms.als: TensorLy's parafac (ALS, line search) step for step, in fewer and larger matmuls."""

from __future__ import annotations

import warnings

import pytest
import torch

from fxsurgeon.forms.als import cp_als, cp_error
from fxsurgeon.forms.cp import slice_svd_init

tl = pytest.importorskip("tensorly")
from tensorly.decomposition import parafac  # noqa: E402


def _tensorly(t, factors, n_iter, tol):
    calls = [0]

    def count(_cp, _err):
        calls[0] += 1

    rank = factors[0].shape[1]
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w, out = parafac(t, rank, n_iter_max=n_iter, init=(torch.ones(rank, dtype=t.dtype), [f.clone() for f in factors]),
                         tol=tol, linesearch=True, callback=count)
    return [out[0] * w, out[1], out[2]], calls[0] - 1


@pytest.mark.parametrize("shape,rank,n_iter,tol", [
    ((16, 8, 9), 5, 100, 1e-7),     # line search runs, acceleration is reduced after failed jumps
    ((24, 20, 9), 30, 60, 1e-30),   # rank above C_in and C_out, every sweep run
    ((40, 12, 25), 16, 40, 1e-7),   # 5×5 kernel
    ((10, 10, 1), 7, 50, 1e-7),     # a 1×1 "kernel": the short mode has length one
])
def test_matches_tensorly_parafac(shape, rank, n_iter, tol):
    torch.manual_seed(0)
    t = torch.randn(*shape, dtype=torch.float64)
    factors, _, _ = slice_svd_init(t, rank)
    ref, ref_sweeps = _tensorly(t, factors, n_iter, tol)
    ours, sweeps = cp_als(t, factors, n_iter, tol)
    assert sweeps == ref_sweeps
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()))
    assert cp_error(t, ours) == pytest.approx(cp_error(t, ref), rel=1e-9)


def test_from_random_start_error_falls_and_stops_on_tol():
    torch.manual_seed(1)
    t = torch.randn(12, 9, 9, dtype=torch.float64)
    start = [torch.randn(n, 6, dtype=torch.float64) for n in t.shape]
    out, sweeps = cp_als(t, start, 500, 1e-6)
    assert cp_error(t, out) < cp_error(t, start)
    assert 1 < sweeps < 500


def test_input_factors_untouched_and_zero_tensor():
    t = torch.zeros(4, 3, 9, dtype=torch.float64)
    start = [torch.randn(n, 2, dtype=torch.float64) for n in t.shape]
    copies = [f.clone() for f in start]
    _, sweeps = cp_als(t, start, 10, 1e-7)
    assert sweeps == 0 and all(torch.equal(a, b) for a, b in zip(start, copies))
    t = torch.randn(4, 3, 9, dtype=torch.float64)
    cp_als(t, start, 10, 1e-7)
    assert all(torch.equal(a, b) for a, b in zip(start, copies))


def test_cp_error_is_the_reconstruction_error_in_blocks(monkeypatch):
    import fxsurgeon.forms.als as als

    torch.manual_seed(2)
    t = torch.randn(7, 5, 9, dtype=torch.float64)
    f = [torch.randn(n, 11, dtype=torch.float64) for n in t.shape]
    full = float((t - torch.einsum("ir,jr,kr->ijk", *f)).pow(2).sum())
    monkeypatch.setattr(als, "_BLOCK", 50)  # 45 elements per component: one component per block
    assert cp_error(t, f) == pytest.approx(full, rel=1e-12)
