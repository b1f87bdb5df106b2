import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.modules import SeparableConv2d, make_separable
from fxsurgeon.passes.separable import separable
from fxsurgeon.tracing import trace


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_seed_example_2_parameter_counts():
    conv = nn.Conv2d(32, 64, 3, padding=1, bias=False)
    assert n_params(conv) == 18_432
    gm = trace(nn.Sequential(conv))
    res = separable(gm, multiplier=1)
    assert len(res.rewrites) == 1 and not res.rewrites[0].exact
    assert n_params(gm) == 2_336  # 288 depthwise + 2,048 pointwise
    sep = gm.get_submodule("0")
    assert isinstance(sep, SeparableConv2d)
    assert sep.depthwise.groups == 32 and sep.depthwise.weight.shape == (32, 1, 3, 3)
    assert sep.pointwise.weight.shape == (64, 32, 1, 1)
    assert gm(torch.randn(1, 32, 32, 32)).shape == (1, 64, 32, 32)


CONV_VARIANTS = [
    dict(stride=2, padding=1),
    dict(padding=2, dilation=2),
    dict(padding=1, bias=True),
    dict(padding="same"),
    dict(padding="same", dilation=3),
    dict(padding=1, padding_mode="reflect"),
    dict(padding=1, padding_mode="circular"),
    dict(padding=1, padding_mode="replicate", stride=2),
    dict(padding=(1, 0), stride=(1, 2)),
]


@pytest.mark.parametrize("kwargs", CONV_VARIANTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_full_multiplier_exact_on_conv_variants(kwargs):
    conv = nn.Conv2d(8, 12, 3, **kwargs).double()
    sep, factors = make_separable(conv, 9)
    assert factors.multiplier == 9
    x = torch.randn(2, 8, 11, 13, dtype=torch.float64)
    torch.testing.assert_close(sep(x), conv(x), rtol=1e-9, atol=1e-9)


def test_non_square_and_5x5_with_kernel_sizes_all():
    net = nn.Sequential(nn.Conv2d(6, 20, (1, 5), padding=(0, 2)), nn.ReLU(), nn.Conv2d(20, 20, 5, padding=2))
    x = torch.randn(1, 6, 9, 9)
    out = fxsurgeon.convert(net, separable=dict(multiplier="full", kernel_sizes="all"), example_inputs=x)
    rec = fxsurgeon.get_record(out)
    assert [r.target for r in rec.rewrites] == ["0", "2"] and rec.exact
    default = fxsurgeon.get_record(fxsurgeon.convert(net, example_inputs=x))
    reasons = {s.target: s.reason for s in default.skipped}
    assert "not square" in reasons["0"] and "not in kernel_sizes" in reasons["2"]


def test_every_spatial_conv_is_accounted_for():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.body = nn.Conv2d(16, 32, 3, padding=1)
            self.pw = nn.Conv2d(32, 32, 1)
            self.c1d = nn.Conv1d(4, 4, 3)
            self.unused = nn.Conv2d(16, 16, 3)
            self.w = nn.Parameter(torch.randn(32, 32, 3, 3))

        def forward(self, x):
            x = self.body(self.dw(self.grouped(self.stem(x))))
            x = F.conv2d(self.pw(x), self.w, padding=1)
            return x, self.c1d(x.flatten(2)[:, :4])

    rec = fxsurgeon.get_record(fxsurgeon.convert(Net(), example_inputs=torch.randn(1, 3, 8, 8)))
    assert [r.target for r in rec.rewrites] == ["body"]
    reasons = {s.target: s.reason for s in rec.skipped}
    assert "stem" in reasons["stem"]
    assert "groups=4" in reasons["grouped"] and "groups=16" in reasons["dw"]
    assert "not a 2-D" in reasons["c1d"]
    assert "not used by the traced forward" in reasons["unused"]
    assert any("functionally" in r for r in reasons.values())
    assert "pw" not in reasons  # 1x1 convs are not candidates


def test_include_stem_and_unprofitable():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3))
    rec = fxsurgeon.get_record(fxsurgeon.convert(net, separable=dict(multiplier=4)))
    reasons = {s.target: s.reason for s in rec.skipped}
    assert "stem" in reasons["0"] and "not profitable" in reasons["1"]
    rec = fxsurgeon.get_record(
        fxsurgeon.convert(net, separable=dict(multiplier=4, include_stem=True, include_unprofitable=True))
    )
    assert len(rec.rewrites) == 2


