import itertools
import math
import random

import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.budget.allocation import LayerOptions, allocate, layer_options, uniform_allocation
from fxsurgeon.budget.plan import model_macs
from fxsurgeon.forms import FORMS, LayerChoice
from fxsurgeon.models import resnet20, resnet32


def menu(name, points, positions=1):
    """points: [(macs_per_position, error)], ranks 1..n; plus the original (0 error) at the end."""
    choices = tuple(LayerChoice("f", r + 1, m, 0, m, e, False) for r, (m, e) in enumerate(points))
    return LayerOptions(name, choices, positions, positions)


def brute_force(layers, max_macs):
    best = None
    for combo in itertools.product(*(lo.choices for lo in layers)):
        macs = sum(lo.macs(c) for lo, c in zip(layers, combo))
        if macs <= max_macs:
            obj = sum(lo.loss(c) for lo, c in zip(layers, combo))
            best = obj if best is None else min(best, obj)
    return best


def test_allocate_meets_budget_and_stays_within_a_step_of_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        layers = []
        for i in range(4):
            # decreasing error, increasing cost. Greedy on ratios passes through Lagrangian solutions (optimal
            # for their own cost), so it is within one hull step (at most one layer's error range) of optimal
            costs = sorted(rng.sample(range(5, 60), 4))
            errs, e = [], rng.uniform(5, 20)
            for _ in costs:
                errs.append(e)
                e *= rng.uniform(0.2, 0.6)
            layers.append(menu(f"l{i}", list(zip(costs, errs))))
        cheapest = sum(min(lo.macs(c) for c in lo.choices) for lo in layers)
        dearest = sum(max(lo.macs(c) for c in lo.choices) for lo in layers)
        budget = rng.uniform(cheapest, dearest)
        alloc = allocate(layers, max_macs=budget)
        assert alloc.macs <= budget
        assert alloc.macs == sum(lo.macs(alloc.picks[lo.name]) for lo in layers)
        opt = brute_force(layers, budget)
        worst_step = max(lo.loss(lo.choices[0]) - lo.loss(lo.choices[-1]) for lo in layers)
        assert opt <= alloc.objective + 1e-9 <= opt + worst_step + 1e-9


def test_allocate_spends_where_error_falls_fastest():
    # layer a loses a lot at its cheap choice, b hardly anything: the budget goes to a
    a = menu("a", [(10, 9.0), (20, 1.0)])
    b = menu("b", [(10, 2.0), (20, 1.5)])
    alloc = allocate([a, b], max_macs=30)
    assert alloc.picks["a"].rank == 2 and alloc.picks["b"].rank == 1
    assert alloc.ranks() == {"a": {"form": "f", "rank": 2}, "b": {"form": "f", "rank": 1}}


def test_allocate_refuses_an_impossible_budget_and_needs_one():
    a = menu("a", [(10, 9.0), (20, 1.0)])
    with pytest.raises(SurgeryError, match="cheapest"):
        allocate([a], max_macs=5)
    with pytest.raises(SurgeryError, match="budget"):
        allocate([a])


def test_allocate_with_two_budgets_meets_both():
    layers = [LayerOptions(n, (LayerChoice("f", 1, 5, 0, 30, 4.0, False), LayerChoice("f", 2, 30, 0, 5, 1.0, False)), 1, 1)
              for n in "abc"]
    alloc = allocate(layers, max_macs=70, max_params=70)
    assert alloc.macs <= 70 and alloc.params <= 70


def test_unknown_error_counts_as_infinite_unless_exact():
    nan = float("nan")
    lo = LayerOptions("a", (LayerChoice("f", 1, 1, 0, 1, nan, False), LayerChoice("f", 2, 2, 0, 2, nan, True)), 1, 1)
    assert lo.loss(lo.choices[0]) == math.inf and lo.loss(lo.choices[1]) == 0.0
    assert allocate([lo], max_macs=2).picks["a"].rank == 2


def test_layer_options_drop_ranks_dearer_than_the_conv():
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    lo = layer_options("c", conv, ["dw-pw"], positions_in=64, positions_out=64)
    orig = conv.weight.numel()
    assert lo.choices[-1].form == "original"
    assert all(c.macs_out < orig for c in lo.choices[:-1])
    assert lo.weight == pytest.approx(1 / float(conv.weight.double().pow(2).sum()))


