import itertools
import operator

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn

import fxsurgeon
import fxsurgeon.forms.cp as cp
from fxsurgeon import SurgeryError
from fxsurgeon.forms import FORMS, get_form
from fxsurgeon.forms.cp import (
    CHOICE_ITERATIONS,
    cp_cost,
    cp_factors,
    cp_max_rank,
    cp_rank_grid,
    make_cp_separable,
    slice_svd_init,
)
from fxsurgeon.forms.decompose import separable_error_curve
from fxsurgeon.modules import SeparableConv2d


def cp_weight(sep: SeparableConv2d) -> torch.Tensor:
    """The conv weight the block computes: Σ_r pointwise[:, r] ∘ reduce[r, :] ∘ depthwise[r]."""
    a = sep.pointwise.weight.detach()[:, :, 0, 0]
    b = sep.reduce.weight.detach()[:, :, 0, 0]
    c = sep.depthwise.weight.detach()[:, 0]
    return torch.einsum("or,ri,rhw->oihw", a, b, c)


CONV_VARIANTS = [
    dict(padding=1),
    dict(stride=2, padding=1),
    dict(padding=2, dilation=2),
    dict(padding=1, bias=True),
    dict(padding="same"),
    dict(padding=1, padding_mode="reflect"),
    dict(padding=1, padding_mode="circular"),
    dict(padding=1, padding_mode="replicate", stride=2),
    dict(padding=(1, 0), stride=(1, 2)),
]


def test_registered_as_a_form():
    assert "pw-dw-pw" in FORMS and get_form("pw-dw-pw").name == "pw-dw-pw"


@pytest.mark.parametrize("kwargs", CONV_VARIANTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_exact_at_full_rank_on_conv_variants(kwargs):
    conv = nn.Conv2d(6, 5, 3, **kwargs).double()
    full = cp_max_rank(conv.weight.shape)
    assert full == 5 * 6  # min(5·min(6, 9), 6·min(5, 9), 9·min(5, 6))
    sep, f = make_cp_separable(conv, full)
    assert f.relative_error < 1e-10
    assert isinstance(sep, SeparableConv2d) and list(dict(sep.named_children())) == ["reduce", "depthwise", "pointwise"]
    x = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    torch.testing.assert_close(sep(x), conv(x), rtol=1e-9, atol=1e-9)


def test_recovers_a_weight_of_low_cp_rank():
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (12, 10, 9))
    w = torch.einsum("or,ir,kr->oik", a, b, c).reshape(12, 10, 3, 3)
    f = cp_factors(w, 4, iterations=500, ridge=0.0)
    assert f.relative_error < 1e-6
    assert f.error <= f.init_error
    ridged = cp_factors(w, 4, iterations=500)  # the default ridge costs a bias of its own size, no more
    assert ridged.relative_error < 10 * cp.ALS_RIDGE and ridged.error <= ridged.init_error


def test_the_ridge_keeps_a_degenerate_fit_bounded():
    # a tensor of rank 3 whose best rank-2 approximation does not exist (border rank 2): plain ALS lets two
    # components grow without bound and cancel; the ridge keeps them near the tensor's norm at a small error
    g = torch.Generator().manual_seed(0)
    (a0, a1), (b0, b1), (c0, c1) = [[torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2)]
                                    for n in (8, 6, 9)]
    t = (torch.einsum("o,i,k->oik", a1, b0, c0) + torch.einsum("o,i,k->oik", a0, b1, c0)
         + torch.einsum("o,i,k->oik", a0, b0, c1))
    w = t.reshape(8, 6, 3, 3)
    norm = float(w.norm())
    scale = {}
    for sweeps in (1000, 3000):
        for ridge in (0.0, cp.ALS_RIDGE):
            f = cp_factors(w, 2, iterations=sweeps, tol=0.0, ridge=ridge)
            scale[sweeps, ridge] = float(f.pointwise.norm()) / norm
            if ridge:
                assert f.relative_error < 0.01
    assert scale[3000, 0.0] > scale[1000, 0.0] > 6  # plain ALS: the components keep growing
    assert scale[3000, cp.ALS_RIDGE] < 4 and scale[3000, cp.ALS_RIDGE] < 0.5 * scale[3000, 0.0]


