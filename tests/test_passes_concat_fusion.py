import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.passes.concat_fusion import concat_fusion, find_concats, second_moments
from fxsurgeon.tracing import trace


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small models: on the shared 2-core CI box, thread hand-offs cost more than they save
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ONLY = {p: False for p in fxsurgeon.list_passes() if p != "concat_fusion"}  # isolate this pass


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def convert(model, x, **opts):
    return fxsurgeon.convert(model, example_inputs=x, **ONLY, concat_fusion=opts or True)


def record(gm):
    return fxsurgeon.get_record(gm)


def conv_macs(model, inputs):
    """Conv/linear MACs by fvcore (one fused multiply-add = one "flop" in fvcore's count)."""
    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(model.eval(), inputs)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return fca.total()


def set_low_rank(conv, rank):
    """Give a conv/linear a weight whose stacked (C_o·k·k, C_in) matrix has exactly ``rank``."""
    w = conv.weight
    rows = w.numel() // w.shape[1]
    m = torch.randn(rows, rank) @ torch.randn(rank, w.shape[1])
    with torch.no_grad():
        if w.dim() == 4:
            c_o, c, kh, kw = w.shape
            w.copy_(m.reshape(c_o, kh, kw, c).permute(0, 3, 1, 2))
        else:
            w.copy_(m)


# ------------------------------------------------------------------------------------------------ models


class SeedFusion(nn.Module):
    """Seed example 3: (1, 32, 16, 16) and (1, 64, 16, 16) → cat → Conv2d(96, 48, 1, bias=True)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(96, 48, 1)

    def forward(self, a, b):
        return self.mix(torch.cat([a, b], 1))


def cbr(cin, cout, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    """A small U-Net with three skip concats in three styles.

    dec3: cat → conv3×3-BN-ReLU (classic); dec2: cat → BN → ReLU → conv3×3 (pre-activation: the fusion must
    go after the ReLU); dec1: cat read by a conv3×3 and a 1×1 shortcut conv (two consumers, one fusion).
    """

    def __init__(self, c=8, n_out=2):
        super().__init__()
        self.enc1, self.enc2, self.enc3, self.mid = cbr(3, c), cbr(c, 2 * c), cbr(2 * c, 4 * c), cbr(4 * c, 8 * c)
        self.pool = nn.MaxPool2d(2)
        self.up3 = nn.ConvTranspose2d(8 * c, 4 * c, 2, stride=2)
        self.dec3 = cbr(8 * c, 4 * c)
        self.up2 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4 * c, 2 * c, 1))
        self.dec2_norm = nn.BatchNorm2d(4 * c)
        self.dec2 = nn.Conv2d(4 * c, 2 * c, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = nn.Conv2d(2 * c, c, 3, padding=1)
        self.short1 = nn.Conv2d(2 * c, c, 1)
        self.head = nn.Conv2d(c, n_out, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        m = self.mid(self.pool(e3))
        d3 = self.dec3(torch.cat([self.up3(m), e3], dim=1))
        d2 = self.dec2(F.relu(self.dec2_norm(torch.cat((self.up2(d3), e2), 1))))
        s1 = torch.cat([self.up1(d2), e1], 1)
        d1 = F.relu(self.dec1(s1) + self.short1(s1))
        return self.head(d1)


def randomise_bn(model):
    """Non-trivial BatchNorm statistics, so eval-mode BN is not the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model


# ---------------------------------------------------------------------------------------------- seed / forms