def trained_like(model):
    """Give every 3×3 conv a decaying, layer-specific spectrum, as training does (random init is flat)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, m in enumerate(mod for mod in model.modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3)):
            c_out, c_in = m.weight.shape[:2]
            decay = 0.25 + 0.6 * ((i * 7) % 5) / 4  # some layers compress well, others not
            basis = torch.linalg.qr(torch.randn(9, 9, generator=g))[0]
            scales = decay ** torch.arange(9.0)
            w = torch.randn(c_out, c_in, 9, generator=g) * scales
            m.weight.copy_((w @ basis.T).reshape(m.weight.shape) * 0.1)
    return model


def sq_weight_error(record):
    total = 0.0
    for r in record.rewrites:
        if r.pass_name == "separable":
            total += r.details["relative_error"] ** 2
    return total


def whole_macs(model, x):
    return model_macs(model, (x,))[0]


def test_budget_meets_target_and_beats_uniform_multiplier(snapshot):
    model = trained_like(resnet20()).eval()
    check = snapshot(model)
    x = torch.randn(1, 3, 32, 32)
    before = whole_macs(model, x)
    uni = fxsurgeon.convert(model, example_inputs=x, separable=dict(multiplier=3))
    frac = whole_macs(uni, x) / before
    out = fxsurgeon.convert(model, example_inputs=x, separable=dict(target_macs=frac, allocation="weight",
                                                                    form="dw-pw"))
    rec = fxsurgeon.get_record(out)
    measured = whole_macs(out, x)
    assert measured <= frac * before
    summary = rec.extras["allocation"]
    assert summary["macs_counter"] == "fvcore"
    assert summary["macs_after"] == pytest.approx(measured)
    assert summary["macs_before"] == pytest.approx(before)
    # the same MACs, less total (relative, squared) decomposition error than one multiplier everywhere
    assert sq_weight_error(rec) < 0.9 * sq_weight_error(fxsurgeon.get_record(uni))
    for r in rec.rewrites:
        if r.pass_name == "separable":
            assert r.details["rank"] == summary["layers"][r.target]["rank"]
            assert r.details["allocation"]["macs"] > 0
    kept = [s for s in rec.skipped if "budget allocation" in s.reason]
    assert len(kept) + sum(r.pass_name == "separable" for r in rec.rewrites) == 18
    check()


def test_uniform_allocation_baseline_matches_the_pass():
    model = trained_like(resnet20()).eval()
    conv = model.layer2[1].conv1
    lo = layer_options("c", conv, ["dw-pw"], positions_in=256, positions_out=256)
    assert uniform_allocation([lo], "dw-pw", 3).picks["c"].rank == 3


def test_params_budget_without_example_inputs():
    model = trained_like(resnet20()).eval()
    before = sum(p.numel() for p in model.parameters())
    out = fxsurgeon.convert(model, separable=dict(target_params=0.5, form="dw-pw"))
    assert sum(p.numel() for p in out.parameters()) <= 0.5 * before
    assert fxsurgeon.get_record(out).extras["allocation"]["params_fraction"] <= 0.5


def test_budget_errors():
    model = resnet20().eval()
    with pytest.raises(SurgeryError, match="example_inputs"):
        fxsurgeon.convert(model, separable=dict(target_macs=0.5))
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(SurgeryError, match="exclude multiplier"):
        fxsurgeon.convert(model, example_inputs=x, separable=dict(target_macs=0.5, multiplier=2))
    with pytest.raises(SurgeryError, match="fraction"):
        fxsurgeon.convert(model, example_inputs=x, separable=dict(target_macs=1.5))
    with pytest.raises(SurgeryError, match="cannot be met"):
        fxsurgeon.convert(model, example_inputs=x, separable=dict(target_macs=0.05, form="dw-pw"))
    with pytest.raises(SurgeryError, match="calibration"):
        fxsurgeon.convert(model, example_inputs=x, separable=dict(target_macs=0.5, allocation="data"))


def test_budget_with_per_layer_override_counts_its_cost():
    model = trained_like(resnet20()).eval()
    x = torch.randn(1, 3, 32, 32)
    out = fxsurgeon.convert(model, example_inputs=x, separable=dict(
        target_macs=0.6, form="dw-pw", layers={"layer3.2.conv2": {"form": "dw-pw", "rank": 1}}))
    rec = fxsurgeon.get_record(out)
    assert {r.target: r.details["rank"] for r in rec.rewrites if r.pass_name == "separable"}["layer3.2.conv2"] == 1
    assert whole_macs(out, x) <= 0.6 * whole_macs(model, x)


@pytest.mark.slow
def test_same_defaults_on_a_deeper_resnet_with_data():
    model = trained_like(resnet32()).eval()
    x = torch.randn(1, 3, 32, 32)
    data = [torch.randn(4, 3, 32, 32)]
    out = fxsurgeon.convert(model, example_inputs=x, calibration=data, separable=dict(target_macs=0.5))
    rec = fxsurgeon.get_record(out)
    assert rec.extras["allocation"]["errors"] == "data"
    assert whole_macs(out, x) <= 0.5 * whole_macs(model, x)
    cal = rec.extras["calibration"]
    assert cal["output_error_after"] < cal["output_error_before"]


@pytest.mark.skipif("pw-dw-pw" not in FORMS, reason="the CP form is not registered")
def test_budget_across_forms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(24, 24, 3, stride=2, padding=1)).eval()
    trained_like(net)
    x = torch.randn(1, 3, 16, 16)
    out = fxsurgeon.convert(net, example_inputs=x, separable=dict(target_macs=0.6, form="auto"))
    rec = fxsurgeon.get_record(out)
    assert whole_macs(out, x) <= 0.6 * whole_macs(net, x)
    forms = {v["form"] for v in rec.extras["allocation"]["layers"].values()}
    assert forms <= set(FORMS) | {"original"}


def test_output_sensitivity_sees_what_the_network_amplifies():
    from fxsurgeon.calibrate import output_sensitivity

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)).eval()
    with torch.no_grad():
        # the second conv's output reaches the end through a 1×1 conv that keeps only its four weakest
        # channels: noise spread over all eight is large against what survives
        net[1].weight[:4] *= 0.1
        net[1].bias[:4] *= 0.1
        net[2].weight.zero_()
        net[2].weight[:4, :4, 0, 0] = torch.eye(4)
        net[2].bias.zero_()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    s = output_sensitivity(net, ["0", "1", "2"], data, samples=8)
    again = output_sensitivity(net, ["0", "1", "2"], data, samples=8)
    assert s == again  # seeded noise
    assert s["2"] == pytest.approx(1.0, rel=1e-6)  # noise on the output itself: relative error passes whole
    assert s["1"] > 5  # amplified: the same relative error at layer 1 moves the output far more
    assert not net._forward_hooks and all(not m._forward_hooks for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_budget_with_sensitivity_weighted_errors():
    model = trained_like(resnet20()).eval()
    x = torch.randn(1, 3, 32, 32)
    data = [torch.randn(8, 3, 32, 32)]
    out = fxsurgeon.convert(model, example_inputs=x, calibration=data,
                            separable=dict(target_macs=0.6, allocation="sensitivity", form="dw-pw"))
    rec = fxsurgeon.get_record(out)
    assert rec.extras["allocation"]["errors"] == "sensitivity"
    assert whole_macs(out, x) <= 0.6 * whole_macs(model, x)
    with pytest.raises(SurgeryError, match="calibration"):
        fxsurgeon.convert(model, example_inputs=x, separable=dict(target_macs=0.5, allocation="sensitivity"))


def _bn_net():
    """conv → BN → ReLU, twice, then a residual sum read by a conv → BN (its input mean has no BN of its own)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8, momentum=None)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(8, momentum=None)
            self.conv3 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(12, momentum=None)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)) + x)
            return self.bn3(self.conv3(y))

    torch.manual_seed(0)
    net = Net()
    data = torch.rand(256, 8, 6, 6) + torch.linspace(0, 2, 8).view(1, 8, 1, 1)
    with torch.no_grad():
        net.train()(data)
    return net.eval(), data