def test_energy_option_and_exclude():
    net = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
    rec = fxsurgeon.get_record(fxsurgeon.convert(net, separable=dict(energy=0.5, exclude=["2"])))
    assert [r.target for r in rec.rewrites] == ["0"]
    assert 1 <= rec.rewrites[0].details["multiplier"] <= 9
    assert rec.rewrites[0].details["relative_error"] <= 0.5**0.5 + 1e-9
    assert {s.target: s.reason for s in rec.skipped}["2"].startswith("excluded")


def test_shared_conv_converted_once_and_stays_shared():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)
            self.alias = self.conv  # same module under a second name

        def forward(self, x):
            return self.alias(torch.relu(self.conv(x)))

    model = Shared()
    x = torch.randn(1, 16, 8, 8)
    out = fxsurgeon.convert(model, separable=dict(multiplier="full"), example_inputs=x)
    rec = fxsurgeon.get_record(out)
    assert len(rec.rewrites) == 1
    assert isinstance(out.conv, SeparableConv2d)
    assert sum(n.op == "call_module" and n.target == "conv" for n in out.graph.nodes) == 2
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)


def test_random_init_is_not_exact():
    conv = nn.Sequential(nn.Conv2d(16, 32, 3))
    rec = fxsurgeon.get_record(fxsurgeon.convert(conv, separable=dict(multiplier=2, init="random")))
    assert rec.rewrites[0].details["init"] == "random" and not rec.rewrites[0].exact


@pytest.mark.parametrize(
    "opts, match",
    [
        (dict(multiplier=0), "multiplier"),
        (dict(multiplier="half"), "multiplier"),
        (dict(energy=2.0), "energy"),
        (dict(energy=0.9, multiplier=2), "either"),
        (dict(init="xavier"), "init"),
        (dict(kernel_sizes=[0]), "kernel_sizes"),
        (dict(mutliplier=2), "unknown option 'mutliplier'"),
    ],
)
def test_bad_options_are_refused(opts, match):
    with pytest.raises(SurgeryError, match=match):
        fxsurgeon.convert(nn.Sequential(nn.Conv2d(8, 8, 3)), separable=opts)


def test_weight_standardised_conv_is_not_split():
    timm = pytest.importorskip("timm")
    from timm.layers import StdConv2d

    net = nn.Sequential(StdConv2d(8, 16, 3, padding=1))
    rec = fxsurgeon.get_record(fxsurgeon.convert(net))
    assert not rec.rewrites
    # timm traces through StdConv2d.forward: what reaches the graph is a functional conv on its weight
    assert "called functionally" in {s.target: s.reason for s in rec.skipped}["0"]
    leaf = fxsurgeon.get_record(fxsurgeon.convert(net, leaf_modules=[StdConv2d]))
    assert "overrides forward" in {s.target: s.reason for s in leaf.skipped}["0"]
    del timm


def test_timm_conv2d_same_keeps_dynamic_padding():
    pytest.importorskip("timm")
    from timm.layers import Conv2dSame

    net = nn.Sequential(Conv2dSame(8, 16, 3, stride=2))
    x = torch.randn(1, 8, 15, 15)
    out = fxsurgeon.convert(net, separable=dict(multiplier="full"), example_inputs=x)
    assert len(fxsurgeon.get_record(out).rewrites) == 1
    torch.testing.assert_close(out(x), net(x), rtol=1e-4, atol=1e-5)


