"""fxsurgeon.save / fxsurgeon.load: safetensors weights + JSON recipe, strict rebuild, no unpickling."""

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.io import normalize_source, read_metadata
from fxsurgeon.modules import SeparableConv2d


@pytest.fixture(autouse=True)
def one_thread():
    # small models: on the shared 2-core CI box, thread hand-offs cost more than they save
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Module-level factories: save/load rebuilds plain modules by importing these by name.
def small_net(width: int = 16, stride: int = 1, num_classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, stride=stride), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


class Shared(nn.Module):
    """One conv called twice, plus two convs whose weights are tied."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(self.block(torch.relu(self.block(x)))))


def shared_net() -> nn.Module:
    return Shared()


SMALL = f"{__name__}:small_net"


def load(path, **kwargs):
    """fxsurgeon.load trusting this module's factories (saved files name them; load refuses unknown ones)."""
    return fxsurgeon.load(path, trust_factories=[f"{__name__}:*"], **kwargs)


def test_source_forms():
    assert normalize_source("resnet18") == {"timm": "resnet18", "kwargs": {}}
    assert normalize_source(small_net) == {"factory": SMALL, "kwargs": {}}
    assert normalize_source({"factory": SMALL, "kwargs": {"width": 8}})["kwargs"] == {"width": 8}
    for bad, match in [
        (lambda: nn.ReLU(), "lambda"),
        ({"timm": "resnet18", "factory": SMALL}, "exactly one"),
        ({"factory": SMALL, "kwargs": {"act": nn.ReLU}}, r"source kwargs\['act'\]"),
        ({"factory": "no_colon"}, "package.module:function"),
        (3, "source must be"),
    ]:
        with pytest.raises(SurgeryError, match=match):
            normalize_source(bad)


@pytest.mark.timm
def test_timm_round_trip_replays_per_layer_ranks(tmp_path, snapshot):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    check = snapshot(model)
    x = torch.randn(2, 3, 32, 32)
    # energy= picks a different rank per layer from the weights: the replay must not recompute it
    # (layer4's 512-channel decompositions are left out only to keep the test fast)
    small = fxsurgeon.convert(model, example_inputs=x, separable=dict(energy=0.6, exclude=["layer4.*"]))
    rec = fxsurgeon.get_record(small)
    assert rec.source == {"timm": "resnet18", "kwargs": {"num_classes": 7, "in_chans": 3}}
    assert len({r.details["rank"] for r in rec.rewrites if r.pass_name == "separable"}) > 1
    path = tmp_path / "r18.safetensors"
    fxsurgeon.save(small, path)
    check()

    again = load(path)
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)
    assert again.state_dict().keys() == small.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in small.state_dict().items())
    assert not again.training and again.num_classes == 7
    rec2 = fxsurgeon.get_record(again)
    assert [r.to_dict() for r in rec2.rewrites] == json.loads(json.dumps([r.to_dict() for r in rec.rewrites]))
    assert rec2.verification.rel_error == rec.verification.rel_error
    assert rec2.extras["loaded_from"] == str(path)
    assert "separable: 12 rewritten" in fxsurgeon.summary(again)


def test_metadata_is_json_in_the_safetensors_header(tmp_path):
    small = fxsurgeon.convert(small_net(), source=small_net)
    path = tmp_path / "m.safetensors"
    fxsurgeon.save(small, path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        keys = set(f.keys())
    meta = json.loads(header["fxsurgeon"])
    assert meta["format_version"] == 1 and meta["source"] == {"factory": SMALL, "kwargs": {}}
    assert meta["versions"]["torch"] == torch.__version__
    sep = [r for r in meta["record"]["rewrites"] if r["pass_name"] == "separable"]
    assert [r["target"] for r in sep] == ["3", "6"] and {r["details"]["rank"] for r in sep} == {1}
    assert keys == set(small.state_dict())
    assert read_metadata(path)["record"]["model"] == "Sequential"


def test_load_never_unpickles_or_runs_svd(tmp_path, monkeypatch):
    small = fxsurgeon.convert(small_net(), source=small_net, separable=dict(multiplier=2))
    path = tmp_path / "m.safetensors"
    fxsurgeon.save(small, path)

    def refuse(*args, **kwargs):
        raise AssertionError("load must not unpickle or decompose")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("fxsurgeon.modules.separable_factors", refuse)
    again = load(path)
    x = torch.randn(1, 3, 16, 16)
    small.eval(), again.eval()
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)
    assert again.get_submodule("3").multiplier == 2