def test_reported_error_is_the_error_of_the_built_block():
    conv = nn.Conv2d(16, 24, 3, padding=1, bias=False).double()
    for rank in (5, 40):  # below and above both channel counts
        sep, f = make_cp_separable(conv, rank)
        assert sep.depthwise.out_channels == rank == f.rank
        err = float((cp_weight(sep) - conv.weight.detach()).pow(2).sum())
        assert err == pytest.approx(f.error, rel=1e-9)
        assert f.relative_error == pytest.approx((err / float(conv.weight.pow(2).sum())) ** 0.5, rel=1e-9)


def test_rank_above_channel_counts_lowers_the_error():
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    errors = [cp_factors(conv.weight, r).error for r in (8, 16, 32, 48)]
    assert all(e1 < e0 for e0, e1 in itertools.pairwise(errors))


def test_start_is_never_worse_than_depthwise_pointwise_at_the_same_depthwise_width():
    # at R = C_in·m the slice-SVD start contains the dw-pw factorisation with multiplier m
    conv = nn.Conv2d(12, 20, 3, bias=False)
    curve = separable_error_curve(conv.weight)
    t = conv.weight.detach().double().reshape(20, 12, 9)
    for m in (1, 2, 4):
        _, init_err, _ = slice_svd_init(t, 12 * m)
        assert init_err <= float(curve[m]) * (1 + 1e-9)
        assert cp_factors(conv.weight, 12 * m).error <= init_err * (1 + 1e-9)


def test_deterministic_bit_identical():
    net = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1, bias=False)).eval()
    states = []
    for seed in (0, 123):
        torch.manual_seed(seed)
        np.random.seed(seed)
        out = fxsurgeon.convert(net, separable=dict(form="pw-dw-pw", layers={"0": {"form": "pw-dw-pw", "rank": 37},
                                                                           "3": {"form": "pw-dw-pw", "rank": 50}}))
        states.append(out.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_fresh_decomposition_matches_cached_one():
    from fxsurgeon.forms.cp import clear_cache

    conv = nn.Conv2d(8, 8, 3, bias=False)
    first = make_cp_separable(conv, 20)[0]
    clear_cache()
    second = make_cp_separable(conv, 20)[0]
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))


def test_scales_folded_no_mul_left_in_graph():
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=True)).eval()
    x = torch.randn(2, 8, 16, 16)
    out = fxsurgeon.convert(net, separable=dict(form="pw-dw-pw", multiplier=2), example_inputs=x)
    assert len(fxsurgeon.get_record(out).rewrites) == 2
    flat = fx.symbolic_trace(out)  # traces through the SeparableConv2d containers down to the convs
    targets = [n.target for n in flat.graph.nodes if n.op in ("call_function", "call_method")]
    assert not [t for t in targets if t in (operator.mul, torch.mul, "mul", "mul_") or "mul" in str(t)]
    convs = [n for n in flat.graph.nodes if n.op == "call_module" and isinstance(flat.get_submodule(n.target), nn.Conv2d)]
    assert len(convs) == 6  # 1×1 → depthwise → 1×1, twice
    torch.testing.assert_close(flat(x), out(x))


def test_cost_matches_fvcore_macs():
    from fvcore.nn import FlopCountAnalysis

    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False)
    rank = 40
    sep, _ = make_cp_separable(conv, rank)
    choice = get_form("pw-dw-pw").cost(conv, rank)
    assert (choice.params, choice.macs_in, choice.macs_out) == (
        rank * (16 + 9 + 24), *cp_cost(conv.weight.shape, rank)[1:])
    assert choice.params == sum(p.numel() for p in sep.parameters())
    x = torch.randn(1, 16, 20, 20)
    fa = FlopCountAnalysis(sep, x)
    fa.unsupported_ops_warnings(False)
    assert fa.total() == choice.macs(20 * 20, 10 * 10)