def test_per_layer_settings_override_and_replay():
    net = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
    out = fxsurgeon.convert(net, separable=dict(multiplier=1, layers={"2": {"form": "dw-pw", "rank": 3}}))
    rec = fxsurgeon.get_record(out)
    assert [(r.target, r.details["rank"]) for r in rec.rewrites] == [("0", 1), ("2", 3)]
    replay = {r.target: {"form": r.details["form"], "rank": r.details["rank"]} for r in rec.rewrites}
    again = fxsurgeon.convert(net, separable=dict(layers=replay))
    assert [m.weight.shape for m in again.modules() if isinstance(m, nn.Conv2d)] == [
        m.weight.shape for m in out.modules() if isinstance(m, nn.Conv2d)
    ]
    with pytest.raises(SurgeryError, match="rank"):
        fxsurgeon.convert(net, separable=dict(layers={"0": {"form": "dw-pw"}}))
    with pytest.raises(SurgeryError, match=r"unknown (separable )?form"):
        fxsurgeon.convert(net, separable=dict(form="tucker"))


def test_cifar_resnet20_loads_trained_weights_strictly():
    from fxsurgeon.models import default_data_dir, load_resnet20

    if not (default_data_dir() / "resnet20-12fca82f.th").exists():
        pytest.skip("shared/data not present")
    model = load_resnet20()
    assert sum(p.numel() for p in model.parameters()) == 269_722


def test_builds_on_a_thread_pool_match_one_after_the_other():
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Conv2d(16, 16, 3, padding=1, bias=i % 2 == 0) for i in range(6)]).eval()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one after the other
        one = fxsurgeon.convert(net, separable=dict(multiplier=2)).state_dict()
        torch.set_num_threads(3)  # three builds at a time
        pooled = fxsurgeon.convert(net, separable=dict(multiplier=2))
        again = fxsurgeon.convert(net, separable=dict(multiplier=2)).state_dict()
    finally:
        torch.set_num_threads(threads)
    assert [r.target for r in fxsurgeon.get_record(pooled).rewrites] == [str(i) for i in range(6)]
    state = pooled.state_dict()
    assert state.keys() == one.keys()
    for k in state:
        torch.testing.assert_close(state[k], one[k], rtol=1e-6, atol=1e-7)
        assert torch.equal(state[k], again[k])  # and the same bits run to run


def test_bias_correction_restores_the_output_mean_from_the_input_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(8) + 0.5)
        bn.bias.copy_(torch.randn(8))
    net = nn.Sequential(bn, nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, bias=False)).eval()
    x = torch.randn(64, 8, 12, 12)  # BN(x) ~ N(β, γ²): what the correction assumes
    plain = fxsurgeon.convert(net, separable=dict(multiplier=1))
    fixed = fxsurgeon.convert(net, separable=dict(multiplier=1, bias_correction=True))
    with torch.no_grad():
        ref, a, b = (m(x)[..., 1:-1, 1:-1].mean((0, 2, 3)) for m in (net, plain, fixed))
    assert (b - ref).abs().max() < 0.1 * (a - ref).abs().max()
    rw = fxsurgeon.get_record(fixed).rewrites[0]
    assert rw.details["bias_correction"]["input_mean"] == "relu(bn)"
    assert rw.details["params_after"] == 8 * 9 + 8 * 16 + 16  # depthwise, pointwise and the new bias
    assert fixed.get_submodule("2").pointwise.bias is not None and plain.get_submodule("2").pointwise.bias is None
    # no BatchNorm before the conv, or an exact rewrite: nothing to correct
    bare = fxsurgeon.convert(net[2:], separable=dict(multiplier=1, bias_correction=True))
    assert "bias_correction" not in fxsurgeon.get_record(bare).rewrites[0].details
    exact = fxsurgeon.convert(net, separable=dict(multiplier="full", bias_correction=True))
    assert "bias_correction" not in fxsurgeon.get_record(exact).rewrites[0].details