def test_input_means_inferred_from_the_batchnorm_after_the_conv():
    from torch.fx.passes.shape_prop import ShapeProp

    from fxsurgeon.forms.importance import input_channel_mean, output_bn_input_mean
    from fxsurgeon.tracing import trace

    net, data = _bn_net()
    gm = trace(net)
    ShapeProp(gm).propagate(data[:1])
    seen = {}

    def hook(mod, args, out):
        seen["x"] = args[0].mean((0, 2, 3))

    h = net.conv3.register_forward_hook(hook)
    with torch.no_grad():
        net(data)
    h.remove()
    inferred = output_bn_input_mean(gm, ["conv3"], net.conv3)  # input: ReLU(residual sum), no BN of its own
    assert inferred is not None and bool((inferred >= 0).all())
    # the model assumes each channel's mean is the same at every position (padding upstream breaks that a little)
    assert float((inferred - seen["x"].double()).norm() / seen["x"].norm()) < 0.1
    mean, how = input_channel_mean(gm, ["conv3"], net.conv3)
    assert "inferred" in how and torch.equal(mean, inferred)
    assert input_channel_mean(gm, ["conv2"], net.conv2)[1] == "relu(bn)"  # the input's own BN comes first
    # fewer outputs than inputs: the means are not determined
    assert output_bn_input_mean(gm, ["conv1"], net.conv1) is not None
    narrow = trace(nn.Sequential(nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)).eval())
    ShapeProp(narrow).propagate(torch.randn(1, 8, 6, 6))
    assert output_bn_input_mean(narrow, ["0"], narrow.get_submodule("0")) is None


