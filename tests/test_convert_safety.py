"""convert() must not return a wrong model: verification against the caller's model, what torch.fx drops,
train/eval mode, state left as found, NaN/Inf, and errors that say whose input caused them (issue 17.5–8, 11)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError

BUG = "bug in fxsurgeon"


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


def exact(model, x=None, **kw):
    """An exact conversion: full-rank separable (exact) and the conv head (exact)."""
    return fxsurgeon.convert(model, example_inputs=x, separable=dict(multiplier="full"), **kw)


# ---------------------------------------------------------------------- 5: the caller's model is the reference


def test_root_pre_hook_that_changes_the_input_is_refused_not_verified_away():
    model = Plain().eval()
    model.register_forward_pre_hook(lambda m, args: (args[0] * 3.0,))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(SurgeryError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact(model, x)
    msg = str(err.value)
    assert "already differs" in msg and "'<root>' (forward pre-hook)" in msg and BUG not in msg
    assert "verify=False" in msg and "\n" not in msg


def test_measured_error_is_the_real_models():
    model = Plain().eval()
    # a forward hook on the root (lost by fx) that moves the output by a little, within the tolerance
    model.register_forward_hook(lambda m, args, out: out + 2e-5 * out.detach().abs().mean())
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = exact(model, x, tolerance=1e-3)
    v = out.meta["fxsurgeon"].verification
    with torch.no_grad():
        real = model(x)
        rel = float((out(x) - real).norm() / real.norm())
    assert v.traced_rel_error > 1e-6  # the traced copy alone was measured as different
    assert v.rel_error == pytest.approx(rel, rel=1e-3)  # the recorded error is the real model's, not 3e-7
    assert "hooks" in v.reference


class Autocast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.conv(x)
        return y.float()


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Autocast()
        self.head = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.head(self.block(x))


def test_autocast_in_forward_is_refused_even_without_example_inputs():
    with pytest.raises(SurgeryError) as err:
        exact(Wrapper().eval())
    msg = str(err.value)
    assert "autocast" in msg and "in 'block' at" in msg and "test_convert_safety.py" in msg and "leaf_modules" in msg


def test_autocast_inside_a_leaf_module_runs_as_written_and_verifies():
    model = Wrapper().eval()
    x = torch.randn(2, 3, 8, 8)
    out = exact(model, x, leaf_modules=[Autocast])
    v = out.meta["fxsurgeon"].verification
    assert v.traced_rel_error == 0.0 and v.rel_error < 1e-4
    assert [r.target for r in out.meta["fxsurgeon"].rewrites] == ["head"]


def test_no_grad_in_forward_is_warned_about():
    class NoGrad(Plain):
        def forward(self, x):
            with torch.no_grad():
                y = self.conv(x)
            return self.fc(torch.flatten(self.pool(y), 1))

    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"grad mode True → False in '<root>' at .*test_convert_safety.py"):
        out = exact(NoGrad().eval(), x)
    assert out.meta["fxsurgeon"].verification.rel_error < 1e-4


# ------------------------------------------------------------------------------- 6: which train/eval mode is baked


class TrainBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            y = F.dropout(y, 0.5, training=True)
        return y


def test_train_mode_model_is_converted_with_its_eval_branches_by_default(snapshot):
    model = TrainBranch().train()
    check = snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"train mode and the forward of '<root>'.*reads self.training.*mode='train'"):
        out = exact(model, x)
    check()
    assert out.training  # the caller's mode is put back
    rec = out.meta["fxsurgeon"]
    assert rec.tracing["mode"] == "eval" and rec.extras["mode"] == {"baked": "eval", "reads_training": [""]}
    assert "dropout" not in out.code
    out.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)


def test_mode_train_keeps_the_train_branches_and_is_recorded():
    model = TrainBranch().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for explicitly: no warning
        out = exact(model, mode="train")
    assert "dropout" in out.code and out.meta["fxsurgeon"].tracing["mode"] == "train"
    assert not out.training


@pytest.mark.parametrize("mode", ["Train", "", 1, True])
def test_mode_is_checked_by_type(mode):
    with pytest.raises(SurgeryError, match=r"^mode= takes 'eval' or 'train'"):
        exact(Plain().eval(), mode=mode)


# ------------------------------------------------------------------------- 7: convert()'s forwards leave no trace


class Counter(nn.Module):
    """Counts its calls in a buffer and adds the count: a forward that updates state."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return x + self.count


class CountingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.counter = Counter()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(self.counter(self.stem(x)))


def test_counter_in_a_leaf_module_is_left_as_found_and_verification_passes():
    model = CountingNet().eval()
    x = torch.randn(2, 3, 8, 8)
    out = exact(model, x, leaf_modules=[Counter], calibration=[torch.randn(4, 3, 8, 8)])
    assert float(out.counter.count) == 0.0 and float(model.counter.count) == 0.0
    assert [r.target for r in out.meta["fxsurgeon"].rewrites] == ["conv"]
    assert out.meta["fxsurgeon"].verification.rel_error < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-4)


