import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError


def whole_models():
    timm = pytest.importorskip("timm")
    torchvision = pytest.importorskip("torchvision")
    return {
        # zero_init_last=False so residual branches matter and the check is not vacuous
        "timm_resnet18": lambda: timm.create_model("resnet18", pretrained=False, zero_init_last=False),
        "timm_regnetx_002": lambda: timm.create_model("regnetx_002", pretrained=False),
        "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0", pretrained=False),
        "tv_resnet18": lambda: torchvision.models.resnet18(),
        "tv_vgg11": lambda: torchvision.models.vgg11(),
    }


@pytest.mark.timm
@pytest.mark.parametrize("name", ["timm_resnet18", "timm_regnetx_002", "timm_efficientnet_b0", "tv_resnet18", "tv_vgg11"])
def test_full_multiplier_reproduces_whole_models(name, snapshot):
    model = whole_models()[name]().eval()
    check = snapshot(model)
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    out = fxsurgeon.convert(model, separable=dict(multiplier="full", include_stem=True), example_inputs=x)
    rec = fxsurgeon.get_record(out)
    assert rec.exact and rec.verification.rel_error < 1e-4
    torch.testing.assert_close(out(x), ref, rtol=1e-4, atol=1e-4)
    check()
    spatial = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    accounted = {r.target for r in rec.rewrites} | {s.target for s in rec.skipped if s.pass_name == "separable"}
    assert len(accounted) >= len(spatial)
    if name in ("timm_resnet18", "tv_resnet18", "tv_vgg11"):
        assert len(rec.rewrites) > 0


def test_default_convert_changes_model_and_keeps_caller_model(snapshot):
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
    model.train()
    model[1].eval()  # a mixed-mode model: one frozen BN
    model[0].weight.requires_grad_(False)
    check = snapshot(model)
    x = torch.randn(2, 3, 16, 16)
    out = fxsurgeon.convert(model, example_inputs=x)
    check()
    rec = fxsurgeon.get_record(out)
    assert [r.target for r in rec.rewrites] == ["3"]
    assert out.training and not out.get_submodule("1").training
    assert not out.get_submodule("0").weight.requires_grad
    assert rec.params_after < rec.params_before
    assert not rec.exact and rec.verification.rel_error > 0
    summary = fxsurgeon.summary(out)
    assert "separable: 1 rewritten" in summary and "relative L2 error" in summary


def test_inplace_skips_the_copy():
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32))
    out = fxsurgeon.convert(model, inplace=True)
    assert isinstance(out.get_submodule("0"), fxsurgeon.modules.SeparableConv2d)
    assert out.get_submodule("1") is model[1]  # shared, not copied
    assert fxsurgeon.convert(model).get_submodule("1") is not model[1]


def test_nothing_to_rewrite_says_zero():
    model = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU())
    x = torch.randn(1, 16, 4, 4)
    out = fxsurgeon.convert(model, example_inputs=x)
    assert "0 rewrites" in fxsurgeon.summary(out)
    torch.testing.assert_close(out(x), model(x))


def test_dtype_preserved_and_verification_tolerance():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).double()
    x = torch.randn(1, 16, 8, 8, dtype=torch.float64)
    out = fxsurgeon.convert(model, separable=dict(multiplier="full"), example_inputs=x)
    assert all(p.dtype == torch.float64 for p in out.parameters())
    v = fxsurgeon.get_record(out).verification
    assert v.dtype == "float64" and v.rel_error < 1e-9


def test_exact_claim_violated_is_an_error(monkeypatch):
    """If a rewrite claims exactness but changes the output, convert raises instead of warning."""
    import fxsurgeon.modules as mods

    real = mods.make_separable

    def broken(conv, m, init="svd"):
        sep, f = real(conv, m, init)
        with torch.no_grad():
            sep.pointwise.weight.mul_(1.5)
        return sep, f

    monkeypatch.setattr("fxsurgeon.forms.registry.make_separable", broken)
    model = nn.Sequential(nn.Conv2d(8, 8, 3))
    with pytest.raises(SurgeryError, match="claim to be exact"):
        fxsurgeon.convert(model, separable=dict(multiplier="full"), example_inputs=torch.randn(1, 8, 6, 6))


def test_bad_arguments():
    with pytest.raises(SurgeryError, match=r"nn\.Module"):
        fxsurgeon.convert("resnet18")
    with pytest.raises(SurgeryError, match="unknown convert"):
        fxsurgeon.convert(nn.ReLU(), seperable=True)
    with pytest.raises(SurgeryError, match="True, False or a dict"):
        fxsurgeon.convert(nn.ReLU(), separable="yes")
    with pytest.raises(SurgeryError, match="example_inputs"):
        fxsurgeon.convert(nn.ReLU(), example_inputs={"x": 1})
    model = nn.Sequential(nn.Conv2d(8, 8, 3))
    with pytest.raises(SurgeryError, match=r"shapes \[\(1, 3, 6, 6\)\]"):
        fxsurgeon.convert(model, example_inputs=torch.randn(1, 3, 6, 6))
    with pytest.raises(SurgeryError, match="no fxsurgeon record"):
        fxsurgeon.summary(model)


def test_timm_attributes_carried():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=7)
    out = fxsurgeon.convert(model)
    assert out.num_classes == 7 and out.pretrained_cfg["architecture"] == "resnet18"
    assert fxsurgeon.get_record(out).model == "resnet18"


def test_record_to_dict_is_json_even_with_tensor_options():
    import json

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 8, 3)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 1))

    x = torch.randn(2, 3, 8, 8)
    out = fxsurgeon.convert(Cat(), example_inputs=x, separable=False,
                            concat_fusion=dict(mode="reduce", out_channels=6, force=True, calibration=[x]))
    data = json.loads(json.dumps(fxsurgeon.get_record(out).to_dict()))
    assert data["options"]["concat_fusion"]["calibration"] == ["<tensor [2, 3, 8, 8] float32>"]
