"""Dense low-rank forms (Tucker-2, spatial SVD): exact at full rank, errors as stated, the pass and its options."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.forms import FORMS, auto_forms, get_form
from fxsurgeon.forms.dense import (
    SpatialSeparableConv2d,
    TuckerConv2d,
    rank_grid,
    spatial_svd_error_curve,
    tucker2_factors,
)
from test_forms_cp import CONV_VARIANTS as CP_CONV_VARIANTS

# the CP form's conv variants, plus non-square and 5×5 kernels (the dense forms take any k×k)
CONV_VARIANTS = [
    *CP_CONV_VARIANTS,
    dict(kernel_size=(3, 5), padding=(1, 2)),
    dict(kernel_size=5, padding=0, stride=(2, 1)),
]

FORMS_DENSE = ["tucker2", "spatial-svd"]


def ids(d):
    return ",".join(f"{k}={v}" for k, v in d.items())


def test_registered_but_not_in_mac_auto():
    assert set(FORMS_DENSE) <= set(FORMS)
    assert auto_forms() == ["dw-pw", "pw-dw-pw"]
    assert set(auto_forms(latency=True, pointwise=None)) == set(FORMS)


@pytest.mark.parametrize("form", FORMS_DENSE)
@pytest.mark.parametrize("kwargs", CONV_VARIANTS, ids=ids)
def test_exact_at_full_rank(form, kwargs):
    kwargs = dict(kwargs)
    k = kwargs.pop("kernel_size", 3)
    conv = nn.Conv2d(6, 5, k, **kwargs).double()
    impl = get_form(form)
    block, details = impl.build(conv, impl.full_rank(conv))
    assert details["exact"] and details["relative_error"] < 1e-10
    assert isinstance(block, TuckerConv2d if form == "tucker2" else SpatialSeparableConv2d)
    x = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    torch.testing.assert_close(block(x), conv(x), rtol=1e-9, atol=1e-9)
    cost = impl.cost(conv, impl.full_rank(conv))
    assert cost.exact and cost.params == sum(p.numel() for n, p in block.named_parameters() if n.endswith("weight"))


@pytest.mark.parametrize("form", FORMS_DENSE)
def test_error_is_the_weight_error_and_falls_with_rank(form):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, padding=1, bias=False).double()
    impl = get_form(form)
    ranks = [1, 3, 6, 9]
    errs = impl.error_at(conv, ranks)
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(errs)) and errs[0] > errs[-1]
    for r, e in zip(ranks, errs):
        block, details = impl.build(conv, r)
        # the weight the block computes, read off its response to unit impulses (a conv is linear)
        ident = torch.zeros(12, 12, 5, 5, dtype=torch.float64)
        ident[torch.arange(12), torch.arange(12), 2, 2] = 1.0
        with torch.no_grad():
            resp = block(ident)[:, :, 1:4, 1:4]  # (C_in, C_out, 3, 3) flipped correlation kernel
        w_hat = resp.flip(-1, -2).transpose(0, 1)
        true = float((w_hat - conv.weight.detach()).pow(2).sum())
        assert details["discarded_energy"] == pytest.approx(true, rel=1e-6, abs=1e-12)
        if form == "spatial-svd":  # Eckart–Young: the curve is the error
            assert true == pytest.approx(e, rel=1e-6, abs=1e-12)
        else:  # the menu's HOSVD error bounds what the build's HOOI sweeps reach
            assert true <= e * (1 + 1e-9) + 1e-12
            assert e == pytest.approx(tucker2_factors(conv.weight, r, r, sweeps=0).error, rel=1e-6, abs=1e-12)


def test_tucker_hooi_never_worse_than_hosvd():
    torch.manual_seed(1)
    w = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    for r in (2, 5, 8):
        assert tucker2_factors(w, r, r, sweeps=3).error <= tucker2_factors(w, r, r, sweeps=0).error + 1e-9


def test_spatial_svd_curve_ends_at_zero_and_starts_at_the_norm():
    w = torch.randn(4, 3, 3, 3)
    curve = spatial_svd_error_curve(w)
    assert len(curve) == min(3 * 3, 4 * 3) + 1
    assert float(curve[0]) == pytest.approx(float(w.double().pow(2).sum()))
    assert float(curve[-1]) < 1e-9


def test_rank_grid_multiples():
    assert rank_grid(100, points=6, multiple=8)[-1] == 96  # the top rounded down to a multiple
    assert all(r % 8 == 0 for r in rank_grid(100, points=6, multiple=8))
    assert len(rank_grid(1000, points=6, multiple=8)) <= 6
    assert rank_grid(5, multiple=8) == [1, 2, 3, 4, 5]
    assert rank_grid(0) == []


@pytest.mark.parametrize("form", FORMS_DENSE)
def test_bad_rank_and_meta_weights(form):
    impl = get_form(form)
    with pytest.raises(SurgeryError, match="rank must be an int"):
        impl.build(nn.Conv2d(4, 4, 3), True)
    with pytest.raises(SurgeryError, match="meta device"):
        impl.build(nn.Conv2d(4, 4, 3, device="meta"), 2)
    _, details = impl.build(nn.Conv2d(4, 4, 3, device="meta"), 2, init="random")
    assert not details["exact"]


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.Conv2d(24, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()


@pytest.mark.parametrize("form", FORMS_DENSE)
def test_convert_layers_full_exact_and_replay(form, tmp_path):
    net = small_net()
    x = torch.randn(2, 3, 12, 12)
    impl = get_form(form)
    layers = {n: {"form": form, "rank": impl.full_rank(net.get_submodule(n))} for n in ("3", "6")}
    small = fxsurgeon.convert(net, example_inputs=x, separable=dict(layers=layers), conv_head=False,
                              source=small_net)
    rec = fxsurgeon.get_record(small)
    assert {r.details["form"] for r in rec.rewrites} == {form} and rec.exact
    torch.testing.assert_close(small(x), net(x), rtol=1e-4, atol=1e-5)
    path = tmp_path / "m.safetensors"
    fxsurgeon.save(small, path)
    again = fxsurgeon.load(path, trust_factories=["test_forms_dense:small_net"])
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)


@pytest.mark.parametrize("form", FORMS_DENSE)
def test_uniform_multiplier_weighting_bias_correction_and_calibration(form):
    net = small_net()
    x = torch.randn(16, 3, 12, 12)
    plain = fxsurgeon.convert(net, example_inputs=x[:2], separable=dict(form=form, multiplier=2), conv_head=False)
    assert {r.details["form"] for r in fxsurgeon.get_record(plain).rewrites} == {form}
    for d in (r.details for r in fxsurgeon.get_record(plain).rewrites):
        assert d["macs_after"] <= d["macs_before"]
    weighted = fxsurgeon.convert(net, example_inputs=x[:2], conv_head=False,
                                 separable=dict(form=form, multiplier=2, weighting="bn", bias_correction=True))
    assert all("weighting" in r.details for r in fxsurgeon.get_record(weighted).rewrites)
    calibrated = fxsurgeon.convert(net, example_inputs=x[:2], calibration=x, conv_head=False,
                                   separable=dict(form=form, multiplier=2))
    cal = fxsurgeon.get_record(calibrated).extras["calibration"]
    assert cal["output_error_after"] <= cal["output_error_before"] + 1e-9
    refit = {lr["target"]: lr for lr in cal["layers"] if lr["refit"]}
    assert set(refit) == {"3", "6"}  # the last conv of each block was refit
    with torch.no_grad():
        e_plain = (plain(x) - net(x)).norm() / net(x).norm()
        e_cal = (calibrated(x) - net(x)).norm() / net(x).norm()
    assert e_cal <= e_plain + 1e-6


def test_budget_with_a_dense_form_by_name():
    net = small_net()
    x = torch.randn(2, 3, 12, 12)
    small = fxsurgeon.convert(net, example_inputs=x, separable=dict(form="spatial-svd", target_macs=0.8),
                              conv_head=False)
    alloc = fxsurgeon.get_record(small).extras["allocation"]
    assert alloc["macs_fraction"] <= 0.8 + 1e-9
    assert {v["form"] for v in alloc["layers"].values()} <= {"spatial-svd", "original"}
