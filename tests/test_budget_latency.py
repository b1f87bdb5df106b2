"""Latency-aware separable conversion: keep/drop decisions driven by a fake timer, shapes, options, errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon.budget.latency import LatencyJudge, LayerTiming, is_faster
from fxsurgeon.modules import SeparableConv2d


class Net(nn.Module):
    """Three 3×3 convs of growing width, the middle one strided, and one conv called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c = nn.Conv2d(32, 64, 3, padding=1)
        self.shared = nn.Conv2d(64, 64, 3, padding=1)

    def forward(self, x):
        x = self.c(self.b(self.a(x)).relu()).relu()
        return self.shared(self.shared(x).relu())


class FakeTimer:
    """Pretends replacements are faster only for wide layers; notes every call's module and input."""

    def __init__(self, faster_from: int = 32, original_s: float = 2e-3, fast_s: float = 1e-3, slow_s: float = 3e-3):
        self.faster_from, self.original_s, self.fast_s, self.slow_s = faster_from, original_s, fast_s, slow_s
        self.calls: list[tuple[nn.Module, tuple]] = []

    def __call__(self, module, inputs):
        self.calls.append((module, inputs))
        if isinstance(module, nn.Conv2d):
            return self.original_s
        width = module.depthwise.in_channels
        return self.fast_s if width >= self.faster_from else self.slow_s


def convert(timer, x=None, **opts):
    x = torch.randn(2, 8, 16, 16) if x is None else x
    return fxsurgeon.convert(Net().eval(), example_inputs=x,
                             separable=dict(latency_aware=dict(timer=timer, **opts.pop("judge", {})), **opts))


def test_is_faster():
    assert is_faster(2.0, 1.0) and not is_faster(1.0, 1.0) and not is_faster(1.0, 2.0)
    assert not is_faster(1.0, 0.95, margin=0.1) and is_faster(1.0, 0.85, margin=0.1)


def test_keeps_only_rewrites_the_timer_finds_faster():
    timer = FakeTimer(faster_from=32)
    gm = convert(timer)
    rec = gm.meta["fxsurgeon"]
    assert sorted(r.target for r in rec.rewrites) == ["c", "shared"]
    assert isinstance(gm.get_submodule("c"), SeparableConv2d) and isinstance(gm.get_submodule("shared"), SeparableConv2d)
    assert type(gm.get_submodule("a")) is nn.Conv2d and type(gm.get_submodule("b")) is nn.Conv2d
    dropped = {s.target: s for s in rec.skipped if s.reason.startswith("latency_aware")}
    assert sorted(dropped) == ["a", "b"]
    lat = dropped["a"].details["latency"]
    assert lat["original_ms"] == pytest.approx(2.0) and lat["replacement_ms"] == pytest.approx(3.0)
    assert lat["kept"] is False and "3.0000 ms vs 2.0000 ms" in dropped["a"].reason
    kept = next(r for r in rec.rewrites if r.target == "c").details["latency"]
    assert kept["kept"] is True and kept["speedup"] == pytest.approx(2.0)
    assert kept["device"] == "cpu" and kept["dtype"] == "fp32" and kept["memory_format"] == "contiguous"
    # the record stays JSON-ready apart from the user's own timer object in the options
    json.dumps([r.to_dict() for r in rec.rewrites] + [s.to_dict() for s in rec.skipped])


def test_timer_sees_each_layers_real_input_shape_and_sums_call_sites():
    timer = FakeTimer()
    gm = convert(timer, judge={"rounds": 1})
    shapes = {}
    for module, inputs in timer.calls:
        key = module.in_channels if isinstance(module, nn.Conv2d) else module.depthwise.in_channels
        shapes.setdefault(key, []).append(tuple(inputs[0].shape))
    assert shapes[8] == [(2, 8, 16, 16)] * 2      # a: original, then replacement
    assert shapes[16] == [(2, 16, 16, 16)] * 2    # b
    assert shapes[32] == [(2, 32, 8, 8)] * 2      # c runs after the stride-2 conv
    assert shapes[64] == [(2, 64, 8, 8)] * 4      # shared: two call sites, each timed
    lat = next(r for r in gm.meta["fxsurgeon"].rewrites if r.target == "shared").details["latency"]
    assert lat["original_ms"] == pytest.approx(4.0) and lat["replacement_ms"] == pytest.approx(2.0)
    assert lat["input_shapes"] == [[2, 64, 8, 8], [2, 64, 8, 8]]


def test_timed_copies_are_eval_mode_and_the_model_is_untouched(snapshot):
    timer = FakeTimer()
    net = Net().train()
    check = snapshot(net)
    gm = fxsurgeon.convert(net, example_inputs=torch.randn(2, 8, 16, 16),
                           separable=dict(latency_aware=dict(timer=timer, dtype="fp64", batch_size=5)))
    check()
    for module, inputs in timer.calls:
        assert not module.training
        assert all(p.dtype == torch.float64 for p in module.parameters())
        assert inputs[0].dtype == torch.float64 and inputs[0].shape[0] == 5
    assert all(p.dtype == torch.float32 for p in gm.parameters())  # only the timed copies were cast
    assert gm.training  # converted model keeps the original's mode


def test_input_dtype_and_memory_format_follow_the_model():
    timer = FakeTimer()
    net = Net().double().to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    gm = fxsurgeon.convert(net, example_inputs=x, separable=dict(latency_aware=dict(timer=timer)))
    assert timer.calls
    for module, inputs in timer.calls:
        assert inputs[0].dtype == torch.float64
        assert inputs[0].is_contiguous(memory_format=torch.channels_last)
        assert module.weight.dtype == torch.float64 if isinstance(module, nn.Conv2d) else True
    lat = next(r for r in gm.meta["fxsurgeon"].rewrites).details["latency"]
    assert lat["dtype"] == "fp64" and lat["memory_format"] == "channels_last"
    assert gm.meta["fxsurgeon"].verification.dtype == "float64"


