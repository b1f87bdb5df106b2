"""The pw-pw form (low-rank 1×1 convs): exact at full rank, Eckart–Young errors, where it applies, the pass's
options around it (kernel_sizes with 1), budgets, calibration, save/load and the latency budget's hint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.forms import applies, auto_forms, forms_for, get_form
from fxsurgeon.forms.pointwise import LowRankConv2d, pointwise_error_curve
from test_budget_latency_budget import Clock

PW_VARIANTS = [
    dict(),
    dict(bias=False),
    dict(stride=2),
    dict(stride=(2, 1), bias=False),
    dict(padding=1),
    dict(padding=1, padding_mode="reflect"),
    dict(padding="same"),
]


def ids(d):
    return ",".join(f"{k}={v}" for k, v in d.items()) or "plain"


@pytest.mark.parametrize("kwargs", PW_VARIANTS, ids=ids)
@pytest.mark.parametrize("c_in, c_out", [(6, 9), (9, 6)])
def test_exact_at_full_rank(kwargs, c_in, c_out):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 1, **kwargs).double()
    impl = get_form("pw-pw")
    assert impl.full_rank(conv) == min(c_in, c_out)
    block, details = impl.build(conv, impl.full_rank(conv))
    assert isinstance(block, LowRankConv2d) and details["exact"] and details["relative_error"] < 1e-10
    x = torch.randn(2, c_in, 7, 10, dtype=torch.float64)
    torch.testing.assert_close(block(x), conv(x), rtol=1e-9, atol=1e-9)
    cost = impl.cost(conv, impl.full_rank(conv))
    assert cost.exact and cost.params == sum(p.numel() for n, p in block.named_parameters() if n.endswith("weight"))
    # both convs run at the output positions: the first carries the stride
    h, w = block(x).shape[-2:]
    assert block.pointwise(block.reduce(x)).shape[-2:] == (h, w)


def test_error_is_eckart_young_and_falls_with_rank():
    torch.manual_seed(1)
    conv = nn.Conv2d(12, 20, 1, bias=False).double()
    impl = get_form("pw-pw")
    ranks = [1, 4, 8, 12]
    errs = impl.error_at(conv, ranks)
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-9 < errs[0]
    m = conv.weight.detach().reshape(20, 12)
    s = torch.linalg.svdvals(m)
    for r, e in zip(ranks, errs):
        block, details = impl.build(conv, r)
        w_hat = (block.pointwise.weight.reshape(20, r) @ block.reduce.weight.reshape(r, 12))
        true = float((w_hat - m).detach().pow(2).sum())
        assert true == pytest.approx(e, rel=1e-9, abs=1e-12) == pytest.approx(float(s[r:].pow(2).sum()), abs=1e-12)
        assert details["discarded_energy"] == pytest.approx(true, rel=1e-9, abs=1e-12)
    curve = pointwise_error_curve(conv.weight)
    assert len(curve) == 13 and float(curve[0]) == pytest.approx(float(m.pow(2).sum()))


def test_costs_and_choices():
    conv = nn.Conv2d(64, 32, 1, stride=2)
    impl = get_form("pw-pw")
    c = impl.cost(conv, 8)
    assert (c.params, c.macs_in, c.macs_out) == (8 * 96, 0, 8 * 96)
    menu = impl.choices(conv)
    assert [x.rank for x in menu][-1] == 32 and all(x.form == "pw-pw" for x in menu)
    assert len(menu) <= 48 and menu[-1].exact


def test_where_each_form_applies():
    one, three = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3)
    assert applies("pw-pw", one) and not applies("pw-pw", three)
    assert all(applies(f, three) and not applies(f, one) for f in auto_forms(latency=True))
    assert auto_forms() == ["dw-pw", "pw-dw-pw"] and auto_forms(pointwise=True) == ["pw-pw"]
    assert "pw-pw" in auto_forms(latency=True, pointwise=None)
    assert forms_for("auto", one) == ["pw-pw"] and forms_for("dw-pw", one) == []
    assert forms_for("auto", three, latency=True) == auto_forms(latency=True)


def test_refuses_what_it_cannot_build():
    impl = get_form("pw-pw")
    with pytest.raises(SurgeryError, match="1×1 convs only"):
        impl.build(nn.Conv2d(4, 4, 3), 2)
    with pytest.raises(SurgeryError, match="groups=1"):
        impl.build(nn.Conv2d(4, 4, 1, groups=2), 2)
    with pytest.raises(SurgeryError, match="rank must be an int"):
        impl.build(nn.Conv2d(4, 4, 1), 2.0)
    with pytest.raises(SurgeryError, match="meta device"):
        impl.build(nn.Conv2d(4, 4, 1, device="meta"), 2)
    _, details = impl.build(nn.Conv2d(4, 4, 1, device="meta"), 2, init="random")
    assert not details["exact"]


def bottleneck_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
        nn.Conv2d(128, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 128, 1, stride=2, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    ).eval()


X = torch.randn(2, 3, 16, 16)
POINTWISE = {"3", "6", "12"}


def _forms(model):
    return {r.target: r.details["form"] for r in fxsurgeon.get_record(model).rewrites if r.pass_name == "separable"}


def test_1x1_convs_are_left_alone_unless_asked():
    net = bottleneck_net()
    plain = fxsurgeon.convert(net, example_inputs=X, conv_head=False, separable=dict(target_macs=0.6))
    assert not POINTWISE & set(_forms(plain))
    assert not POINTWISE & {s.target for s in fxsurgeon.get_record(plain).skipped}  # no record line either


def test_a_mac_budget_with_1x1_convs():
    from fxsurgeon.budget.plan import model_macs

    net = bottleneck_net()
    with torch.no_grad():  # 1×1 weights of rank 6: the budget should find them free to cut to rank 6
        for n in POINTWISE:
            w = net.get_submodule(n).weight
            w.copy_((torch.randn(w.shape[0], 6) @ torch.randn(6, w.shape[1])).view_as(w))
    small = fxsurgeon.convert(net, example_inputs=X, conv_head=False,
                              separable=dict(target_macs=0.5, kernel_sizes=[1, 3]))
    rw = {r.target: r for r in fxsurgeon.get_record(small).rewrites}
    assert {n for n, r in rw.items() if r.details["form"] == "pw-pw"} == POINTWISE
    assert all(r.details["form"] != "pw-pw" for n, r in rw.items() if n not in POINTWISE)
    for n in POINTWISE:
        assert rw[n].details["rank"] >= 6 and rw[n].details["relative_error"] < 1e-6
    assert model_macs(small, (X,))[0] <= 0.5 * model_macs(net, (X,))[0] * (1 + 1e-6)
    assert fxsurgeon.get_record(small).extras["allocation"]["macs_fraction"] <= 0.5 + 1e-9


def test_without_a_budget_a_1x1_conv_needs_a_rank_in_layers():
    net = bottleneck_net()
    small = fxsurgeon.convert(net, example_inputs=X, conv_head=False,
                              separable=dict(kernel_sizes=[1, 3], multiplier=2, layers={"6": {"rank": 32}}))
    forms = _forms(small)
    assert forms["6"] == "pw-pw" and forms["9"] == "dw-pw"  # a rank without a form: the one that applies
    rec = fxsurgeon.get_record(small)
    exact = {r.target: r.exact for r in rec.rewrites}
    assert exact["6"]  # rank 32 = min(128, 32): exact
    why = {s.target: s.reason for s in rec.skipped}
    assert {"3", "12"} <= set(why) and all("1×1 conv has no multiplier" in why[n] for n in ("3", "12"))


@pytest.mark.parametrize("sep, match", [
    (dict(kernel_sizes=[1, 3], form="dw-pw", target_macs=0.5), r"form='dw-pw' cannot rewrite '3' \(1×1 conv\)"),
    (dict(form="pw-pw", kernel_sizes=[3], target_macs=0.5),
     r"form='pw-pw' cannot rewrite '9' \(3×3 conv\).*kernel_sizes=\[1\]"),
    (dict(kernel_sizes=[1, 3], layers={"6": {"form": "tucker2", "rank": 4}}),
     r"layers\['6'\]\['form'\]='tucker2' cannot rewrite '6'"),
    (dict(kernel_sizes=[1, 3], form="dw-pw", layers={"6": {"rank": 4}}), r"form='dw-pw' cannot rewrite '6'"),
    (dict(kernel_sizes=[0, 3]), r"kernel_sizes must be 'all' or ints >= 1"),
    (dict(form="pw-pw", kernel_sizes=[1, 3], multiplier=2), r"form='pw-pw' cannot rewrite '9' \(3×3 conv\)"),
])
def test_forms_that_cannot_apply_are_refused_by_name(sep, match):
    net = bottleneck_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(SurgeryError, match=match):
        fxsurgeon.convert(net, example_inputs=X, conv_head=False, separable=sep)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_kernel_sizes_all_still_means_spatial_kernels():
    small = fxsurgeon.convert(bottleneck_net(), example_inputs=X, conv_head=False,
                              separable=dict(kernel_sizes="all", target_macs=0.7))
    assert not POINTWISE & set(_forms(small))


def test_weighting_bias_correction_calibration_and_save_load(tmp_path):
    net = bottleneck_net()
    x = torch.randn(16, 3, 16, 16)
    layers = {n: {"rank": 8} for n in POINTWISE}
    sep = dict(kernel_sizes=[1], layers=layers)
    plain = fxsurgeon.convert(net, example_inputs=x[:2], conv_head=False, separable=sep)
    weighted = fxsurgeon.convert(net, example_inputs=x[:2], conv_head=False, source=bottleneck_net,
                                 separable=dict(sep, weighting="bn", bias_correction=True))
    rw = {r.target: r.details for r in fxsurgeon.get_record(weighted).rewrites}
    assert set(rw) == POINTWISE and all("weighting" in d and "bias_correction" in d for d in rw.values())
    calibrated = fxsurgeon.convert(net, example_inputs=x[:2], calibration=x, conv_head=False, separable=sep)
    cal = fxsurgeon.get_record(calibrated).extras["calibration"]
    assert {lr["target"] for lr in cal["layers"] if lr["refit"]} >= POINTWISE  # the last 1×1 of each pair
    with torch.no_grad():
        e_plain = (plain(x) - net(x)).norm() / net(x).norm()
        e_cal = (calibrated(x) - net(x)).norm() / net(x).norm()
    assert e_cal <= e_plain + 1e-6
    path = tmp_path / "pw.safetensors"
    fxsurgeon.save(weighted, path)
    again = fxsurgeon.load(path, trust_factories=["test_forms_pointwise:bottleneck_net"])
    torch.testing.assert_close(again(x), weighted(x), rtol=0, atol=0)
    assert _forms(again) == _forms(weighted)


def _latency(tmp_path, target, **sep):
    import warnings

    lat = {"timer": Clock(), "cache_dir": str(tmp_path / "cache"), "model_rounds": 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = fxsurgeon.convert(bottleneck_net(), example_inputs=X, conv_head=False,
                                  separable=dict(target_latency=target, latency_aware=lat, **sep))
    return small, fxsurgeon.get_record(small).extras["allocation"], [str(w.message) for w in caught]


def test_a_latency_target_out_of_reach_of_the_3x3_convs_names_the_1x1_ones(tmp_path, monkeypatch):
    """Left out (kernel_sizes=[3]), the 1×1 convs are named in the warning; by default they are candidates."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    _, alloc, warned = _latency(tmp_path, 0.4, kernel_sizes=[3])
    assert alloc["status"].startswith("not met") or alloc["status"].startswith("no ")
    assert "3 standard 1×1 convs were not candidates" in alloc["status"]
    assert any("with 1 in kernel_sizes" in w for w in warned)
    small, alloc, warned = _latency(tmp_path, 0.4)  # the default under a latency target: (1, 3)
    assert tuple(alloc["defaults"]["kernel_sizes"]) == (1, 3)
    assert alloc["status"] == "met", alloc["status"]
    assert "pw-pw" in alloc["forms"] and "pw-pw" in set(_forms(small).values())
    assert not any("not candidates" in w for w in warned)


def test_pw_pw_by_name_matches_the_1x1_convs():
    small = fxsurgeon.convert(bottleneck_net(), example_inputs=X, conv_head=False,
                              separable=dict(form="pw-pw", target_macs=0.8))
    assert set(_forms(small)) <= POINTWISE and set(_forms(small).values()) == {"pw-pw"}
    assert fxsurgeon.get_record(small).extras["allocation"]["defaults"]["kernel_sizes"] == (1,)


def test_a_mac_budget_out_of_reach_of_the_3x3_convs_names_the_1x1_ones():
    net = bottleneck_net()
    with pytest.raises(SurgeryError, match=r"cannot be met.*3 standard 1×1 convs were not candidates"):
        fxsurgeon.convert(net, example_inputs=X, conv_head=False, separable=dict(target_macs=0.3))
    small = fxsurgeon.convert(net, example_inputs=X, conv_head=False,
                              separable=dict(target_macs=0.3, kernel_sizes=[1, 3]))
    assert fxsurgeon.get_record(small).extras["allocation"]["macs_fraction"] <= 0.3 + 1e-9