def test_choices_are_upper_bounds_of_the_built_error():
    conv = nn.Conv2d(8, 12, 3, bias=False)
    form = get_form("pw-dw-pw")
    menu = form.choices(conv, 30)
    assert [c.rank for c in menu] == cp_rank_grid(conv.weight.shape, 30)
    assert all(c.form == "pw-dw-pw" and c.error >= 0 for c in menu)
    for c in menu[-3:]:
        _, details = form.build(conv, c.rank)
        assert details["discarded_energy"] <= c.error * (1 + 1e-9)
        assert CHOICE_ITERATIONS > 0


def test_sweep_budget_shrinks_menu_work_on_wide_layers_and_keeps_the_bound(monkeypatch):
    import fxsurgeon.forms.cp as cp

    # the full count on small layers (every CIFAR ResNet layer), fewer on wide layers at high rank
    assert cp.als_sweeps((64, 64, 3, 3), 270, build=False) == cp.CHOICE_ITERATIONS
    assert cp.als_sweeps((64, 64, 3, 3), 270, build=True) == cp.DEFAULT_ITERATIONS
    assert cp.als_sweeps((2048, 2048, 3, 3), 4000, build=False) == cp.MIN_CHOICE_ITERATIONS
    assert cp.als_sweeps((2048, 2048, 3, 3), 4000, build=True) == cp.CHOICE_ITERATIONS
    for shape, rank in (((512, 512, 3, 3), 700), ((256, 128, 5, 5), 300), ((8, 8, 3, 3), 1)):
        assert cp.als_sweeps(shape, rank, build=True) >= cp.als_sweeps(shape, rank, build=False)
    # shrink the budgets so this small layer is "wide": the menu's error still bounds the build's
    monkeypatch.setattr(cp, "CHOICE_WORK", 1.0)
    monkeypatch.setattr(cp, "BUILD_WORK", 1.0)
    cp.clear_cache()
    conv = nn.Conv2d(12, 10, 3, bias=False)
    form = get_form("pw-dw-pw")
    (choice,) = [c for c in form.choices(conv, 40) if c.rank == 40]
    _, details = form.build(conv, 40)
    assert details["cp_iterations"] <= cp.CHOICE_ITERATIONS
    assert details["discarded_energy"] <= choice.error * (1 + 1e-9)
    cp.clear_cache()


def test_menu_points_bound_the_menu_work(monkeypatch):
    import fxsurgeon.forms.cp as cp

    assert cp.menu_points((64, 64, 3, 3), 269) == cp.CHOICE_POINTS  # CIFAR widths: the full grid
    shape = (112, 112, 3, 3)
    wide = cp.menu_points(shape, 484)
    assert cp.MIN_CHOICE_POINTS < wide < cp.CHOICE_POINTS
    work = [sum(2 * 112 * 112 * 9 * r * cp.als_sweeps(shape, r, build=False) for r in cp.cp_rank_grid(shape, 484, n))
            for n in (wide, wide + 1)]
    assert work[0] <= cp.MENU_WORK < work[1]  # the most points within the work
    assert cp.menu_points((2048, 2048, 3, 3), 9000) == cp.MIN_CHOICE_POINTS  # floor, even past the work
    # the menu follows it
    monkeypatch.setattr(cp, "MENU_WORK", 1.0)
    cp.clear_cache()
    conv = nn.Conv2d(12, 10, 3, bias=False)
    menu = get_form("pw-dw-pw").choices(conv, 40)
    assert [c.rank for c in menu] == cp.cp_rank_grid(conv.weight.shape, 40, cp.MIN_CHOICE_POINTS)
    cp.clear_cache()