def test_seed_example_3_shapes_and_parameter_counts():
    model = SeedFusion().eval()
    assert n_params(model) == 96 * 48 + 48 == 4_656
    a, b = torch.randn(1, 32, 16, 16), torch.randn(1, 64, 16, 16)
    assert model(a, b).shape == (1, 48, 16, 16)

    gm = trace(model)
    ShapeProp(gm).propagate(a, b)
    cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
    assert tuple(cat.meta["tensor_meta"].shape) == (1, 96, 16, 16)

    out = convert(model, (a, b))  # identity mode
    rw = record(out).rewrites
    assert len(rw) == 1 and rw[0].exact and rw[0].details["inputs"] == [32, 64]
    fusion = out.get_submodule(rw[0].details["module"])
    assert isinstance(fusion, nn.Conv2d) and fusion.weight.shape == (96, 96, 1, 1) and fusion.bias is None
    torch.testing.assert_close(fusion.weight.view(96, 96), torch.eye(96))
    assert n_params(out) == 4_656 + 9_216 and rw[0].details["added_params"] == 9_216
    assert rw[0].details["added_macs"] == 96 * 96 * 16 * 16  # per sample: identity adds cost
    assert out(a, b).shape == (1, 48, 16, 16)
    torch.testing.assert_close(out(a, b), model(a, b), rtol=0, atol=0)

    small = convert(model, (a, b), mode="reduce", out_channels=24)
    rw = record(small).rewrites[0]
    assert not rw.exact
    assert small.get_submodule(rw.details["modules"][0]).weight.shape == (24, 96, 1, 1)
    assert small.get_submodule("mix").weight.shape == (48, 24, 1, 1)
    assert n_params(small) == 24 * 96 + 48 * 24 + 48 == 3_504
    assert rw.details["macs_before"] == 96 * 48 * 256 and rw.details["macs_after"] == (96 * 24 + 24 * 48) * 256


class Forms(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.mix = nn.Conv2d(24, 16, 3, padding=1)

    def forward(self, a, b):
        f = self.form
        if f == "cat_list_dim1":
            y = torch.cat([a, b], 1)
        elif f == "cat_kw":
            y = torch.cat(tensors=(a, b), dim=1)
        elif f == "concat_neg3":
            y = torch.concat((a, b), -3)
        elif f == "concatenate_axis":
            y = torch.concatenate([a, b], axis=1)
        elif f == "cat_dim_kw_neg3":
            y = torch.cat((a, b), dim=-3)
        else:
            y = torch.ops.aten.cat.default([a, b], 1)
        return self.mix(y)


@pytest.mark.parametrize("form", ["cat_list_dim1", "cat_kw", "concat_neg3", "concatenate_axis", "cat_dim_kw_neg3",
                                  "aten"])
@pytest.mark.parametrize("mode", ["identity", "reduce"])
def test_every_concat_form_is_matched(form, mode):
    model = Forms(form).eval()
    set_low_rank(model.mix, 6)
    x = (torch.randn(2, 16, 5, 5), torch.randn(2, 8, 5, 5))
    opts = {"mode": mode, **({"out_channels": 6} if mode == "reduce" else {})}
    out = convert(model, x, **opts)
    rec = record(out)
    assert len(rec.rewrites) == 1 and rec.exact and not rec.skipped
    assert rec.rewrites[0].details["inputs"] == [16, 8]
    torch.testing.assert_close(out(*x), model(*x), rtol=1e-4, atol=1e-5)


class OtherAxes(nn.Module):
    def forward(self, a, b, v):
        return (torch.cat([a, b], dim=2).sum() + torch.cat([a, a], 0).sum() + torch.cat([v, v], 1).sum()
                + torch.cat([a, b], -1).sum())


def test_other_axes_and_ranks_are_skipped_with_reasons():
    x = (torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3), torch.randn(2, 5, 7))
    out = convert(OtherAxes(), x)
    rec = record(out)
    assert not rec.rewrites
    reasons = sorted(s.reason for s in rec.skipped)
    assert len(reasons) == 4
    assert sum("dim=2 of a 4-D tensor, not the channel axis" in r for r in reasons) == 1
    assert sum("dim=0 of a 4-D tensor" in r for r in reasons) == 1
    assert sum("dim=-1 of a 4-D tensor" in r for r in reasons) == 1
    assert sum("3-D tensors" in r for r in reasons) == 1


def test_without_shapes_every_concat_is_skipped():
    gm = trace(SeedFusion())
    res = concat_fusion(gm)
    assert not res.rewrites and "needs ShapeProp shapes" in res.skipped[0].reason