def test_plain_module_needs_a_source(tmp_path):
    small = fxsurgeon.convert(small_net())
    path = tmp_path / "m.safetensors"
    with pytest.raises(SurgeryError, match=r"source='package\.module:function'"):
        fxsurgeon.save(small, path)
    assert not path.exists()
    fxsurgeon.save(small, path, source={"factory": SMALL, "kwargs": {}})
    assert load(path).get_submodule("3").depthwise.kernel_size == (3, 3)


def test_factory_kwargs_and_trained_state(tmp_path):
    """Weights changed after convert (training, calibration), dtype, frozen params, modes all come back."""
    net = small_net(width=8, num_classes=3).double()
    small = fxsurgeon.convert(net, source={"factory": SMALL, "kwargs": {"width": 8, "num_classes": 3}})
    with torch.no_grad():
        for p in small.parameters():
            p.add_(0.1)  # as if fine-tuned
    small.train()
    small.get_submodule("1").eval()
    small.get_submodule("0").weight.requires_grad_(False)
    small.get_submodule("1")(torch.randn(4, 8, 4, 4, dtype=torch.float64))  # BN stats: eval, unchanged
    small.get_submodule("4").train()(torch.randn(4, 8, 4, 4, dtype=torch.float64))  # BN stats move
    path = tmp_path / "m.safetensors"
    fxsurgeon.save(small, path)
    again = load(path)
    assert all(t.dtype == torch.float64 for t in again.state_dict().values() if t.is_floating_point())
    assert all(torch.equal(again.state_dict()[k], v) for k, v in small.state_dict().items())
    assert {n: m.training for n, m in again.named_modules()} == {n: m.training for n, m in small.named_modules()}
    assert {n: p.requires_grad for n, p in again.named_parameters()} == {
        n: p.requires_grad for n, p in small.named_parameters()}
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    small.eval(), again.eval()
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)


def test_half_and_channels_last(tmp_path):
    net = small_net().half().to(memory_format=torch.channels_last)
    small = fxsurgeon.convert(net, source=small_net)
    small.to(memory_format=torch.channels_last)
    path = tmp_path / "m.safetensors"
    fxsurgeon.save(small, path)
    again = load(path)
    w = again.get_submodule("3").depthwise.weight
    assert w.dtype == torch.float16 and w.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in small.state_dict().items())


def test_shared_modules_and_tied_weights_stay_shared(tmp_path):
    model = shared_net()
    small = fxsurgeon.convert(model, source=shared_net, separable=dict(multiplier="full"),
                              example_inputs=torch.randn(1, 8, 8, 8))
    rec = fxsurgeon.get_record(small)
    assert [r.target for r in rec.rewrites] == ["block"]  # a and b are tied: skipped with the reason
    path = tmp_path / "s.safetensors"
    fxsurgeon.save(small, path)
    meta = read_metadata(path)
    assert meta["tied"] == {"b.weight": "a.weight"}
    again = load(path)
    assert again.get_submodule("a").weight is again.get_submodule("b").weight
    x = torch.randn(1, 8, 8, 8)
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)


def test_wrong_source_is_refused_with_the_difference(tmp_path):
    small = fxsurgeon.convert(small_net(), source=small_net)
    path = tmp_path / "m.safetensors"
    fxsurgeon.save(small, path)
    with pytest.raises(SurgeryError, match=r"does not match the saved weights.*shape mismatches"):
        load(path, source={"factory": SMALL, "kwargs": {"width": 8}})
    # same weights, different stride: only the structure check can tell
    with pytest.raises(SurgeryError, match=r"differs from the saved architecture(.|\n)*stride=\(2, 2\)"):
        load(path, source={"factory": SMALL, "kwargs": {"stride": 2}})
    again = load(path, source={"factory": SMALL, "kwargs": {"stride": 2}}, check_structure=False)
    assert again.get_submodule("3").depthwise.stride == (2, 2)
    with pytest.raises(SurgeryError, match="cannot import model factory"):
        load(path, source="no_such_pkg.mod:fn")