def test_margin_demands_a_clear_win():
    # replacement 1.9 ms vs 2.0 ms: 5% faster, kept without a margin, dropped with margin 0.1
    assert len(convert(FakeTimer(faster_from=0, fast_s=1.9e-3)).meta["fxsurgeon"].rewrites) == 4
    gm = convert(FakeTimer(faster_from=0, fast_s=1.9e-3), judge={"margin": 0.1})
    assert gm.meta["fxsurgeon"].rewrites == []
    assert all("by more than 10%" in s.reason for s in gm.meta["fxsurgeon"].skipped if s.target in "abc")


def test_rounds_take_the_fastest_measurement():
    seen = []

    def noisy(module, inputs):  # the first measurement of each module is disturbed
        seen.append(id(module))
        slow = seen.count(id(module)) == 1
        return (5e-3 if slow else 2e-3) if isinstance(module, nn.Conv2d) else (9e-3 if slow else 1e-3)

    judge = LatencyJudge(timer=noisy, rounds=2)
    t = judge.compare("x", nn.Conv2d(8, 8, 3), nn.Identity(), [torch.randn(1, 8, 8, 8)])
    assert (t.original_ms, t.replacement_ms) == (pytest.approx(2.0), pytest.approx(1.0)) and t.kept
    one = LatencyJudge(timer=lambda m, x: noisy(m, x), rounds=1)
    seen.clear()
    assert not one.compare("x", nn.Conv2d(8, 8, 3), nn.Identity(), [torch.randn(1, 8, 8, 8)]).kept


def test_layers_named_explicitly_are_not_timed():
    timer = FakeTimer(faster_from=1000)  # every replacement "slower"
    gm = fxsurgeon.convert(Net().eval(), example_inputs=torch.randn(2, 8, 16, 16),
                           separable=dict(latency_aware=dict(timer=timer), layers={"a": {"rank": 1}}))
    assert [r.target for r in gm.meta["fxsurgeon"].rewrites] == ["a"]
    assert "latency" not in gm.meta["fxsurgeon"].rewrites[0].details
    assert all(getattr(m, "in_channels", None) != 8 for m, _ in timer.calls)


def test_conv_inside_a_leaf_module_is_kept_untimed():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + x

    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), Block()).eval()
    gm = fxsurgeon.convert(net, example_inputs=torch.randn(1, 8, 8, 8), leaf_modules=[Block],
                           separable=dict(latency_aware=dict(timer=FakeTimer(faster_from=0))))
    rec = gm.meta["fxsurgeon"]
    assert [r.target for r in rec.rewrites] == ["0"]
    skip = next(s for s in rec.skipped if s.target == "1.conv")
    assert "input shape unknown" in skip.reason and skip.details["latency"] == {"timed": False}


def test_real_timer_on_cpu_decides_every_candidate():
    net = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    gm = fxsurgeon.convert(net, example_inputs=torch.randn(1, 16, 16, 16),
                           separable=dict(latency_aware=dict(warmup=1, iters=3)))
    rec = gm.meta["fxsurgeon"]
    timed = [r.details["latency"] for r in rec.rewrites] + [s.details["latency"] for s in rec.skipped]
    assert len(timed) == 2
    for t in timed:
        assert t["original_ms"] > 0 and t["replacement_ms"] > 0 and t["device"] == "cpu"
        assert t["kept"] == (t["replacement_ms"] < t["original_ms"])
    json.dumps(rec.to_dict(), default=str)


def test_recipe_accepts_latency_options(tmp_path):
    from fxsurgeon.recipes import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("separable:\n  latency_aware:\n    iters: 3\n    margin: 0.05\n  device: cpu\n")
    assert load_recipe(path) == {"separable": {"latency_aware": {"iters": 3, "margin": 0.05}, "device": "cpu"}}


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (dict(device="cpu"), "needs latency_aware=True"),
        (dict(latency_aware=dict(iterations=3)), "unknown option"),
        (dict(latency_aware=dict(margin=1.5)), "margin"),
        (dict(latency_aware=dict(iters=0)), "iters"),
        (dict(latency_aware=dict(batch_size=0)), "batch_size"),
        (dict(latency_aware=dict(dtype="int8")), "dtype"),
        (dict(latency_aware=dict(timer=3)), "timer"),
        (dict(latency_aware="yes"), "latency_aware takes"),
    ],
)
def test_bad_options(opts, match):
    with pytest.raises(fxsurgeon.SurgeryError, match=match):
        fxsurgeon.convert(Net().eval(), example_inputs=torch.randn(1, 8, 8, 8), separable=opts)


def test_needs_example_inputs():
    with pytest.raises(fxsurgeon.SurgeryError, match="example_inputs"):
        fxsurgeon.convert(Net().eval(), separable=dict(latency_aware=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_is_refused():
    with pytest.raises(fxsurgeon.SurgeryError, match="cuda"):
        fxsurgeon.convert(Net().eval(), example_inputs=torch.randn(1, 8, 8, 8),
                          separable=dict(latency_aware=True, device="cuda"))


def test_layer_timing_reason_and_dict():
    t = LayerTiming("l", "cuda:0", "H100", "bf16", "channels_last", [[64, 64, 56, 56]], 0.5, 0.6, 0.0)
    assert not t.kept and t.speedup == pytest.approx(0.5 / 0.6)
    assert "cuda:0 (H100, bf16, channels_last, input 64×64×56×56)" in t.reason()
    assert t.to_dict()["kept"] is False