def test_find_concats_excludes_by_pattern():
    gm = trace(UNet())
    ShapeProp(gm).propagate(torch.randn(1, 3, 32, 32))
    found, skipped = find_concats(gm, exclude=["cat_1"])
    assert [c.node.name for c in found] == ["cat", "cat_2"]
    assert [s.reason for s in skipped] == ["excluded by the `exclude` option"]


# ------------------------------------------------------------------------------------------- identity mode


def test_identity_on_unet_is_exact_and_adds_the_recorded_cost(snapshot):
    model = randomise_bn(UNet()).eval()
    check = snapshot(model)
    x = torch.randn(2, 3, 32, 32)
    out = convert(model, x)
    check()
    rec = record(out)
    assert len(rec.rewrites) == 3 and rec.exact and not rec.skipped
    assert rec.verification.rel_error < 1e-6
    added = sum(r.details["added_params"] for r in rec.rewrites)
    assert rec.params_after - rec.params_before == added == 64**2 + 32**2 + 16**2
    macs_before, macs_after = conv_macs(model, x[:1]), conv_macs(out, x[:1])
    assert macs_after - macs_before == sum(r.details["added_macs"] for r in rec.rewrites)
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


def test_identity_nested_concats_and_training_mode():
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(12)

        def forward(self, a, b, c):
            return self.bn(torch.cat([torch.cat([a, b], 1), c], 1))

    model = Nested().train()
    x = (torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))
    out = convert(model, x)
    rec = record(out)
    assert len(rec.rewrites) == 2 and rec.exact
    assert out.training and all(m.training for m in out.modules())  # modes kept, new convs follow
    assert out.get_submodule(rec.rewrites[0].details["module"]).weight.requires_grad


def test_frozen_model_gets_frozen_fusions_and_exclude_takes_a_string():
    model = randomise_bn(UNet()).eval().requires_grad_(False)
    x = torch.randn(1, 3, 32, 32)
    out = convert(model, x, exclude="cat_1")  # concats in the root forward are named by node alone
    rec = record(out)
    assert [(s.target, s.reason) for s in rec.skipped] == [("cat_1", "excluded by the `exclude` option")]
    assert len(rec.rewrites) == 2 and not any(p.requires_grad for p in out.parameters())
    small = convert(model, x, mode="reduce", ratio=0.5)
    assert not any(p.requires_grad for p in small.parameters())


TIMM_CASES = [
    pytest.param("densenet121", 64, 58, 4, id="densenet121"),
    pytest.param("dla34", 64, 6, 0, id="dla34"),
    pytest.param("cspresnet50", 64, 4, 0, id="cspresnet50"),
    pytest.param("inception_v3", 75, 15, 0, id="inception_v3"),
]


@pytest.mark.timm
@pytest.mark.parametrize("name,size,n_rewrites,n_skipped", TIMM_CASES)
def test_identity_exact_on_timm_models(name, size, n_rewrites, n_skipped):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False).eval()
    out = convert(model, torch.randn(1, 3, size, size))
    rec = record(out)
    assert len(rec.rewrites) == n_rewrites and rec.exact and len(rec.skipped) == n_skipped
    assert all("single non-empty tensor" in s.reason for s in rec.skipped)  # densenet's first layers
    assert rec.verification.exact_expected and rec.verification.rel_error <= rec.verification.tolerance
    assert rec.params_after - rec.params_before == sum(r.details["added_params"] for r in rec.rewrites)


@pytest.mark.timm
def test_identity_exact_on_torchvision_googlenet():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False).eval()
    out = convert(model, torch.randn(1, 3, 64, 64))
    rec = record(out)
    assert len(rec.rewrites) == 9 and rec.exact and not rec.skipped
    assert rec.verification.rel_error <= rec.verification.tolerance


# --------------------------------------------------------------------------------------------- reduce mode