def test_save_refuses_a_model_changed_after_convert(tmp_path):
    small = fxsurgeon.convert(small_net(), source=small_net)
    small.add_module("0", nn.Conv2d(3, 16, 5, padding=2))  # user swapped the stem after conversion
    path = tmp_path / "m.safetensors"
    with pytest.raises(SurgeryError, match=r"does not match the saved weights.*0\.weight"):
        fxsurgeon.save(small, path)
    assert not path.exists()
    fxsurgeon.save(small, path, check=False)  # written, but load refuses it with the same message
    with pytest.raises(SurgeryError, match=r"0\.weight saved \[16, 3, 5, 5\] vs rebuilt \[16, 3, 3, 3\]"):
        load(path)


def test_failed_save_leaves_existing_file_intact(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"precious")
    small = fxsurgeon.convert(small_net())
    with pytest.raises(SurgeryError):
        fxsurgeon.save(small, path)  # no source
    assert path.read_bytes() == b"precious"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(SurgeryError, match="does not exist"):
        fxsurgeon.save(small, tmp_path / "missing" / "m.safetensors", source=small_net)


def test_bad_files(tmp_path):
    with pytest.raises(SurgeryError, match="no such file"):
        load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(SurgeryError, match="not a readable safetensors file"):
        load(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(SurgeryError, match=r"not written by fxsurgeon\.save"):
        load(plain)
    newer = tmp_path / "newer.safetensors"
    save_file({"w": torch.zeros(2)}, str(newer), metadata={"fxsurgeon": json.dumps({"format_version": 99})})
    with pytest.raises(SurgeryError, match="newer than this fxsurgeon"):
        load(newer)


def test_unknown_pass_in_file_is_refused(tmp_path, monkeypatch):
    small = fxsurgeon.convert(small_net(), source=small_net)
    path = tmp_path / "m.safetensors"
    fxsurgeon.save(small, path)
    meta = read_metadata(path)
    meta["record"]["options"]["warp_drive"] = {}
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={"fxsurgeon": json.dumps(meta)})
    with pytest.raises(SurgeryError, match=r"pass\(es\) \['warp_drive'\]"):
        load(path)


def test_save_refuses_meta_weights_and_non_json_recipes(tmp_path):
    with torch.device("meta"):
        net = small_net()
    small = fxsurgeon.convert(net, source=small_net, separable=dict(init="random"))
    with pytest.raises(SurgeryError, match="meta device: there are no weights"):
        fxsurgeon.save(small, tmp_path / "m.safetensors")
    small = fxsurgeon.convert(small_net(), source=small_net)
    fxsurgeon.get_record(small).options["separable"]["exclude"] = {"a set"}
    with pytest.raises(SurgeryError, match=r"record options\['separable'\]\['exclude'\] is a builtins.set"):
        fxsurgeon.save(small, tmp_path / "m.safetensors")


def test_leaf_modules_are_recorded_and_replayed(tmp_path):
    model = gated_net()
    x = torch.randn(1, 8, 8, 8)
    small = fxsurgeon.convert(model, source=gated_net, leaf_modules=[Gate], example_inputs=x)
    rec = fxsurgeon.get_record(small)
    assert rec.tracing["leaf_modules"] == [f"{__name__}:Gate"]
    assert [r.target for r in rec.rewrites] == ["conv", "gate.inner"]  # reached inside the leaf
    path = tmp_path / "g.safetensors"
    fxsurgeon.save(small, path)
    again = load(path)
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)
    assert isinstance(again.get_submodule("gate.inner"), SeparableConv2d)


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.inner(x)
        return y if y.sum() > 0 else -y  # data-dependent: only traceable as a leaf


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


def gated_net() -> nn.Module:
    return Gated()


# ------------------------------------------------------------------------------------- torch.save / torch.load