def test_counter_fx_runs_while_tracing_is_put_back_and_named():
    model = CountingNet().eval()
    with pytest.warns(UserWarning, match=r"tracing CountingNet changed buffer\(s\) 'counter.count'.*leaf"):
        out = exact(model)  # no example_inputs: nothing to verify, but the state must not drift
    assert float(out.counter.count) == 0.0 and float(model.counter.count) == 0.0
    with pytest.raises(SurgeryError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact(model, torch.randn(2, 3, 8, 8))
    msg = str(err.value)
    assert "already differs" in msg and "'counter.count'" in msg and "leaf_modules" in msg and BUG not in msg


def test_batchnorm_statistics_unchanged_by_a_train_mode_conversion():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    out = exact(model, x, mode="train")
    for k, v in before.items():
        if k.startswith("1."):  # the BatchNorm: conv "2" is rewritten
            torch.testing.assert_close(out.state_dict()[k], v, rtol=0, atol=0, msg=k)
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert out.training and out.get_submodule("1").training


# --------------------------------------------------------------------- 8: NaN/Inf the original does not produce


class Overflow(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x) * 1e30 * 1e30, self.b(x)], 1)  # ±Inf in the first four channels
        return y.amax(dim=(2, 3))


def test_identity_concat_fusion_nan_from_inf_is_flagged_and_explained():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(SurgeryError) as err:
        fxsurgeon.convert(Overflow().eval(), example_inputs=x, separable=False, conv_head=False, concat_fusion=True)
    msg = str(err.value)
    assert "8 NaN" in msg and "4 ±Inf" in msg and "finite activations" in msg and BUG not in msg


def test_identity_concat_fusion_records_the_limit_of_exact():
    out = fxsurgeon.convert(Overflow().eval(), example_inputs=torch.randn(1, 3, 4, 4), verify=False,
                            separable=False, conv_head=False, concat_fusion=True)
    (rw,) = out.meta["fxsurgeon"].rewrites
    assert rw.exact and "finite activations" in rw.details["exact_for"]


def test_compare_outputs_same_inf_is_no_difference():
    ref = torch.tensor([float("inf"), 1.0, float("nan")])
    from fxsurgeon.convert import compare_outputs, nonfinite_mismatch

    assert compare_outputs(ref, ref.clone()) == (0.0, 0.0)
    assert nonfinite_mismatch(ref, ref.clone()) is None
    assert "1 NaN" in nonfinite_mismatch(ref, torch.tensor([float("nan"), 1.0, float("nan")]))


# ----------------------------------------------------------------------- 11: whose input caused an error


def test_nan_in_example_inputs_is_the_callers_input():
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(SurgeryError, match=r"^example_inputs\[0\] has 1 NaN/Inf value\(s\).*verify=False") as err:
        exact(Plain().eval(), x)
    assert BUG not in str(err.value)


def test_hook_on_a_rewritten_conv_is_named_not_reported_as_a_bug():
    model = CountingNet().eval()
    model.conv.register_forward_hook(lambda m, args, out: out * 2.0)
    with pytest.raises(SurgeryError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact(model, torch.randn(2, 3, 8, 8), leaf_modules=[Counter])
    msg = str(err.value)
    assert "'conv' (forward hook)" in msg and "register them again" in msg and BUG not in msg


def test_mixed_float16_float32_layers_are_held_to_float16_tolerance():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 16, 3, padding=1)
            self.c2 = nn.Conv2d(16, 16, 3, padding=1).half()

        def forward(self, x):
            return self.c2(self.c1(x).half()).float()

    out = exact(Mixed().eval(), torch.randn(2, 3, 8, 8))
    v = out.meta["fxsurgeon"].verification
    assert v.tolerance == 2e-2  # DEFAULT_TOLERANCE[torch.float16]
    assert v.rel_error < v.tolerance and v.dtype == "float32"


@pytest.mark.parametrize("tolerance", [-1, float("nan"), float("inf"), "x", True, [1e-3]])
def test_tolerance_is_checked(tolerance):
    with pytest.raises(SurgeryError, match=r"^tolerance= takes a finite number >= 0"):
        exact(Plain().eval(), torch.randn(2, 3, 8, 8), tolerance=tolerance)


def test_train_mode_and_counter_models_convert_without_a_bug_report():
    class Both(CountingNet):
        def forward(self, x):
            y = super().forward(x)
            return F.dropout(y, 0.5, training=self.training)

    model = Both().train()
    x = torch.randn(2, 3, 8, 8)
    out = exact(model, x, mode="eval", leaf_modules=[Counter])
    assert out.meta["fxsurgeon"].verification.rel_error < 1e-4 and float(out.counter.count) == 0.0
    assert out.training and out.meta["fxsurgeon"].rewrites