class SkipConcat(nn.Module):
    """cat(16 + 16) → BN → ReLU → conv3×3(32 → 8): the consumer sits behind per-channel ops."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.conv = nn.Conv2d(32, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))


def test_reduce_exact_when_out_channels_reaches_rank():
    model = randomise_bn(SkipConcat()).eval()
    set_low_rank(model.conv, 12)  # (8·9, 32) stacked matrix of rank 12
    x = torch.randn(2, 3, 10, 10)
    out = convert(model, x, mode="reduce", out_channels=12)
    rec = record(out)
    rw = rec.rewrites[0]
    assert rw.exact and rw.details["sites"][0]["rank"] == 12
    assert rw.details["sites"][0]["after_node"] == "relu"  # after the nonlinearity, not after the concat
    assert out.get_submodule("conv").weight.shape == (8, 12, 3, 3)
    assert rw.details["macs_before"] == 32 * 8 * 9 * 100 and rw.details["macs_after"] == (32 * 12 + 12 * 8 * 9) * 100
    assert rec.verification.rel_error < 1e-5
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)
    # one channel fewer than the rank is approximate, and says so
    less = record(convert(model, x, mode="reduce", out_channels=11)).rewrites[0]
    assert not less.exact and less.details["discarded_energy"] > 0


def test_reduce_error_equals_discarded_energy_on_a_single_consumer():
    """With the 32 positions of the input an orthonormal basis of the 32 channels, the output error is
    exactly the weights' error, which the record reports as the discarded energy."""
    model = SeedFusion().double().eval()
    model.mix = nn.Conv2d(32, 20, 1).double()

    def basis(c0, c1):
        eye = torch.eye(32, dtype=torch.float64)[c0:c1]
        return eye.reshape(1, c1 - c0, 4, 8)

    a, b = basis(0, 12), basis(12, 32)
    out = convert(model, (a, b), mode="reduce", out_channels=7)
    rw = record(out).rewrites[0]
    with torch.no_grad():
        err2 = float((out(a, b) - model(a, b)).pow(2).sum())
    s = torch.linalg.svdvals(model.mix.weight.detach().view(20, 32))
    assert rw.details["discarded_energy"] == pytest.approx(float(s[7:].pow(2).sum()), rel=1e-9)
    assert err2 == pytest.approx(rw.details["discarded_energy"], rel=1e-9)
    assert rw.details["relative_error"] == pytest.approx((s[7:].pow(2).sum() / s.pow(2).sum()).sqrt().item())


def test_reduce_unet_ratio_half_fewer_macs_and_error_recorded():
    model = randomise_bn(UNet()).eval()
    x = torch.randn(1, 3, 32, 32)
    out = convert(model, x, mode="reduce", ratio=0.5)
    rec = record(out)
    assert len(rec.rewrites) == 3 and not rec.skipped and not rec.exact
    before, after = conv_macs(model, x), conv_macs(out, x)
    assert after < before
    # the record's per-concat figures are the conv MACs fvcore sees change
    assert before - after == sum(r.details["macs_before"] - r.details["macs_after"] for r in rec.rewrites)
    for rw in rec.rewrites:
        assert rw.details["out_channels"] == rw.details["channels"] // 2
        assert 0 < rw.details["relative_error"] < 1 and rw.details["discarded_energy"] > 0
    dec1 = next(r for r in rec.rewrites if "dec1" in str(r.details["sites"][0]["consumers"]))
    assert len(dec1.details["sites"]) == 1 and dec1.details["sites"][0]["consumers"] == ["dec1", "short1"]
    assert 0 < rec.verification.rel_error < 1
    assert out(x).shape == model(x).shape
    json.dumps(rec.to_dict())


class InceptionLike(nn.Module):
    """cat → three 1×1 branches and an avg-pool branch (Inception); the pool commutes with the fusion."""

    def __init__(self, c=32):
        super().__init__()
        self.b1, self.b2, self.b3 = nn.Conv2d(c, 8, 1), nn.Conv2d(c, 6, 1), nn.Conv2d(c, 4, 3, padding=1)
        self.bp = nn.Conv2d(c, 8, 1)

    def forward(self, a, b):
        x = torch.cat([a, b], 1)
        p = F.avg_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.bp(p)], 1)