def test_torch_save_of_the_graph_module_keeps_the_record(tmp_path):
    small = fxsurgeon.convert(small_net(), example_inputs=torch.randn(1, 3, 16, 16))
    path = tmp_path / "m.pt"
    torch.save(small, path)
    # a GraphModule pickles its generated code: PyTorch's safe default (weights_only=True) refuses it
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    again = torch.load(path, weights_only=False)
    x = torch.randn(2, 3, 16, 16)
    small.eval(), again.eval()
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)
    rec = fxsurgeon.get_record(again)  # torch.load rebuilds meta empty; get_record restores it
    assert again.meta["fxsurgeon"] is rec
    assert [r.target for r in rec.rewrites if r.pass_name == "separable"] == ["3", "6"]
    assert rec.verification is not None
    assert "separable: 2 rewritten" in fxsurgeon.summary(again)


def test_deepcopy_then_torch_save_keeps_record_and_timm_attributes(tmp_path):
    """Regression: GraphModule.__deepcopy__ dropped the carried timm attributes (num_classes, pretrained_cfg)."""
    import copy

    timm = pytest.importorskip("timm")
    small = fxsurgeon.convert(timm.create_model("resnet18", pretrained=False, num_classes=7))
    dup = copy.deepcopy(small)
    assert dup.num_classes == 7 and dup.pretrained_cfg["architecture"] == "resnet18"
    assert fxsurgeon.get_record(dup).rewrites[-1].target == "layer4.1.conv2"
    assert dup.meta["fxsurgeon"] is dup._fxsurgeon_record
    torch.save(dup, tmp_path / "d.pt")
    again = torch.load(tmp_path / "d.pt", weights_only=False)
    assert again.num_classes == 7 and fxsurgeon.get_record(again).model == "resnet18"


@pytest.mark.slow
def test_trained_resnet20_round_trip(tmp_path):
    """Real weights: the reloaded model classifies exactly like the saved one."""
    from fxsurgeon.models import load_cifar10_test, load_resnet20, resnet20

    try:
        model = load_resnet20()
        images, _ = load_cifar10_test(split="calib")
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"shared CIFAR data not available: {exc}")
    x = images[:16]
    small = fxsurgeon.convert(model, source=resnet20, example_inputs=x, separable=dict(energy=0.9))
    path = tmp_path / "r20.safetensors"
    fxsurgeon.save(small, path)
    again = load(path)
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- the replay on meta


