import pytest
import torch
from torch import nn

from fxsurgeon import SurgeryError
from fxsurgeon.synthetic import DEFAULT_COUNT, synthesize


def _net():
    """BatchNorms that remember data unlike N(0, 1) noise: smooth, offset, scaled images."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU())
    g = torch.Generator().manual_seed(0)
    real = 2.0 * nn.functional.interpolate(torch.randn(64, 3, 4, 4, generator=g), size=(12, 12), mode="bilinear")
    real = real + torch.tensor([0.5, -0.3, 1.0]).reshape(1, 3, 1, 1)
    with torch.no_grad():
        net.train()(real)
    return net.eval()


def _bn_mismatch(net, x):
    out = []
    hooks = [m.register_forward_hook(lambda m, a, o: out.append(
        (a[0].mean((0, 2, 3)) - m.running_mean).norm() + (a[0].std((0, 2, 3), unbiased=False)
                                                        - (m.running_var + m.eps).sqrt()).norm()))
        for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return float(sum(out))


def test_synthetic_images_match_the_batchnorm_statistics_and_leave_the_model_alone():
    net = _net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = synthesize(net, (3, 12, 12), count=40, steps=100, batch_size=16, lr=0.1)
    assert data.images.shape == (40, 3, 12, 12) and data.batchnorms == 2
    noise = torch.randn(40, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    assert _bn_mismatch(net.eval(), data.images) < 0.2 * _bn_mismatch(net, noise)
    assert data.loss_end < 0.2 * data.loss_start
    net.train()
    assert net.training and all(m.training for m in net.modules())  # modes restored
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # no statistic or weight moved
    assert all(p.grad is None for p in net.parameters())
    assert [b.shape[0] for b in data.batches(16)] == [16, 16, 8]


def test_synthesize_is_deterministic():
    net = _net().eval()
    a = synthesize(net, (3, 8, 8), count=6, steps=10, seed=3)
    b = synthesize(net, (3, 8, 8), count=6, steps=10, seed=3)
    c = synthesize(net, (3, 8, 8), count=6, steps=10, seed=4)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


def test_synthesize_bad_input():
    with pytest.raises(SurgeryError, match="no BatchNorm"):
        synthesize(nn.Sequential(nn.Conv2d(3, 4, 3)), (3, 8, 8))
    with pytest.raises(SurgeryError, match="shape"):
        synthesize(_net(), (0, 8))
    with pytest.raises(SurgeryError, match="count"):
        synthesize(_net(), (3, 8, 8), count=0)
    with pytest.raises(SurgeryError, match="lr"):
        synthesize(_net(), (3, 8, 8), lr=-1)
    with pytest.raises(SurgeryError, match="lr"):
        synthesize(_net(), (3, 8, 8), lr=True)


def test_convert_reuses_synthetic_images_across_budgets():
    import fxsurgeon

    net = _net()
    x = torch.randn(2, 3, 12, 12)
    data = synthesize(net, (3, 12, 12), count=24, steps=10, batch_size=12)
    a = fxsurgeon.convert(net, separable=dict(multiplier=1), conv_head=False, example_inputs=x, calibration=data)
    b = fxsurgeon.convert(net, separable=dict(multiplier=1), conv_head=False, example_inputs=x, calibration=data)
    info = fxsurgeon.get_record(a).extras["synthetic_calibration"]
    assert info["reused"] is True and info["images"] == 24 and info["seconds"] == data.seconds
    assert fxsurgeon.get_record(a).extras["calibration"]["options"]["downstream"] is False
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    assert data.images.shape == (24, 3, 12, 12)  # the caller's images are not changed


def test_convert_calibrates_on_synthetic_images_without_data():
    import fxsurgeon

    net = _net()
    x = torch.randn(2, 3, 12, 12)
    free = fxsurgeon.convert(net, separable=dict(multiplier=1), conv_head=False, example_inputs=x)
    syn = fxsurgeon.convert(net, separable=dict(multiplier=1), conv_head=False, example_inputs=x,
                            calibration="synthetic")
    rec = fxsurgeon.get_record(syn)
    info = rec.extras["synthetic_calibration"]
    assert info["images"] == DEFAULT_COUNT and info["batchnorms"] == 2 and info["loss_end"] < info["loss_start"]
    assert info["reused"] is False
    assert rec.extras["calibration"]["output_error_after"] < rec.extras["calibration"]["output_error_before"]
    # only the rewritten layers: refit to synthetic images, the layers after them would learn the images' quirks
    assert rec.extras["calibration"]["options"]["downstream"] is False
    assert not any(layer["downstream"] for layer in rec.extras["calibration"]["layers"])
    # closer to the original on data like the BatchNorms remember than the data-free conversion
    g = torch.Generator().manual_seed(9)
    real = 2.0 * nn.functional.interpolate(torch.randn(64, 3, 4, 4, generator=g), size=(12, 12), mode="bilinear")
    real = real + torch.tensor([0.5, -0.3, 1.0]).reshape(1, 3, 1, 1)
    with torch.no_grad():
        ref = net(real)
        e_free = float((free(real) - ref).norm() / ref.norm())
        e_syn = float((syn(real) - ref).norm() / ref.norm())
    assert e_syn < e_free


def test_convert_synthetic_calibration_needs_an_example_input():
    import fxsurgeon

    with pytest.raises(SurgeryError, match="example_inputs"):
        fxsurgeon.convert(_net(), calibration="synthetic")
    with pytest.raises(SurgeryError, match="'synthetic'"):
        fxsurgeon.convert(_net(), calibration="synth", example_inputs=torch.randn(1, 3, 8, 8))


def test_synthesize_options_are_validated_by_type():
    net = _net()
    for bad in ("cos", 1, None):
        with pytest.raises(SurgeryError, match="schedule"):
            synthesize(net, (3, 8, 8), count=2, steps=2, schedule=bad)
    for bad in (-0.1, 1.0, True, "0.01", float("nan")):
        with pytest.raises(SurgeryError, match="tol"):
            synthesize(net, (3, 8, 8), count=2, steps=2, tol=bad)


def test_cosine_schedule_ends_low_and_constant_stays():
    from fxsurgeon.synthetic import _lr_at

    assert _lr_at(0, 50, 0.2, "cosine") == pytest.approx(0.2)
    assert _lr_at(49, 50, 0.2, "cosine") == pytest.approx(0.002)
    assert all(_lr_at(s, 50, 0.2, "cosine") > _lr_at(s + 1, 50, 0.2, "cosine") for s in range(49))
    assert {_lr_at(s, 50, 0.2, "constant") for s in range(50)} == {0.2}
    # the schedule changes the path, so the images
    net = _net()
    a = synthesize(net, (3, 8, 8), count=4, steps=8, lr=0.1, schedule="constant", tol=0.0)
    b = synthesize(net, (3, 8, 8), count=4, steps=8, lr=0.1, schedule="cosine", tol=0.0)
    assert not torch.equal(a.images, b.images)


def test_early_stop_ends_a_batch_on_a_plateau_and_says_so():
    net = _net()
    full = synthesize(net, (3, 8, 8), count=8, steps=300, batch_size=4, lr=0.1, schedule="constant", tol=0.0)
    assert full.steps_run == [300, 300] and len(full.history) == 300
    early = synthesize(net, (3, 8, 8), count=8, steps=300, batch_size=4, lr=0.1, schedule="constant", tol=0.05)
    assert len(early.steps_run) == 2 and all(11 <= s < 300 for s in early.steps_run)
    assert len(early.history) == early.steps_run[0]
    # it stopped where the last 10 steps gained less than 5 %, not before
    h = early.history
    assert h[-11] - h[-1] < 0.05 * h[-1]
    assert all(h[i - 10] - h[i] >= 0.05 * h[i] for i in range(10, len(h) - 1))
    # the steps it ran are the full run's first steps: the same images as a run of that many steps
    same = synthesize(net, (3, 8, 8), count=4, steps=300, batch_size=4, lr=0.1, schedule="constant", tol=0.0)
    assert torch.equal(torch.tensor(same.history[:len(h)]), torch.tensor(h))


def test_smooth_start_is_seeded_smooth_and_validated():
    from fxsurgeon.synthetic import DEFAULT_INIT, _start

    assert DEFAULT_INIT == "smooth"
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    smooth, noise = _start(64, (3, 16, 16), "smooth", g()), _start(64, (3, 16, 16), "noise", g())
    assert torch.equal(smooth, _start(64, (3, 16, 16), "smooth", g()))
    assert float(smooth.std()) == pytest.approx(1.0, abs=1e-5) and float(noise.std()) == pytest.approx(1.0, abs=0.02)
    # neighbouring pixels: correlated in the smooth start, not in white noise

    def corr(x):
        return float(torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1])

    assert corr(smooth) > 0.5 and abs(corr(noise)) < 0.05
    assert _start(2, (5,), "smooth", g()).shape == (2, 5)  # no spatial sizes: white noise
    assert _start(2, (3, 7, 5), "smooth", g()).shape == (2, 3, 7, 5)
    net = _net()
    a = synthesize(net, (3, 8, 8), count=4, steps=3, init="noise")
    b = synthesize(net, (3, 8, 8), count=4, steps=3)
    assert not torch.equal(a.images, b.images)
    for bad in ("white", None, 0):
        with pytest.raises(SurgeryError, match="init"):
            synthesize(net, (3, 8, 8), count=2, steps=2, init=bad)


def test_smooth_start_matches_sooner_than_white_noise():
    net = _net()
    kw = dict(count=32, steps=15, batch_size=32, lr=0.05, schedule="constant")
    smooth = synthesize(net, (3, 12, 12), init="smooth", **kw)
    noise = synthesize(net, (3, 12, 12), init="noise", **kw)
    assert smooth.loss_start < noise.loss_start and smooth.loss_end < noise.loss_end