def test_reduce_shares_one_fusion_across_an_average_pool():
    model = InceptionLike().eval()
    shared = torch.randn(10, 32)  # every branch reads the same 10-D subspace: stacked rank 10
    for conv in (model.b1, model.b2, model.b3, model.bp):
        w = conv.weight
        with torch.no_grad():
            mix = torch.randn(w.shape[0] * w.shape[2] * w.shape[3], 10) @ shared
            w.copy_(mix.reshape(w.shape[0], w.shape[2], w.shape[3], 32).permute(0, 3, 1, 2))
    x = (torch.randn(2, 12, 9, 9), torch.randn(2, 20, 9, 9))
    out = convert(model, x, mode="reduce", out_channels=10)
    rec = record(out)
    first = rec.rewrites[0]
    assert first.exact and len(first.details["sites"]) == 1
    site = first.details["sites"][0]
    assert site["after_node"] == "cat" and site["replayed"] == ["avg_pool2d"]
    assert sorted(site["consumers"]) == ["b1", "b2", "b3", "bp"]
    # the pool now averages the 10 fused channels; the original 32-channel pool is gone
    pools = [n for n in out.graph.nodes if n.target is F.avg_pool2d]
    assert len(pools) == 1 and pools[0].args[0].target == first.details["modules"][0]
    torch.testing.assert_close(out(*x), model(*x), rtol=1e-4, atol=1e-4)
    # the output concat feeds the model's output: a consumer outside the graph
    assert "model's output" in rec.skipped[0].reason


def test_reduce_hoists_the_fusion_before_an_upsample_and_handles_linear_heads():
    class UpHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(24, 6, 3, padding=1)
            self.fc = nn.Linear(24, 5)

        def forward(self, a, b):
            x = torch.cat([a, b], 1)
            u = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            return self.conv(u).mean((2, 3)) + self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))[:, :1]

    model = UpHead().eval()
    set_low_rank(model.conv, 4)
    set_low_rank(model.fc, 4)  # stacked rank 4 + 4: 8 fusion channels are exact
    x = (torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4))
    out = convert(model, x, mode="reduce", out_channels=8)
    rw = record(out).rewrites[0]
    assert rw.exact
    sites = rw.details["sites"]
    # the interpolate and the pool+flatten both commute: one fusion at the 4×4 concat serves both
    assert len(sites) == 1 and sites[0]["after_node"] == "cat"
    assert set(sites[0]["replayed"]) == {"interpolate", "adaptive_avg_pool2d", "flatten"}
    assert isinstance(out.get_submodule(rw.details["modules"][0]), nn.Conv2d)
    assert out.get_submodule("fc").in_features == 8
    torch.testing.assert_close(out(*x), model(*x), rtol=1e-4, atol=1e-5)