def test_budget_defaults_are_recorded_and_options_given_win():
    from fxsurgeon.budget.allocation import BUDGET_DEFAULTS

    net, data = _bn_net()
    x = data[:1]
    out = fxsurgeon.convert(net, example_inputs=x, conv_head=False, separable=dict(target_macs=0.8))
    rec = fxsurgeon.get_record(out)
    assert rec.extras["allocation"]["defaults"] == BUDGET_DEFAULTS
    assert {r.details["form"] for r in rec.rewrites if r.pass_name == "separable"} <= {"dw-pw", "pw-dw-pw"}
    assert all("bias_correction" in r.details for r in rec.rewrites if r.pass_name == "separable")
    corrected = fxsurgeon.convert(net, example_inputs=x, conv_head=False,
                                  separable=dict(target_macs=0.8, bias_correction=True, layers={
                                      "conv3": {"form": "dw-pw", "rank": 2}}))
    crec = fxsurgeon.get_record(corrected)
    assert crec.extras["allocation"]["defaults"] == {k: v for k, v in BUDGET_DEFAULTS.items() if k != "bias_correction"}
    how = {r.target: r.details["bias_correction"]["input_mean"] for r in crec.rewrites if r.pass_name == "separable"}
    assert "inferred" in how["conv3"]  # its input is a residual sum: the mean comes from bn3's running mean
    given = fxsurgeon.convert(net, example_inputs=x, conv_head=False,
                              separable=dict(target_macs=0.8, form="dw-pw", bias_correction=False, weighting=None))
    grec = fxsurgeon.get_record(given)
    assert grec.extras["allocation"]["defaults"] == {"kernel_sizes": (3,)}
    assert all(r.details["form"] == "dw-pw" and "bias_correction" not in r.details
               for r in grec.rewrites if r.pass_name == "separable")
    auto = fxsurgeon.get_record(fxsurgeon.convert(net, example_inputs=x, conv_head=False,
                                                  separable=dict(target_macs=0.8, form="auto")))
    assert "form" not in auto.extras["allocation"]["defaults"]
    assert auto.extras["allocation"]["layers"]  # the menu has an entry per layer
    # no budget: the MobileNet form, unchanged
    uni = fxsurgeon.get_record(fxsurgeon.convert(net, example_inputs=x, conv_head=False))
    assert all(r.details["form"] == "dw-pw" and "bias_correction" not in r.details
               for r in uni.rewrites if r.pass_name == "separable")
    with pytest.raises(SurgeryError, match="weighting"):
        fxsurgeon.convert(net, example_inputs=x, conv_head=False, separable=dict(target_macs=0.8, weighting="no"))


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.c = nn.Conv2d(16, 24, 3, padding=1, bias=False)

    def forward(self, x):
        return self.c(self.b(self.a(x).relu()).relu())


def test_mac_budget_keeps_cp_errors_only_where_fxsurgeon_cache_dir_says(tmp_path, monkeypatch):
    from fxsurgeon.forms import cp

    x = torch.randn(1, 3, 12, 12)

    def convert():
        cp.clear_cache()
        out = fxsurgeon.convert(SmallNet().eval(), example_inputs=x, conv_head=False,
                                separable=dict(target_macs=0.5, form="pw-dw-pw"))
        return fxsurgeon.get_record(out).extras["allocation"]

    monkeypatch.delenv("FXSURGEON_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a default cache would land here: nothing may
    plain = convert()
    assert "cp_errors" not in plain and not (tmp_path / "home").exists()

    monkeypatch.setenv("FXSURGEON_CACHE_DIR", str(tmp_path / "root"))
    cold = convert()
    assert cold["cp_errors"]["fits"] > 0 and cold["cp_errors"]["hits"] == 0
    assert cold["cp_errors"]["cache_file"].startswith(str(tmp_path / "root" / "latency"))
    fits = []
    menu_factors = cp._menu_factors
    monkeypatch.setattr(cp, "_menu_factors", lambda w, r: fits.append(r) or menu_factors(w, r))
    warm = convert()
    assert fits == [] and warm["cp_errors"]["hits"] == cold["cp_errors"]["fits"]
    assert warm["layers"] == cold["layers"] == plain["layers"]  # the same errors, the same allocation
