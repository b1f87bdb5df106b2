import pytest
import torch

from fxsurgeon import SurgeryError
from fxsurgeon.forms.fusion_math import (
    fusion_factors,
    numerical_rank,
    stack_consumer_weights,
    unstack_consumer_weights,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small models: on the shared 2-core CI box, thread hand-offs cost more than they save
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def low_rank(rows, cols, rank, dtype=torch.float64):
    return torch.randn(rows, rank, dtype=dtype) @ torch.randn(rank, cols, dtype=dtype)


def anisotropic_second_moment(c, decay=0.7):
    """E[x xᵀ] of a random-basis Gaussian with geometric variances and a non-zero mean, like post-ReLU maps."""
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    cov = q @ torch.diag(decay ** torch.arange(c, dtype=torch.float64)) @ q.T
    mean = torch.randn(c, dtype=torch.float64) * 0.5
    return cov + torch.outer(mean, mean)


def test_stack_unstack_round_trip_mixed_conv_and_linear():
    ws = [torch.randn(4, 6, 3, 3), torch.randn(5, 6, 1, 1), torch.randn(7, 6)]
    m = stack_consumer_weights(ws)
    assert m.shape == (4 * 9 + 5 + 7, 6) and m.dtype == torch.float64
    back = unstack_consumer_weights(m, [w.shape for w in ws])
    for w, b in zip(ws, back):
        torch.testing.assert_close(b, w.double())
    # a conv applied to a 1×1 map is its stacked rows times the channel vector, tap by tap
    x = torch.randn(6, dtype=torch.float64)
    taps = (m[:36] @ x).reshape(4, 3, 3)
    torch.testing.assert_close(taps, torch.einsum("oikl,i->okl", ws[0].double(), x))


def test_stack_refuses_different_widths_and_bad_shapes():
    with pytest.raises(SurgeryError, match="different channel counts"):
        stack_consumer_weights([torch.randn(4, 6, 1, 1), torch.randn(4, 5, 1, 1)])
    with pytest.raises(SurgeryError, match=r"conv .* or linear"):
        stack_consumer_weights([torch.randn(4, 6, 3)])
    with pytest.raises(SurgeryError, match="no consumer"):
        stack_consumer_weights([])


@pytest.mark.parametrize("shape,rank", [((40, 24), 7), ((10, 32), 10), ((72, 32), 12)])
def test_exact_at_rank_and_discarded_energy_is_the_tail(shape, rank):
    m = low_rank(*shape, rank)
    f = fusion_factors(m, rank)
    assert f.rank == rank and f.exact and f.weighting == "weights"
    torch.testing.assert_close(f.consumer @ f.fusion, m)
    torch.testing.assert_close(f.fusion @ f.fusion.T, torch.eye(rank, dtype=torch.float64))
    s = torch.linalg.svdvals(m)
    for r in (1, rank // 2):
        g = fusion_factors(m, r)
        assert not g.exact
        tail = float(s[r:].pow(2).sum())
        assert g.discarded_energy == pytest.approx(tail, rel=1e-9)
        assert float((m - g.consumer @ g.fusion).pow(2).sum()) == pytest.approx(tail, rel=1e-9)
        assert g.relative_error == pytest.approx((tail / float(s.pow(2).sum())) ** 0.5, rel=1e-9)


def test_more_out_channels_than_rows_pads_with_dead_columns():
    m = torch.randn(5, 16, dtype=torch.float64)  # a Linear(16, 5): rank 5
    f = fusion_factors(m, 9)
    assert f.fusion.shape == (9, 16) and f.consumer.shape == (5, 9) and f.exact
    torch.testing.assert_close(f.consumer @ f.fusion, m)
    torch.testing.assert_close(f.fusion @ f.fusion.T, torch.eye(9, dtype=torch.float64))
    assert f.consumer[:, 5:].abs().max() == 0


def test_numerical_rank_reads_the_weight_precision():
    m = low_rank(30, 20, 6) + 1e-9 * torch.randn(30, 20, dtype=torch.float64)
    s = torch.linalg.svdvals(m)
    assert numerical_rank(s, (30, 20), torch.float32) == 6  # 1e-9 noise is below float32 rounding
    assert numerical_rank(s, (30, 20), torch.float64) == 20
    assert numerical_rank(torch.zeros(3), (3, 3), torch.float32) == 0
    # half-precision weights are judged at float32 precision: conservative, never falsely exact
    assert numerical_rank(s, (30, 20), torch.float16) == 6
    tail = torch.tensor([1.0] + [1e-3] * 400)  # many small but real values: not negligible together
    assert numerical_rank(tail, (401, 401), torch.float32) == 401


@pytest.mark.parametrize("seed", range(5))
def test_data_aware_minimises_the_weighted_error(seed):
    torch.manual_seed(seed)
    c, r = 24, 6
    m = torch.randn(3 * 9, c, dtype=torch.float64)
    sigma = anisotropic_second_moment(c)
    aware = fusion_factors(m, r, second_moment=sigma)
    free = fusion_factors(m, r)
    assert aware.weighting == "activations"
    w_free = float(((m - free.consumer @ free.fusion) @ torch.linalg.cholesky(sigma)).pow(2).sum())
    assert aware.weighted_discarded < 0.9 * w_free
    # … paid for in the weights' own norm, where the SVD is optimal
    assert aware.discarded_energy > free.discarded_energy
    # the figures reported are the ones the factors give
    root = torch.linalg.cholesky(sigma)
    assert aware.weighted_discarded == pytest.approx(
        float(((m - aware.consumer @ aware.fusion) @ root).pow(2).sum()), rel=1e-9)
    assert aware.weighted_relative_error == pytest.approx(
        (aware.weighted_discarded / float((m @ root).pow(2).sum())) ** 0.5, rel=1e-9)
    torch.testing.assert_close(aware.fusion @ aware.fusion.T, torch.eye(r, dtype=torch.float64))


def test_data_aware_with_isotropic_data_equals_data_free():
    m = torch.randn(30, 12, dtype=torch.float64)
    aware = fusion_factors(m, 4, second_moment=torch.eye(12, dtype=torch.float64) * 3)
    free = fusion_factors(m, 4)
    torch.testing.assert_close(aware.consumer @ aware.fusion, free.consumer @ free.fusion)


def test_data_aware_with_singular_second_moment():
    """Data living in a 3-D subspace: 3 fusion channels reproduce the consumers on it exactly."""
    c = 10
    basis = torch.randn(c, 3, dtype=torch.float64)
    sigma = basis @ basis.T
    m = torch.randn(20, c, dtype=torch.float64)
    f = fusion_factors(m, 3, second_moment=sigma)
    assert f.weighted_discarded < 1e-12 * f.weighted_total
    x = basis @ torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(f.consumer @ (f.fusion @ x), m @ x)


def test_exact_rank_ignores_the_data():
    """r ≥ rank: the exact SVD factors are used even with Σ, so the rewrite is exact on any input."""
    m = low_rank(20, 12, 4)
    basis = torch.randn(12, 2, dtype=torch.float64)
    f = fusion_factors(m, 4, second_moment=basis @ basis.T)
    assert f.exact and f.weighting == "weights"
    torch.testing.assert_close(f.consumer @ f.fusion, m)


def test_bad_arguments():
    m = torch.randn(5, 4, dtype=torch.float64)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(SurgeryError, match="out_channels"):
            fusion_factors(m, bad)
    with pytest.raises(SurgeryError, match="second_moment"):
        fusion_factors(m, 2, second_moment=torch.eye(3))
    with pytest.raises(SurgeryError, match="2-D"):
        fusion_factors(torch.randn(2, 3, 4), 1)
    with pytest.raises(SurgeryError, match="meta"):
        stack_consumer_weights([torch.empty(3, 4, device="meta")])