def test_reduce_linear_consumer_gets_a_linear_fusion():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, a, b):
            x = torch.cat([a, b], 1)
            return self.fc(F.relu(x.mean((2, 3))))

    model = Head().eval()
    x = (torch.randn(3, 32, 2, 2), torch.randn(3, 32, 2, 2))
    skipped = record(convert(model, x, mode="reduce", out_channels=10)).skipped
    assert "reduction costs more" in skipped[0].reason and "640 before" in skipped[0].reason
    out = convert(model, x, mode="reduce", out_channels=10, force=True)
    rw = record(out).rewrites[0]
    assert rw.exact and rw.details["sites"][0]["after_node"] == "relu"
    fusion = out.get_submodule(rw.details["modules"][0])
    assert isinstance(fusion, nn.Linear) and fusion.weight.shape == (10, 64)
    torch.testing.assert_close(out(*x), model(*x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- refusals


class Blocked(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case = case
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.gn = nn.GroupNorm(4, 32)
        self.other = nn.Conv2d(16, 32, 1)

    def forward(self, a, b):
        x = torch.cat([a, b], 1)
        case = self.case
        if case == "residual":
            return self.conv(x) + (x + self.other(a))
        if case == "split":
            return self.conv(x) + torch.cat(x.chunk(2, 1)[::-1], 1)
        if case == "depthwise":
            return self.conv(F.relu(x)) + self.dw(F.relu(x))
        if case == "output":
            return self.conv(x), x
        if case == "nested":
            return self.conv(torch.cat([x, a], 1)[:, :32])
        if case == "functional":
            return F.conv2d(x, self.conv.weight)
        if case == "groupnorm":
            return self.conv(self.gn(x))
        if case == "reused":
            return self.conv(x) + self.conv(self.other(a))
        if case == "inplace":
            y = F.relu(x)
            z = self.conv(y)
            y.relu_()
            return z + y.sum()
        raise AssertionError(case)


REFUSALS = {
    "residual": "residual add with another tensor",
    "split": "split/sliced by",
    "depthwise": "is depthwise (groups=32)",
    "output": "reaches the model's output",
    "nested": "feeds another concat at node",
    "functional": "consumed by a functional conv2d",
    "groupnorm": "GroupNorm) is neither a per-channel op",
    "reused": "is called at 2 places",
    "inplace": "mutates a tensor that other nodes also read",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_reduce_skips_unfoldable_consumers_with_the_reason(case):
    model = Blocked(case).eval()
    x = (torch.randn(1, 16, 6, 6), torch.randn(1, 16, 6, 6))
    out = convert(model, x, mode="reduce", ratio=0.25, force=True)
    rec = record(out)
    assert not rec.rewrites
    mine = [s for s in rec.skipped if s.target.endswith(":cat") or s.target == "cat"]
    assert len(mine) == 1 and REFUSALS[case] in mine[0].reason, mine[0].reason
    assert mine[0].reason.startswith("cannot reduce: ")
    assert rec.verification.rel_error == 0
    # identity mode is exact whatever reads the concat
    ident = record(convert(model, x))
    assert ident.exact and len(ident.rewrites) >= 1


def test_consumer_shared_by_two_concats_is_skipped_for_both():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 4, 3, padding=1)

        def forward(self, a, b, c):
            return self.conv(torch.cat([a, b], 1)) + self.conv(torch.cat([b, c], 1))

    x = tuple(torch.randn(1, 8, 5, 5) for _ in range(3))
    rec = record(convert(Shared().eval(), x, mode="reduce", out_channels=4, force=True))
    assert not rec.rewrites and len(rec.skipped) == 2
    assert all("is called at 2 places" in s.reason for s in rec.skipped)


def halve_input_rank(model, seed=0):
    """Right-multiply every groups=1 conv/linear weight by a rank-⌊C/2⌋ projector shared by all layers reading
    C channels: every concat's stacked consumer matrix then has rank ≤ ⌊C/2⌋ ≤ round(C/2), so reducing at
    ratio=0.5 must be exact, and convert() checks that on the whole network."""
    gen = torch.Generator().manual_seed(seed)
    projectors = {}
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "groups", 1) == 1 and m.weight.shape[1] > 1:
            c = m.weight.shape[1]
            if c not in projectors:
                q, _ = torch.linalg.qr(torch.randn(c, c // 2, generator=gen))
                projectors[c] = q @ q.T
            with torch.no_grad():
                if m.weight.dim() == 4:
                    m.weight.copy_(torch.einsum("oikl,ij->ojkl", m.weight, projectors[c]))
                else:
                    m.weight.copy_(m.weight @ projectors[c])
    return model


def test_reduce_at_rank_is_exact_on_the_unet():
    model = halve_input_rank(randomise_bn(UNet())).eval()
    rec = record(convert(model, torch.randn(2, 3, 32, 32), mode="reduce", ratio=0.5))
    assert len(rec.rewrites) == 3 and rec.exact and rec.verification.rel_error < 1e-5


@pytest.mark.timm
def test_reduce_at_rank_is_exact_on_googlenet():
    """Several fusions per concat (the max-pool branch does not commute), the rest shared: all rewired right."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False).eval()
    out = convert(halve_input_rank(model), torch.randn(1, 3, 64, 64), mode="reduce", ratio=0.5, force=True)
    rec = record(out)
    assert len(rec.rewrites) == 9 and rec.exact and not rec.skipped
    # two fusions per block (before the 1×1 branches, after the pool branch's max pool; after the stage's
    # max pool where one follows the block), one before the classifier of the last block
    assert [len(r.details["sites"]) for r in rec.rewrites] == [2] * 8 + [1]
    assert [s["after_node"] for s in rec.rewrites[1].details["sites"]] == ["maxpool3", "inception4a_branch4_0"]
    assert rec.rewrites[-1].details["sites"][0]["consumers"] == ["fc"]
    assert rec.verification.rel_error < 1e-5


@pytest.mark.timm
def test_reduce_densenet121_skips_where_reduction_costs_more():
    timm = pytest.importorskip("timm")
    model = timm.create_model("densenet121", pretrained=False).eval()
    out = convert(model, torch.randn(1, 3, 64, 64), mode="reduce", ratio=0.5)
    rec = record(out)
    costly = [s for s in rec.skipped if s.reason.startswith("reduction costs more")]
    assert len(costly) == 57
    for s in costly:
        d = s.details
        assert d["macs_after"] >= d["macs_before"] and f"{d['macs_after']:,} MACs vs {d['macs_before']:,}" in s.reason
    transition = next(s for s in costly if s.target == "features.denseblock1:cat_6")
    # 256 → 128 fusion + narrowed transition conv 128 → 128 vs the transition conv 256 → 128, at 16×16
    assert transition.details["macs_before"] == 256 * 128 * 256
    assert transition.details["macs_after"] == (256 * 128 + 128 * 128) * 256
    # only the narrow 96-channel dense layers gain: 96·48 + 48·128 < 96·128
    assert [r.details["channels"] for r in rec.rewrites] == [96]
    assert rec.rewrites[0].details["macs_after"] < rec.rewrites[0].details["macs_before"]


def test_reduce_nothing_to_reduce_and_option_errors():
    model, x = SeedFusion().eval(), (torch.randn(1, 32, 4, 4), torch.randn(1, 64, 4, 4))
    rec = record(convert(model, x, mode="reduce", out_channels=96))
    assert "nothing to reduce" in rec.skipped[0].reason
    for bad, match in [
        (dict(mode="squeeze"), "mode must be"),
        (dict(mode="reduce"), "exactly one of"),
        (dict(mode="reduce", ratio=0.5, out_channels=3), "exactly one of"),
        (dict(ratio=0.5), "only applies to mode='reduce'"),
        (dict(mode="reduce", ratio=1.5), "ratio must be"),
        (dict(mode="reduce", out_channels=0), "out_channels must be"),
        # calibration runs only where a reduction is approximate (here 24 < rank 48)
        (dict(mode="reduce", out_channels=24, calibration=42), "iterable of input batches"),
        (dict(mode="reduce", out_channels=24, calibration=[]), "calibration is empty"),
        (dict(mode="reduce", out_channels=24, calibration=[(x[0], x[1], x[1])]),
         "has 3 elements but the model takes 2"),
        (dict(mode="reduce", out_channels=24, calibration=[torch.randn(1, 32, 4, 4)]),
         "calibration batch 0"),
        (dict(bogus=1), "unknown option"),
    ]:
        with pytest.raises(SurgeryError, match=match):
            convert(model, x, **bad)


# ---------------------------------------------------------------------------------------------- data-aware


class Tiny(nn.Module):
    """Two branches → cat(32) → ReLU → 1×1 mix (32 → 16) → ReLU → 1×1 head: a dense regression net."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(4, 16, 5, padding=2)
        self.mix = nn.Conv2d(32, 16, 1)
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        y = F.relu(torch.cat([self.a(x), self.b(x)], 1))
        return self.head(F.relu(self.mix(y)))


def smooth_inputs(n, generator):
    """Spatially smooth, channel-correlated inputs (a low-resolution field upsampled, mixed, plus noise)."""
    low = torch.randn(n, 2, 4, 4, generator=generator)
    field = F.interpolate(low, size=(12, 12), mode="bilinear", align_corners=False)
    mixing = torch.tensor([[1.0, 0.2], [0.8, -0.5], [0.1, 1.0], [0.5, 0.5]])
    return torch.einsum("ck,nkhw->nchw", mixing, field) + 0.05 * torch.randn(n, 4, 12, 12, generator=generator)


def trained_tiny(steps=150):
    """Tiny trained for a few hundred Adam steps to imitate a fixed random teacher on smooth inputs."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():  # the same initial weights whichever test builds it first
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 3, 3, padding=1))
        model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = smooth_inputs(8, gen)
        with torch.no_grad():
            target = teacher(x)
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), gen, loss.item()


@pytest.fixture(scope="module")
def trained():
    model, gen, loss = trained_tiny()
    calib = [smooth_inputs(8, gen) for _ in range(4)]
    held_out = smooth_inputs(16, gen)
    return model, calib, held_out, loss


def test_data_aware_beats_data_free_on_a_trained_model(trained, snapshot):
    model, calib, held_out, loss = trained
    assert loss < 0.05  # it did learn the task
    check = snapshot(model)
    free = convert(model, held_out[:1], mode="reduce", out_channels=6)
    aware = convert(model, held_out[:1], mode="reduce", out_channels=6, calibration=calib)
    check()
    site_free = record(free).rewrites[0].details["sites"][0]
    site_aware = record(aware).rewrites[0].details["sites"][0]
    assert site_free["weighting"] == "weights" and site_aware["weighting"] == "activations"
    assert site_aware["calibration_positions"] == 4 * 8 * 12 * 12
    # the data-free SVD keeps more of the weights, the data-aware subspace more of the function
    assert site_free["relative_error"] < site_aware["relative_error"]

    with torch.no_grad():
        ref = model(held_out)

        def rel(m):
            return float((m(held_out) - ref).norm() / ref.norm())

        e_free, e_aware = rel(free), rel(aware)
    assert e_aware < 0.5 * e_free, (e_aware, e_free)
    # the record's calibration estimate of the mix conv's output error is the one seen on held-out data
    with torch.no_grad():
        mid_ref = model.mix(F.relu(torch.cat([model.a(held_out), model.b(held_out)], 1)))
        mid_new = aware.mix(aware.get_submodule(record(aware).rewrites[0].details["modules"][0])(
            F.relu(torch.cat([model.a(held_out), model.b(held_out)], 1))))
    bias = model.mix.bias.detach().view(1, -1, 1, 1)
    measured = float((mid_new - mid_ref).norm() / (mid_ref - bias).norm())
    assert measured == pytest.approx(site_aware["output_relative_error"], rel=0.25)


def test_convert_level_calibration_reaches_the_pass(trained):
    model, calib, held_out, _ = trained
    opts = dict(mode="reduce", out_channels=6)
    out = fxsurgeon.convert(model, example_inputs=held_out[:1], calibration=calib, **ONLY, concat_fusion=opts)
    assert record(out).rewrites[0].details["sites"][0]["weighting"] == "activations"
    # calibration=None in the pass options keeps the data-free factors (convert() may still refit after)
    out = fxsurgeon.convert(model, example_inputs=held_out[:1], calibration=calib, **ONLY,
                            concat_fusion={**opts, "calibration": None})
    assert record(out).rewrites[0].details["sites"][0]["weighting"] == "weights"


def test_second_moments_restores_modes_and_counts_positions():
    model = Tiny().train()
    gm = trace(model)
    cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
    batches = [torch.randn(2, 4, 6, 6), (torch.randn(3, 4, 6, 6),)]
    sigma, n = second_moments(gm, [cat], batches)[cat]
    assert n == 5 * 36 and sigma.shape == (32, 32)
    with torch.no_grad():
        xs = [b if isinstance(b, torch.Tensor) else b[0] for b in batches]
        ref = torch.cat([torch.cat([gm.a(x), gm.b(x)], 1) for x in xs], 0).double()
    v = ref.transpose(0, 1).reshape(32, -1)
    torch.testing.assert_close(sigma, v @ v.T / v.shape[1])
    assert gm.training and all(m.training for m in gm.modules())


def test_identity_mode_ignores_calibration():
    model, x = SeedFusion().eval(), (torch.randn(1, 32, 4, 4), torch.randn(1, 64, 4, 4))
    rec = record(convert(model, x, calibration=object()))
    assert rec.exact and len(rec.rewrites) == 1
