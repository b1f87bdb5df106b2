import pytest
import torch

from fxsurgeon.errors import SurgeryError
from fxsurgeon.forms.decompose import (
    channel_singular_values,
    multiplier_for_energy,
    separable_error_curve,
    separable_factors,
)


def reconstruct(f, c_out, c_in, kh, kw):
    """Recompose W from the depthwise/pointwise factors: W[o, c] = Σ_j pw[o, c·m+j] · dw[c·m+j]."""
    m = f.multiplier
    dw = f.depthwise.reshape(c_in, m, kh * kw)
    pw = f.pointwise.reshape(c_out, c_in, m)
    return torch.einsum("ocj,cjk->ock", pw, dw).reshape(c_out, c_in, kh, kw)


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (64, 16, 3, 3), (5, 3, 5, 5), (12, 2, 1, 7), (4, 6, 3, 3)])
def test_full_rank_reproduces_weight(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    f = separable_factors(w, 10_000)
    assert f.multiplier == min(shape[0], shape[2] * shape[3])
    torch.testing.assert_close(reconstruct(f, *shape), w, rtol=1e-10, atol=1e-10)
    assert f.discarded_energy < 1e-20


@pytest.mark.parametrize("m", [1, 2, 4, 7])
def test_error_is_discarded_energy(m):
    """Eckart–Young: ||W - W_m||² equals the sum of discarded squared singular values, per channel."""
    shape = (32, 6, 3, 3)
    w = torch.randn(*shape, dtype=torch.float64)
    f = separable_factors(w, m)
    err = (reconstruct(f, *shape) - w).pow(2).sum().item()
    s = channel_singular_values(w)
    assert err == pytest.approx(s[:, m:].pow(2).sum().item(), rel=1e-9)
    assert err == pytest.approx(f.discarded_energy, rel=1e-9)
    assert separable_error_curve(w)[m].item() == pytest.approx(err, rel=1e-9)
    assert f.relative_error == pytest.approx((err / w.pow(2).sum().item()) ** 0.5, rel=1e-9)


def test_truncated_svd_beats_other_depthwise_filters():
    """With any other depthwise filters (and the best pointwise for them) the error is never smaller."""
    w = torch.randn(16, 4, 3, 3, dtype=torch.float64)
    f = separable_factors(w, 2)
    slices = w.reshape(16, 4, 9).permute(1, 2, 0)  # (C_in, k², C_out)
    for _ in range(5):
        a = torch.randn(4, 9, 2, dtype=torch.float64)  # random depthwise filters, transposed
        x = torch.linalg.lstsq(a, slices).solution  # best pointwise for them
        err = (a @ x - slices).pow(2).sum().item()
        assert err >= f.discarded_energy - 1e-9


def test_dtype_and_device_kept():
    w = torch.randn(8, 4, 3, 3, dtype=torch.float16)
    f = separable_factors(w, 2)
    assert f.depthwise.dtype == torch.float16 and f.pointwise.dtype == torch.float16


def test_energy_multiplier():
    w = torch.zeros(16, 2, 3, 3, dtype=torch.float64)
    w[:, :, 1, 1] = torch.randn(16, 2, dtype=torch.float64)  # rank 1 per channel
    assert multiplier_for_energy(w, 0.999) == 1
    w2 = torch.randn(16, 2, 3, 3, dtype=torch.float64)
    ms = [multiplier_for_energy(w2, e) for e in (0.3, 0.6, 0.9, 1.0)]
    assert ms == sorted(ms) and ms[-1] == 9
    with pytest.raises(SurgeryError):
        multiplier_for_energy(w2, 1.5)


def test_bad_inputs():
    with pytest.raises(SurgeryError, match="4-D"):
        separable_factors(torch.randn(3, 3), 1)
    with pytest.raises(SurgeryError, match="meta"):
        separable_factors(torch.empty(4, 4, 3, 3, device="meta"), 1)
    with pytest.raises(SurgeryError, match="multiplier"):
        separable_factors(torch.randn(4, 4, 3, 3), 0)
    bad = torch.randn(4, 4, 3, 3)
    bad[1, 2, 0, 0] = float("nan")  # refused by name, as the other forms do, not left to the SVD
    with pytest.raises(SurgeryError, match=r"^dw-pw: .*NaN or infinite"):
        separable_factors(bad, 1)
    with pytest.raises(SurgeryError, match=r"^dw-pw: .*NaN or infinite"):
        channel_singular_values(bad)
