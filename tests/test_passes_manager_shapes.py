"""Without example_inputs, convert() does not silently do less: shapes come from calibration batches, a timm
pretrained_cfg, or a meta-device probe, and the record says which (issue 18, "Shapes")."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.dec = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        b = self.enc(x)
        return self.dec(torch.cat([self.mid(b), b], dim=1))


class MeanHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.conv(x)).mean(dim=(-2, -1))))


def chain():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1)).eval()


def test_unet_concat_is_fused_from_a_probe_and_the_record_says_so():
    model = UNet().eval()
    x = torch.randn(2, 3, 16, 16)
    out = fxsurgeon.convert(model, separable=False, conv_head=False, concat_fusion=True)
    rec = out.meta["fxsurgeon"]
    assert [r.pass_name for r in rec.rewrites] == ["concat_fusion"] and not rec.skipped
    assert rec.extras["shapes"] == {"source": "probe", "input_shapes": [[2, 3, 224, 224]], "spatial": "nominal",
                                    "first_layer": "enc"}
    assert "nominal probe input" in rec.rewrites[0].details["macs_at"]  # its MACs are not the model's
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


def test_mean_head_is_converted_from_a_probe():
    model = MeanHead().eval()
    x = torch.randn(2, 3, 9, 9)
    out = fxsurgeon.convert(model, separable=False)
    rec = out.meta["fxsurgeon"]
    assert [r.target for r in rec.rewrites] == ["fc"] and not rec.skipped
    assert rec.extras["shapes"]["source"] == "probe"
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-6)


def test_mac_budget_takes_its_example_from_the_calibration_batches():
    batches = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    out = fxsurgeon.convert(chain(), separable=dict(target_macs=0.7, allocation="weight"), calibration=batches)
    rec = out.meta["fxsurgeon"]
    assert rec.extras["shapes"] == {"source": "calibration", "input_shapes": [[2, 3, 12, 12]], "spatial": "true"}
    assert rec.rewrites and "allocation" in rec.extras
    assert rec.tracing["example_inputs"] == [{"shape": [2, 3, 12, 12], "dtype": "float32"}]  # load can replay it


def test_timm_style_pretrained_cfg_gives_the_true_size():
    model = chain()
    model.pretrained_cfg = {"input_size": (3, 20, 20)}
    out = fxsurgeon.convert(model, separable=dict(target_macs=0.7))
    rec = out.meta["fxsurgeon"]
    assert rec.extras["shapes"] == {"source": "pretrained_cfg", "input_shapes": [[2, 3, 20, 20]], "spatial": "true"}
    assert rec.rewrites and not any("macs_at" in r.details for r in rec.rewrites)


def test_mac_budget_from_a_probe_is_refused_naming_the_remedy():
    with pytest.raises(SurgeryError, match=r"^separable: target_macs= needs the model's true input size .*"
                                           r"Pass example_inputs= \(or calibration=\)\.$"):
        fxsurgeon.convert(chain(), separable=dict(target_macs=0.6))


def test_a_probe_the_model_does_not_take_leaves_the_old_skips_with_the_remedy():
    class Fixed(MeanHead):
        def forward(self, x):  # takes 9×9 inputs only: the nominal probe fails
            x = x.view(x.shape[0], 3, 9, 9)
            return super().forward(x)

    out = fxsurgeon.convert(Fixed().eval(), separable=False)
    rec = out.meta["fxsurgeon"]
    assert rec.extras["shapes"]["source"] == "probe" and rec.extras["shapes"]["failed"].startswith("RuntimeError")
    assert "example_inputs" not in rec.tracing
    assert not rec.rewrites and rec.skipped and all("pass example_inputs" in s.reason for s in rec.skipped)
    x = torch.randn(2, 3, 9, 9)
    assert fxsurgeon.convert(Fixed().eval(), separable=False, example_inputs=x).meta["fxsurgeon"].rewrites


def test_example_inputs_still_win():
    out = fxsurgeon.convert(UNet().eval(), example_inputs=torch.randn(1, 3, 8, 8), separable=False,
                            conv_head=False, concat_fusion=True)
    rec = out.meta["fxsurgeon"]
    assert "shapes" not in rec.extras and rec.rewrites[0].details["added_macs"] == 16 * 16 * 64