def test_random_init_keeps_shapes_and_bias():
    conv = nn.Conv2d(8, 12, 3, padding=1, bias=True)
    sep, f = make_cp_separable(conv, 10, init="random")
    assert f is None and sep.reduce.weight.shape == (10, 8, 1, 1)
    assert torch.equal(sep.pointwise.bias, conv.bias)


def test_bad_inputs_are_surgery_errors():
    conv = nn.Conv2d(8, 8, 3)
    with pytest.raises(SurgeryError, match="rank"):
        cp_factors(conv.weight, 0)
    with pytest.raises(SurgeryError, match="NaN"):
        cp_factors(torch.full((4, 4, 3, 3), float("nan")), 2)
    with pytest.raises(SurgeryError, match="meta"):
        cp_factors(torch.empty(4, 4, 3, 3, device="meta"), 2)
    with pytest.raises(SurgeryError, match="groups"):
        make_cp_separable(nn.Conv2d(8, 8, 3, groups=2), 4)


# ------------------------------------------------------------------------------- the separable pass's forms


def bn_net(seed: int = 0) -> nn.Module:
    """conv → BN → ReLU → conv → BN with trained-looking (uneven) BN statistics."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16))
    for bn in (net[1], net[4]):
        bn.weight.data = torch.rand(16, generator=g) * 2 + 0.01
        bn.weight.data[:4] = 0.02  # nearly dead channels
        bn.bias.data = torch.randn(16, generator=g)
        bn.running_var = torch.rand(16, generator=g) * 3 + 0.1
        bn.running_mean = torch.randn(16, generator=g)
    return net.eval()


def built_weight(sep: SeparableConv2d) -> torch.Tensor:
    if "reduce" in dict(sep.named_children()):
        return cp_weight(sep)
    dw, pw = sep.depthwise.weight.detach(), sep.pointwise.weight.detach()[:, :, 0, 0]
    m = dw.shape[0] // sep.depthwise.in_channels
    c_in = sep.depthwise.in_channels
    return torch.einsum("ocj,cjhw->ochw", pw.reshape(pw.shape[0], c_in, m), dw.reshape(c_in, m, *dw.shape[2:]))


@pytest.mark.parametrize("multiplier", [1, 3])
def test_auto_never_worse_than_either_form_at_the_same_macs(multiplier):
    from fxsurgeon.budget.allotment import rank_within

    net = bn_net()
    x = torch.randn(1, 12, 8, 8)
    out = fxsurgeon.convert(net, separable=dict(form="auto", multiplier=multiplier), conv_head=False,
                            example_inputs=x)
    rewrites = [r for r in fxsurgeon.get_record(out).rewrites if r.pass_name == "separable"]
    assert [r.target for r in rewrites] == ["0", "3"]
    for r, (p_in, p_out) in zip(rewrites, [(64, 64), (64, 16)]):
        conv = net.get_submodule(r.target)
        w = conv.weight.detach().double()
        # the two single forms at this layer's allotment, computed independently of the pass
        dwpw_err = float(separable_error_curve(conv.weight)[multiplier])
        allotment = get_form("dw-pw").cost(conv, multiplier).macs(p_in, p_out)
        rank = rank_within(get_form("pw-dw-pw"), conv, allotment, p_in, p_out)
        assert get_form("pw-dw-pw").cost(conv, rank + 1).macs(p_in, p_out) > allotment
        cp_err = cp_factors(conv.weight, rank).error
        chosen = float((built_weight(out.get_submodule(r.target)).double() - w).pow(2).sum())
        assert chosen <= min(dwpw_err, cp_err) * (1 + 1e-5) + 1e-12
        assert r.details["macs_after"] <= allotment
        assert set(r.details["auto"]) == {"dw-pw", "pw-dw-pw"}


def test_pw_dw_pw_multiplier_is_the_mac_allotment_of_dw_pw():
    net = bn_net()
    x = torch.randn(1, 12, 8, 8)
    out = fxsurgeon.convert(net, separable=dict(form="pw-dw-pw", multiplier=2), conv_head=False, example_inputs=x)
    for r in fxsurgeon.get_record(out).rewrites:
        if r.pass_name != "separable":
            continue
        conv = net.get_submodule(r.target)
        p_in, p_out = (64, 64) if r.target == "0" else (64, 16)
        allotment = get_form("dw-pw").cost(conv, 2).macs(p_in, p_out)
        d = r.details
        assert d["form"] == "pw-dw-pw" and d["macs_after"] <= allotment < d["macs_after"] + (12 * 4 + 9 + 16) * 64
        assert d["macs_before"] == conv.weight.numel() * p_out
        assert {"rank", "relative_error", "discarded_energy", "cp_iterations"} <= set(d)
        assert out.get_submodule(r.target).depthwise.out_channels == d["rank"]


def test_bn_weighting_exact_at_full_rank_and_optimal_in_the_weighted_norm():
    net = bn_net()
    x = torch.randn(2, 12, 8, 8)
    exact = fxsurgeon.convert(net, separable=dict(form="pw-dw-pw", multiplier="full", weighting="bn"),
                              conv_head=False, example_inputs=x)  # exact claim: verified by convert()
    torch.testing.assert_close(exact(x), net(x), rtol=1e-4, atol=1e-4)
    recs = {r.target: r for r in fxsurgeon.get_record(exact).rewrites if r.pass_name == "separable"}
    assert "following BatchNorm" in recs["0"].details["weighting"]
    assert "relu(bn)" in recs["3"].details["weighting"]  # conv 3 reads ReLU(BN(·))

    bn = net[4]
    s = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().double().view(-1, 1, 1, 1)
    conv = net[3]
    for form, layers in (("dw-pw", {"3": {"form": "dw-pw", "rank": 2}}),
                         ("pw-dw-pw", {"3": {"form": "pw-dw-pw", "rank": 24}})):
        errs = {}
        for weighting in (None, "bn"):
            out = fxsurgeon.convert(net, separable=dict(form=form, layers=layers, weighting=weighting,
                                                        exclude=["0"]), conv_head=False)
            d = (built_weight(out.get_submodule("3")).double() - conv.weight.double())
            errs[weighting] = (float((s * d).pow(2).sum()), float(d.pow(2).sum()))
        assert errs["bn"][0] < errs[None][0]  # what weighting minimises
        assert errs[None][1] <= errs["bn"][1] * (1 + 1e-6) or form == "pw-dw-pw"  # what plain minimises


def test_budget_across_forms_is_met():
    from fvcore.nn import FlopCountAnalysis

    net = bn_net()
    x = torch.randn(1, 12, 8, 8)

    def count(m):
        fa = FlopCountAnalysis(m.eval(), x)
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        return fa.total()

    for target in (0.5, 0.3):
        out = fxsurgeon.convert(net, separable=dict(form="auto", target_macs=target), conv_head=False,
                                example_inputs=x)
        rewrites = [r for r in fxsurgeon.get_record(out).rewrites if r.pass_name == "separable"]
        assert rewrites and {r.details["form"] for r in rewrites} <= {"dw-pw", "pw-dw-pw"}
        assert count(out) <= target * count(net)


def test_form_option_errors():
    net = bn_net()
    with pytest.raises(SurgeryError, match="auto"):
        fxsurgeon.convert(net, separable=dict(form="tucker"))
    with pytest.raises(SurgeryError, match="energy"):
        fxsurgeon.convert(net, separable=dict(form="pw-dw-pw", energy=0.9))
    with pytest.raises(SurgeryError, match="weighting"):
        fxsurgeon.convert(net, separable=dict(weighting="data"))