class Shuffle(nn.Module):
    """A leaf module with a non-persistent buffer (like timm's relative-position index tables)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        perm = torch.randperm(channels, generator=torch.Generator().manual_seed(3))
        self.register_buffer("perm", perm, persistent=False)

    def forward(self, x):
        return self.conv(x)[:, self.perm]


class NeedsValues(nn.Module):
    """A leaf module that reads a value: it cannot run on the meta device."""

    def forward(self, x):
        return x * float(x.abs().max() > -1)


class Buffered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shuffle = Shuffle()
        self.head = nn.Conv2d(8, 8, 3, padding=1)
        self.values = NeedsValues()

    def forward(self, x):
        return self.values(self.head(self.shuffle(x)))


def buffered_net() -> nn.Module:
    return Buffered()


def test_replay_runs_on_meta_and_restores_non_persistent_buffers(tmp_path, monkeypatch):
    x = torch.randn(1, 8, 8, 8)
    small = fxsurgeon.convert(buffered_net(), source=buffered_net, leaf_modules=[Shuffle, NeedsValues])
    assert "shuffle.perm" not in small.state_dict()
    path = tmp_path / "b.safetensors"
    fxsurgeon.save(small, path)
    import fxsurgeon.rebuild as fio

    devices = []
    real = fio.replay_conversion

    def spy(record, source, model, *args, **kwargs):
        devices.append(next(model.parameters()).device.type)
        return real(record, source, model, *args, **kwargs)

    monkeypatch.setattr(fio, "replay_conversion", spy)
    again = load(path)
    assert devices == ["meta"]  # shapes not needed: no forward, the fast path holds
    assert torch.equal(again.get_submodule("shuffle").perm, small.get_submodule("shuffle").perm)
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)

    # with example inputs the replay propagates shapes, NeedsValues fails on meta: replayed on CPU instead
    small = fxsurgeon.convert(buffered_net(), source=buffered_net, leaf_modules=[Shuffle, NeedsValues],
                              example_inputs=x)
    fxsurgeon.save(small, path)
    devices.clear()
    again = load(path)
    assert devices == ["meta", "cpu"]
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- other passes


class CatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.mix = nn.Conv2d(16, 24, 3, padding=1)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        y = self.mix(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(y.mean((2, 3)))


def cat_net() -> nn.Module:
    return CatNet()


def test_every_pass_round_trips_including_data_driven_concat_reduction(tmp_path):
    if "concat_fusion" not in fxsurgeon.list_passes():
        pytest.skip("concat_fusion pass not registered")
    x = torch.randn(4, 8, 8, 8)
    small = fxsurgeon.convert(
        cat_net().eval(), source=cat_net, example_inputs=x[:1],
        concat_fusion=dict(mode="reduce", ratio=0.5, force=True, calibration=[x[:2], x[2:]]),
        separable=dict(energy=0.8),
    )
    passes = {r.pass_name for r in fxsurgeon.get_record(small).rewrites}
    assert {"concat_fusion", "separable"} <= passes
    path = tmp_path / "c.safetensors"
    fxsurgeon.save(small, path)
    opts = read_metadata(path)["record"]["options"]["concat_fusion"]
    assert "calibration" not in opts and "2 batch(es) not stored" in opts["calibration_omitted"]
    again = load(path)
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)


def test_cp_form_and_calibrated_weights_round_trip(tmp_path):
    from fxsurgeon.forms import FORMS

    if "pw-dw-pw" not in FORMS:
        pytest.skip("CP form not registered")
    calibrate = pytest.importorskip("fxsurgeon.calibrate").calibrate
    model = small_net().eval()
    x = torch.randn(8, 3, 12, 12)
    small = fxsurgeon.convert(model, source=small_net, example_inputs=x[:2],
                              separable=dict(form="pw-dw-pw", multiplier=4))
    assert {r.details["form"] for r in fxsurgeon.get_record(small).rewrites if r.pass_name == "separable"} == {
        "pw-dw-pw"}
    calibrate(small, model, [x[:4], x[4:]])  # refits weights in place after convert
    path = tmp_path / "cp.safetensors"
    fxsurgeon.save(small, path)
    again = load(path)
    small.eval()
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)
    assert "calibration" in fxsurgeon.get_record(again).extras


def bias_free_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


def test_bias_correction_on_bias_free_convs_round_trips(tmp_path):
    """Budgets correct the mean by default, giving bias-free convs' replacements a bias: the replay rebuilds it."""
    torch.manual_seed(0)
    model = bias_free_net().eval()
    x = torch.randn(2, 3, 12, 12)
    small = fxsurgeon.convert(model, source=bias_free_net, example_inputs=x, conv_head=False,
                              separable=dict(target_macs=0.5, form="dw-pw"))
    corrected = [r.target for r in fxsurgeon.get_record(small).rewrites if "bias_correction" in r.details]
    assert corrected and all(small.get_submodule(t).pointwise.bias is not None for t in corrected)
    path = tmp_path / "corrected.safetensors"
    fxsurgeon.save(small, path)
    again = load(path)
    torch.testing.assert_close(again(x), small.eval()(x), rtol=0, atol=0)


def test_budget_allocated_ranks_round_trip(tmp_path):
    """Ranks chosen by a MAC budget are replayed from the record, not re-allocated (which needs the weights)."""
    if "target_macs" not in fxsurgeon.get_pass("separable").options():
        pytest.skip("budget allocation not available")
    x = torch.randn(2, 3, 12, 12)
    small = fxsurgeon.convert(small_net(width=32).eval(), source={"factory": SMALL, "kwargs": {"width": 32}},
                              example_inputs=x, separable=dict(target_macs=0.6))
    assert any(r.pass_name == "separable" for r in fxsurgeon.get_record(small).rewrites)
    path = tmp_path / "b.safetensors"
    fxsurgeon.save(small, path)
    again = load(path)
    small.eval()
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)
