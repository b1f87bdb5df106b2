"""conv_head pass: Linear classifier after global average pooling → 1×1 conv, and the fully convolutional form."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.heads import ConvHeadGraphModule, class_map, conv1x1_from_linear_params, linear_to_conv1x1
from fxsurgeon.models import load_cifar10_test, load_resnet20, resnet20
from fxsurgeon.passes.conv_head import conv_head
from fxsurgeon.tracing import trace


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these tests run many tiny forwards: one thread avoids oversubscribing shared CI cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def convert(model, x=None, fully_convolutional=False, **kw):
    """convert() with only the conv head pass, so the tests see its effect alone."""
    return fxsurgeon.convert(model, example_inputs=x, separable=False,
                             conv_head=dict(fully_convolutional=fully_convolutional), **kw)


def records(out):
    rec = fxsurgeon.get_record(out)
    return ([r for r in rec.rewrites if r.pass_name == "conv_head"],
            [s for s in rec.skipped if s.pass_name == "conv_head"])


def linears_called(gm):
    mods = dict(gm.named_modules())
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], nn.Linear)]
    return calls + [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]


# ---------------------------------------------------------------------------------------------- builders


def test_linear_to_conv1x1_copies_weights_dtype_and_flags():
    fc = nn.Linear(12, 5).double().eval()
    fc.bias.requires_grad_(False)
    conv = linear_to_conv1x1(fc)
    assert conv.weight.shape == (5, 12, 1, 1) and conv.weight.dtype == torch.float64 and not conv.training
    assert conv.weight.requires_grad and not conv.bias.requires_grad
    assert conv.weight.data_ptr() != fc.weight.data_ptr()  # a copy: the caller's layer stays independent
    x = torch.randn(3, 12, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(conv(x).flatten(1), fc(x.flatten(1)), rtol=1e-12, atol=1e-12)
    nobias = conv1x1_from_linear_params(torch.randn(4, 6), None)
    assert nobias.bias is None and nobias.weight.shape == (4, 6, 1, 1)


def test_linear_to_conv1x1_refuses_what_it_cannot_copy():
    with pytest.raises(TypeError, match="parametrized"):
        linear_to_conv1x1(parametrizations.weight_norm(nn.Linear(4, 3)))

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match="overrides forward"):
        linear_to_conv1x1(Scaled(4, 3))
    with pytest.raises(TypeError, match=r"expected an nn\.Linear"):
        linear_to_conv1x1(nn.Conv2d(4, 3, 1))


# ------------------------------------------------------------------------------------------ seed example


def test_seed_example_4_gap_linear_becomes_gap_conv():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()
    x = torch.randn(4, 128, 7, 7)
    ref = head(x)
    out = convert(head, x)
    rw, sk = records(out)
    assert len(rw) == 1 and rw[0].exact and not sk
    assert (rw[0].target, rw[0].before, rw[0].after) == ("2", "Linear(128→10)", "Conv2d(128→10, 1x1)")
    assert not linears_called(out)
    conv = out.get_submodule("2")
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (10, 128, 1, 1)
    assert out(x).shape == (4, 10)
    torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-6)
    # the pass works on a bare traced graph too
    gm = trace(head)
    res = conv_head(gm)
    assert len(res.rewrites) == 1
    torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- every GAP form


class Net(nn.Module):
    """A small conv trunk (8×8 map of 16 channels for 8×8 inputs) followed by ``head(features)`` → Linear."""

    def __init__(self, pool, classes=5, drop=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = pool
        self.drop = drop if drop is not None else nn.Identity()
        self.fc = nn.Linear(16, classes)
        self.to_vector = None

    def forward(self, x):
        return self.fc(self.drop(self.pool(F.relu(self.conv(x)))))


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _timm_pool(**kw):
    timm = pytest.importorskip("timm")
    return timm.layers.SelectAdaptivePool2d(**kw)


GAP_FORMS = {
    "AdaptiveAvgPool2d(1)+Flatten": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    "AdaptiveAvgPool2d((1,1))+torch.flatten": lambda: Lambda(lambda x: torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1)),
    "adaptive_avg_pool2d+view(size0,-1)": lambda: Lambda(lambda x: (lambda p: p.view(p.size(0), -1))(F.adaptive_avg_pool2d(x, 1))),
    "mean((2,3))": lambda: Lambda(lambda x: x.mean((2, 3))),
    "mean([-2,-1],keepdim)+flatten": lambda: Lambda(lambda x: x.mean([-2, -1], keepdim=True).flatten(1)),
    "torch.mean(dim=(3,2))": lambda: Lambda(lambda x: torch.mean(x, dim=(3, 2))),
    "mean(3).mean(2)": lambda: Lambda(lambda x: x.mean(3).mean(2)),
    "flatten(2).mean(-1)": lambda: Lambda(lambda x: x.flatten(2).mean(-1)),
    "avg_pool2d(x,x.size(3))+view": lambda: Lambda(lambda x: (lambda p: p.view(p.size(0), -1))(F.avg_pool2d(x, x.size(3)))),
    "avg_pool2d(x,x.shape[2:])+reshape": lambda: Lambda(lambda x: (lambda p: p.reshape(p.shape[0], -1))(F.avg_pool2d(x, x.shape[2:]))),
    "AvgPool2d(8)+squeeze(-1)x2": lambda: nn.Sequential(nn.AvgPool2d(8), Lambda(lambda x: x.squeeze(-1).squeeze(-1))),
    "AdaptiveAvgPool2d+[:,:,0,0]": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), Lambda(lambda x: x[:, :, 0, 0])),
    "AdaptiveAvgPool2d+squeeze((2,3))": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), Lambda(lambda x: x.squeeze((2, 3)))),
    "timm SelectAdaptivePool2d(avg,flatten)": lambda: _timm_pool(pool_type="avg", flatten=True),
    "timm SelectAdaptivePool2d(fast)+Flatten": lambda: nn.Sequential(_timm_pool(pool_type="fast"), nn.Flatten()),
}
FIXED_WINDOW = {"AvgPool2d(8)+squeeze(-1)x2", "avg_pool2d(x,x.size(3))+view"}  # not global on an 11×13 map


CASES = [(form, "none") for form in GAP_FORMS] + [
    (form, drop) for form in ("AdaptiveAvgPool2d(1)+Flatten", "mean((2,3))", "avg_pool2d(x,x.size(3))+view")
    for drop in ("module", "functional")
]


@pytest.mark.parametrize("form,drop", CASES)
def test_every_gap_form_is_converted_exactly(form, drop):
    dropout = {"none": None, "module": nn.Dropout(0.3), "functional": Lambda(lambda x: F.dropout(x, 0.3, False))}[drop]
    net = Net(GAP_FORMS[form](), drop=dropout).eval()
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    out = convert(net, x)
    rw, sk = records(out)
    assert [r.target for r in rw] == ["fc"] and rw[0].exact, sk
    assert not linears_called(out)
    torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-6)

    fcn = convert(net, x, fully_convolutional=True)
    rw, sk = records(fcn)
    assert rw[0].details["fully_convolutional"] and not sk
    torch.testing.assert_close(fcn(x), ref, rtol=1e-5, atol=1e-6)
    big = torch.randn(2, 3, 11, 13)  # any input size once the conv runs before a global pool
    cmap = class_map(fcn, big)
    assert cmap.shape == (2, 5, 11, 13)
    torch.testing.assert_close(cmap.mean((2, 3)), fcn(big), rtol=1e-5, atol=1e-6)
    if form not in FIXED_WINDOW:
        torch.testing.assert_close(fcn(big), net(big), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_bare_squeeze_keeps_its_batch_behaviour(batch):
    # x.squeeze() drops the batch dim too when N = 1: the converted head must do the same at every N
    net = Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), Lambda(lambda x: x.squeeze()))).eval()
    out = convert(net, torch.randn(batch, 3, 8, 8))
    assert len(records(out)[0]) == 1
    for n in (1, 3):
        x = torch.randn(n, 3, 8, 8)
        assert out(x).shape == net(x).shape
        torch.testing.assert_close(out(x), net(x), rtol=1e-5, atol=1e-6)


def test_keeps_norm_activation_and_converts_mlp_head_linears():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(32, 5))
    net = Net(head).eval()
    net.fc = nn.Identity()
    x = torch.randn(2, 3, 8, 8)
    out = convert(net, x)
    rw, _ = records(out)
    assert sorted((r.target, r.details["role"]) for r in rw) == [("pool.2", "hidden"), ("pool.5", "classifier")]
    assert not linears_called(out)
    torch.testing.assert_close(out(x), net(x), rtol=1e-5, atol=1e-6)

    norm = Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(16))).eval()
    out = convert(norm, x)
    rw, _ = records(out)
    assert len(rw) == 1 and any("LayerNorm" in b for b in rw[0].details["between"])
    assert isinstance(out.get_submodule("pool.2"), nn.LayerNorm)  # the norm stays where it was
    torch.testing.assert_close(out(x), norm(x), rtol=1e-5, atol=1e-6)


def test_timm_norm_mlp_head_with_hidden_layer():
    timm = pytest.importorskip("timm")

    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3)
            self.head = timm.layers.NormMlpClassifierHead(16, 5, hidden_size=12)

        def forward(self, x):
            return self.head(self.conv(x))

    net = WithHead().eval()
    x = torch.randn(2, 3, 8, 8)
    out = convert(net, x, fully_convolutional=True)
    rw, sk = records(out)
    assert [(r.target, r.details["role"]) for r in rw] == [("head.pre_logits.fc", "hidden"), ("head.fc", "classifier")]
    assert len(sk) == 1 and "layer_norm ('head.norm')" in sk[0].reason and "tanh" in sk[0].reason
    assert not linears_called(out)
    torch.testing.assert_close(out(x), net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", [nn.LayerNorm(16), nn.BatchNorm1d(16), nn.GELU()], ids=["layernorm", "batchnorm1d", "gelu"])
def test_fully_convolutional_refused_with_norm_or_nonlinearity(norm):
    net = Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), norm)).eval()
    x = torch.randn(2, 3, 8, 8)
    out = convert(net, x, fully_convolutional=True)
    rw, sk = records(out)
    assert len(rw) == 1 and not rw[0].details["fully_convolutional"]
    assert len(sk) == 1 and sk[0].reason.startswith("fully_convolutional refused") and type(norm).__name__ in sk[0].reason
    torch.testing.assert_close(out(x), net(x), rtol=1e-5, atol=1e-6)  # still exact, in the pooled form
    with pytest.raises(SurgeryError, match="refused"):
        class_map(out, x)


def test_fully_convolutional_moves_hidden_linear_and_pointwise_conv():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 24, 1), nn.Flatten(), nn.Linear(24, 20),
                         nn.Dropout(0.2), nn.Linear(20, 5))
    net = Net(head).eval()
    net.fc = nn.Identity()
    x = torch.randn(2, 3, 8, 8)
    out = convert(net, x, fully_convolutional=True)
    rw, sk = records(out)
    assert len(rw) == 2 and all(r.details["fully_convolutional"] for r in rw) and not sk
    assert out.get_classifier(name_only=True) == "pool.5"
    assert isinstance(out.get_submodule("pool.4"), nn.Dropout2d)
    big = torch.randn(2, 3, 10, 12)
    cmap = class_map(out, big)
    assert cmap.shape == (2, 5, 10, 12)
    torch.testing.assert_close(cmap.mean((2, 3)), net(big), rtol=1e-5, atol=1e-5)


def test_fully_convolutional_dropout_is_channel_dropout_with_the_same_distribution():
    net = Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), drop=nn.Dropout(0.5)).train()
    out = convert(net, fully_convolutional=True)
    assert isinstance(out.get_submodule("drop"), nn.Dropout2d) and out.training
    masked = []
    out.get_submodule("drop").register_forward_hook(lambda m, i, o: masked.append(o))
    x = torch.randn(4, 3, 8, 8)
    y = out(x)
    feats = F.relu(net.conv(x))
    kept = masked[0].flatten(2).abs().sum(-1) > 0  # channels Dropout2d kept, per sample
    assert 0 < kept.float().mean() < 1
    # pooling a channel-dropped map = dropping the pooled channel: the original head's training behaviour
    expected = net.fc(feats.mean((2, 3)) * kept / 0.5)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ shapes or none


def test_structural_match_without_shapes_and_what_needs_them():
    x = torch.randn(2, 3, 8, 8)
    net = Net(GAP_FORMS["adaptive_avg_pool2d+view(size0,-1)"]()).eval()
    gm = trace(net)  # the pass alone, on a graph without shapes: only the structural forms match
    rw = conv_head(gm).rewrites
    assert len(rw) == 1 and rw[0].details["shapes"].startswith("none: matched structurally")
    torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-6)

    for form in ("mean((2,3))", "avg_pool2d(x,x.size(3))+view", "AvgPool2d(8)+squeeze(-1)x2"):
        gm = trace(Net(GAP_FORMS[form]()).eval())
        res = conv_head(gm)
        assert not res.rewrites and len(res.skipped) == 1 and "shapes are needed" in res.skipped[0].reason, form
        assert "pass example_inputs" in res.skipped[0].reason
        assert res.skipped[0].details["shapes"].startswith("none")
        assert type(gm) is not ConvHeadGraphModule

    # convert() without example_inputs probes channels and ranks on the meta device: a mean over (2, 3) is a
    # global pool at any size; a window is global only at the true size, which a probe does not know
    out = convert(Net(GAP_FORMS["mean((2,3))"]()).eval())
    rw, sk = records(out)
    assert len(rw) == 1 and not sk and out.meta["fxsurgeon"].extras["shapes"]["source"] == "probe"
    torch.manual_seed(0)
    mean_net = Net(GAP_FORMS["mean((2,3))"]()).eval()
    torch.testing.assert_close(convert(mean_net)(x), mean_net(x), rtol=1e-5, atol=1e-6)
    for form in ("avg_pool2d(x,x.size(3))+view", "AvgPool2d(8)+squeeze(-1)x2"):
        rw, sk = records(convert(Net(GAP_FORMS[form]()).eval()))
        assert not rw and len(sk) == 1 and "at the model's input size" in sk[0].reason, form


def test_cifar_resnet20_head_form():
    model = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    out = convert(model, x, fully_convolutional=True)
    rw, _ = records(out)
    assert rw[0].target == "linear" and "avg_pool2d" in rw[0].details["pool"]
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    assert class_map(out, x).shape == (2, 10, 8, 8)
    # F.avg_pool2d(out, out.size(3)) needs the true shapes to be called global (on a non-square map it is not):
    # without example_inputs a nominal probe cannot tell, so it is skipped, naming the remedy
    _, sk = records(convert(model))
    assert "shapes are needed" in sk[0].reason and "pass example_inputs" in sk[0].reason


def test_trained_cifar_resnet20_predictions_unchanged():
    try:
        model = load_resnet20()
        x, _ = load_cifar10_test(split="calib")
    except FileNotFoundError:
        pytest.skip("shared/data not available")
    x = x[:64]
    out = convert(model, x[:4], fully_convolutional=True)
    with torch.no_grad():
        ref, got = model(x), out(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), ref.argmax(1))


# ------------------------------------------------------------------------------------------------ skips


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 4)
        self.head_dist = nn.Linear(8, 4)

    def forward(self, x):
        f = self.conv(x).mean((2, 3))
        return self.head(f), self.head_dist(f)


SKIPS = {
    "max pool": (lambda: Net(nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())), "max pooling"),
    "amax": (lambda: Net(Lambda(lambda x: x.amax((2, 3)))), "max pooling"),
    "not global": (lambda: Net(nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 16))),
                   "is not a global pool"),
    "small window": (lambda: Net(nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(64, 16))),
                     "is not a global average pool"),
    "flattened map": (lambda: Net(nn.Sequential(nn.Flatten(), nn.Linear(1024, 16))), "flattened"),
    "model input": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(192, 5)), "model input"),
    "channels last": (lambda: Net(Lambda(lambda x: x.permute(0, 2, 3, 1).mean((1, 2)))), "channels-last"),
    "two heads": (TwoHeads, "one of 2 classifier heads"),
}


@pytest.mark.parametrize("case", list(SKIPS))
def test_skips_with_reason(case):
    build, reason = SKIPS[case]
    net = build().eval()
    x = torch.randn(2, 3, 8, 8)
    out = convert(net, x, fully_convolutional=True)
    rw, sk = records(out)
    assert not rw and sk and all(reason in s.reason for s in sk), [s.reason for s in sk]
    assert linears_called(out)  # left as it was
    with pytest.raises(SurgeryError, match="no converted conv head"):
        class_map(out, x)


def test_timm_avgmax_pool_is_skipped_as_max():
    net = Net(_timm_pool(pool_type="avgmax", flatten=True)).eval()
    _, sk = records(convert(net, torch.randn(2, 3, 8, 8)))
    assert "max pooling" in sk[0].reason


def test_token_mean_head_is_a_sequence_head():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 16, 4, stride=4)
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            return self.head(self.embed(x).flatten(2).transpose(1, 2).mean(dim=1))

    _, sk = records(convert(Tokens().eval(), torch.randn(2, 3, 8, 8)))
    assert "token/sequence head" in sk[0].reason


def test_shared_or_tied_linear_is_skipped():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.fc(self.conv(x).mean((2, 3))))

    _, sk = records(convert(Shared().eval(), torch.randn(2, 3, 8, 8)))
    assert "called at 2 places" in sk[0].reason

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.proj = nn.Linear(8, 8)
            self.fc = nn.Linear(8, 8)
            self.fc.weight = self.proj.weight

        def forward(self, x):
            return self.fc(F.relu(self.proj(self.conv(x).mean((2, 3)))))

    _, sk = records(convert(Tied().eval(), torch.randn(2, 3, 8, 8)))
    assert "tied with proj" in sk[0].reason


# --------------------------------------------------------------------------------------------- options


def test_options_are_checked():
    net = Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    with pytest.raises(SurgeryError, match="fully_convolutional"):
        convert(net, fully_convolutional="yes")
    with pytest.raises(SurgeryError, match="unknown option"):
        fxsurgeon.convert(net, conv_head=dict(fully_conv=True))


def test_on_by_default_and_composes_with_separable():
    assert fxsurgeon.get_pass("conv_head").default
    net = Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())).eval()
    net.conv = nn.Conv2d(3, 16, 3, padding=1)
    net.mid = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    out = fxsurgeon.convert(net, example_inputs=x, separable=dict(multiplier="full"))
    passes = {r.pass_name for r in fxsurgeon.get_record(out).rewrites}
    assert "conv_head" in passes
    torch.testing.assert_close(out(x), net(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ timm / torchvision


def _build(name):
    if name == "cifar_resnet20":
        return resnet20()
    if name.startswith("tv_"):
        torchvision = pytest.importorskip("torchvision")
        return getattr(torchvision.models, name[3:])()
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False)


SWEEP = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "regnetx_002",
         "tv_resnet18", "tv_densenet121", "cifar_resnet20"]
FC_REFUSED = {"mobilenetv3_small_100": "Hardswish", "convnext_atto": "layer_norm"}


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = _build(name).eval()
        return cache[name]

    return get


@pytest.mark.timm
@pytest.mark.parametrize("fully_convolutional", [False, True], ids=["pooled", "fully_conv"])
@pytest.mark.parametrize("name", SWEEP)
def test_real_models_logits_unchanged(name, fully_convolutional, built, snapshot):
    model = built(name)
    check = snapshot(model)
    size = 32 if name == "cifar_resnet20" else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    out = convert(model, x, fully_convolutional=fully_convolutional)
    check()
    rw, sk = records(out)
    classifier = [r for r in rw if r.details["role"] == "classifier"]
    assert len(classifier) == 1 and all(r.exact for r in rw)
    assert not linears_called(out)
    assert isinstance(out, ConvHeadGraphModule)
    assert isinstance(out.get_classifier(), nn.Conv2d)
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref, rtol=1e-4, atol=1e-4)
    refused = fully_convolutional and name in FC_REFUSED
    assert classifier[0].details["fully_convolutional"] == (fully_convolutional and not refused)
    if refused:
        assert len(sk) == 1 and FC_REFUSED[name] in sk[0].reason
    elif fully_convolutional:
        with torch.no_grad():
            cmap = class_map(out, x)
        assert cmap.dim() == 4 and cmap.shape[:2] == ref.shape
        torch.testing.assert_close(cmap.mean((2, 3)), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.timm
def test_fully_convolutional_224_model_at_320(built):
    model = built("resnet18")
    out = convert(model, torch.randn(1, 3, 224, 224), fully_convolutional=True)
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        cmap, logits, ref = class_map(out, x), out(x), model(x)
    assert cmap.shape == (1, 1000, 10, 10)
    torch.testing.assert_close(cmap.mean((2, 3)), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.timm
def test_timm_shapes_derived_only_when_they_decide(built):
    # ResNet's ClassifierHead, ConvNeXt's pool → permute → layer_norm → permute → flatten and MobileNetV3's
    # pool → 1×1 conv → act → flatten prove themselves: no shape pass over the model
    # (the pass alone: convert() itself propagates shapes at pretrained_cfg's input size for every pass)
    for name in ("resnet18", "convnext_atto", "mobilenetv3_small_100"):
        gm = trace(built(name))
        for attr in ("pretrained_cfg", "default_cfg"):
            setattr(gm, attr, getattr(built(name), attr))
        rw = conv_head(gm).rewrites
        assert rw[0].details["shapes"] == "none: matched structurally (the head's form needs none)", name
    rec = convert(built("resnet18")).meta["fxsurgeon"]
    assert rec.extras["shapes"] == {"source": "pretrained_cfg", "input_shapes": [[2, 3, 224, 224]], "spatial": "true"}
    # a bare squeeze() needs shapes: for a timm model they are derived from its pretrained_cfg
    class SqueezeHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 5)
            self.pretrained_cfg = {"input_size": (3, 16, 16)}

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(self.body(x), 1).squeeze())

    model = SqueezeHead().eval()
    out = convert(model)
    rw, _ = records(out)
    assert rw[0].details["shapes"] == "shape_prop"  # convert() propagated them at pretrained_cfg's size
    assert out.meta["fxsurgeon"].extras["shapes"]["input_shapes"] == [[2, 3, 16, 16]]

    def alone(m):  # the pass alone derives them itself
        gm = trace(m)
        gm.pretrained_cfg = m.pretrained_cfg
        return conv_head(gm).rewrites

    assert alone(model)[0].details["shapes"].startswith("derived: ShapeProp at pretrained_cfg input_size [3, 16, 16]")

    class MeanHead(SqueezeHead):  # a mean is only a global pool by the shapes: matched after deriving them
        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))

    mean_rw = alone(MeanHead().eval())
    assert len(mean_rw) == 1 and mean_rw[0].details["shapes"].startswith("derived: ShapeProp")
    assert len(records(convert(MeanHead().eval()))[0]) == 1
    tv = convert(built("tv_resnet18"))
    tv_alone = trace(built("tv_resnet18"))
    assert conv_head(tv_alone).rewrites[0].details["shapes"].startswith("none: matched structurally")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tv(x), built("tv_resnet18")(x), rtol=1e-4, atol=1e-4)


@pytest.mark.timm
@pytest.mark.parametrize("name,leaf", [("regnetx_002", "ClassifierHead"), ("resnet18", "SelectAdaptivePool2d")])
def test_timm_head_modules_kept_as_leaves(name, leaf, built):
    timm = pytest.importorskip("timm")
    model = built(name)
    x = torch.randn(2, 3, 64, 64)
    for fully_convolutional in (False, True):
        out = convert(model, x, fully_convolutional=fully_convolutional,
                      leaf_modules=[getattr(timm.layers, leaf)])
        rw, sk = records(out)
        assert len(rw) == 1 and rw[0].details["fully_convolutional"] == fully_convolutional, sk
        with torch.no_grad():
            torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.timm
def test_vit_and_deit_distilled_are_left_with_reasons():
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 64, 64)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    out = convert(vit, x)
    rw, sk = records(out)
    assert not rw and len(sk) == 1 and sk[0].target == "head" and "token/sequence head" in sk[0].reason
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64).eval()
    rw, sk = records(convert(deit, x))
    assert not rw and {s.target for s in sk} == {"head", "head_dist"}
    assert all("distillation" in s.reason for s in sk)


@pytest.mark.timm
def test_converted_timm_model_head_api_survives_deepcopy_and_pickle(built, tmp_path):
    model = built("resnet18")
    x = torch.randn(2, 3, 64, 64)
    out = convert(model, x, fully_convolutional=True)
    assert out.get_classifier(name_only=True) == "fc" and out.num_classes == 1000
    with torch.no_grad():
        ref = out(x)
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(out), torch.load(buf, weights_only=False)):
        assert isinstance(twin, ConvHeadGraphModule)
        assert twin.get_classifier() is twin.get_submodule("fc") and twin.get_classifier() is not out.fc
        assert twin.pretrained_cfg["architecture"] == "resnet18"
        assert fxsurgeon.get_record(twin).rewrites[0].target == "fc"
        with torch.no_grad():
            torch.testing.assert_close(twin(x), ref)
            assert class_map(twin, x).shape == (2, 1000, 2, 2)
        twin.reset_classifier(7)
        conv = twin.get_classifier()
        assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (7, 512, 1, 1) and twin.num_classes == 7
        assert twin(x).shape == (2, 7) and class_map(twin, x).shape == (2, 7, 2, 2)
        twin.reset_classifier(0)  # as timm: the pooled features
        with torch.no_grad():
            torch.testing.assert_close(twin(x), model.forward_head(model.forward_features(x), pre_logits=True))
        with pytest.raises(SurgeryError, match="global_pool"):
            twin.reset_classifier(10, global_pool="max")
    assert out.get_classifier().weight.shape == (1000, 512, 1, 1)  # the twins were independent


# ------------------------------------------------------------------ in-place ops around the head (issue 17.4)


class _InplaceHead(nn.Module):
    """conv → pool → flatten → ``body(p)``: ``body`` returns the output from the pooled (N, C) tensor ``p``."""

    def __init__(self, body, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)
        self.act = nn.ReLU(inplace=True)
        self.body = body

    def forward(self, x):
        return self.body(self, self.pool(self.conv(x)).flatten(1))


def _relu_inplace_then_read(m, p):  # the first net: rel. error 1.35 before
    g = F.relu(p, inplace=True)
    h = p.sum(1, keepdim=True)
    return m.fc(g) + h


def _mul_after_elementwise(m, p):  # the second net: rel. error 0.07 before
    g = torch.sigmoid(p)
    p.mul_(2)
    return m.fc(g) + p[:, :4]


def _relu_positional_inplace(m, p):
    g = F.relu(p, True)
    return m.fc(g) - p[:, :4]


def _module_inplace_then_read(m, p):
    g = m.act(p)
    return m.fc(g) * p.mean(1, keepdim=True)


def _method_inplace_on_view(m, p):
    g = torch.tanh(p)
    p.view(-1).add_(1.0)
    return m.fc(g) + p[:, :4]


def _fill_after_elementwise(m, p):
    g = torch.sigmoid(p)
    p.narrow(1, 0, 1).fill_(5.0)
    return m.fc(g) + p[:, :4]


def _out_kwarg_after_elementwise(m, p):
    g = torch.sigmoid(p)
    torch.mul(p, 3.0, out=p)
    return m.fc(g) + p[:, :4]


@pytest.mark.parametrize("body", [_relu_inplace_then_read, _mul_after_elementwise, _relu_positional_inplace,
                                  _module_inplace_then_read, _method_inplace_on_view, _fill_after_elementwise,
                                  _out_kwarg_after_elementwise],
                         ids=lambda f: f.__name__.strip("_"))
def test_head_with_inplace_op_on_a_moved_tensor_is_skipped(body):
    torch.manual_seed(0)
    model = _InplaceHead(body, classes=1 if body is _relu_inplace_then_read else 4).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = model(x)
    out = convert(model)  # no example_inputs: nothing would catch a wrong rewrite
    rw, sk = records(out)
    assert not rw
    assert len(sk) == 1 and "in place" in sk[0].reason and sk[0].target == "fc", sk
    assert "out of place" in sk[0].reason
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref, rtol=0, atol=0)


def test_inplace_op_inside_the_head_with_no_other_reader_is_still_converted():
    class Net(nn.Module):  # torchvision MobileNetV3's classifier: Linear, Hardswish(inplace), Dropout(inplace)
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Sequential(nn.Linear(8, 6), nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True),
                                      nn.Linear(6, 4))

        def forward(self, x):
            return self.head(torch.flatten(self.pool(self.conv(x)), 1))

    model = Net().eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = model(x)
    out = convert(model, x)
    rw, sk = records(out)
    assert {r.target for r in rw} == {"head.0", "head.3"} and not sk
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-6)


def test_fully_convolutional_refused_when_the_map_is_written_after_the_pool():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            f = self.conv(x)
            p = self.pool(f).flatten(1)
            f.mul_(2)  # after the pool: moving the classifier before the pool would see the doubled map
            return self.fc(p) + f.mean((2, 3))[:, :4]

    model = Net().eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = model(x)
    out = convert(model, x, fully_convolutional=True)
    rw, sk = records(out)
    assert len(rw) == 1 and rw[0].details["fully_convolutional"] is False
    assert len(sk) == 1 and "fully_convolutional refused" in sk[0].reason and "in place" in sk[0].reason
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-6)
