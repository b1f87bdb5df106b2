import copy

import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.calibrate import as_batches, calibrate, reestimate_batchnorm, residual, ridge_refit


def test_ridge_refit_is_least_squares_and_shrinks_towards_w0():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 6, generator=g, dtype=torch.float64)
    w_true = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = z @ w_true + 0.01 * torch.randn(200, 3, generator=g, dtype=torch.float64)
    w0 = torch.zeros(6, 3, dtype=torch.float64)
    gram, cross = z.T @ z, z.T @ y
    ls = ridge_refit(gram, cross, w0, 0.0)
    torch.testing.assert_close(ls, torch.linalg.lstsq(z, y).solution)
    assert residual(gram, cross, float(y.pow(2).sum()), ls) == pytest.approx(float((z @ ls - y).pow(2).sum()))
    far = ridge_refit(gram, cross, w0 + 5.0, 1e6)
    assert (far - 5.0).abs().max() < 1e-3  # huge ridge: stays at w0
    # singular Gram (a dead input channel): still a finite answer
    z[:, 2] = 0
    assert torch.isfinite(ridge_refit(z.T @ z, z.T @ y, w0, 0.0)).all()


def make_task(n, generator):
    """4 classes: which quadrant of a 16×16 image holds a bright blob, on noise."""
    x = 0.5 * torch.randn(n, 3, 16, 16, generator=generator)
    y = torch.randint(0, 4, (n,), generator=generator)
    for i, c in enumerate(y.tolist()):
        r, s = divmod(c, 2)
        x[i, :, r * 8 + 2:r * 8 + 6, s * 8 + 2:s * 8 + 6] += 1.5
    return x, y


def trained_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(40):
        x, y = make_task(64, g)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_calibration_beats_data_free_on_a_trained_model(snapshot):
    net = trained_cnn()
    check = snapshot(net)
    g = torch.Generator().manual_seed(1)
    calib = [make_task(64, g)[0] for _ in range(4)]
    held_out, labels = make_task(256, g)
    with torch.no_grad():
        ref = net(held_out)
    assert (ref.argmax(1) == labels).float().mean() > 0.9  # it did learn the task
    free = fxsurgeon.convert(net, separable=dict(multiplier=1))
    cal = fxsurgeon.convert(net, separable=dict(multiplier=1), calibration=calib)
    with torch.no_grad():
        e_free, e_cal = rel_err(free(held_out), ref), rel_err(cal(held_out), ref)
    assert e_cal < 0.7 * e_free
    rec = fxsurgeon.get_record(cal)
    report = rec.extras["calibration"]
    assert report["output_error_after"] < report["output_error_before"]
    assert report["samples"] == 256 and report["batches"] == 4
    refit = [r for r in rec.rewrites if r.pass_name == "separable"]
    assert len(refit) == 2  # the stem (3 input channels) is skipped by default
    for r in refit:
        c = r.details["calibration"]
        # depthwise and pointwise refit together: the record names the whole block
        assert c["refit"] and c["layer"] == r.target and c["error_after"] < c["error_before"]
    assert "calibrate" in rec.seconds
    # with real data the classifier after them is refit too (an exact conv head, against the original Linear)
    assert report["options"]["downstream"] is True
    assert [x["layer"] for x in report["layers"] if x["downstream"]] == ["11"]
    check()


def test_frontier_and_streaming_give_the_same_refit():
    net = trained_cnn()
    g = torch.Generator().manual_seed(2)
    calib = [make_task(32, g)[0] for _ in range(3)]
    base = fxsurgeon.convert(net, separable=dict(multiplier=2))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ra = calibrate(a, net, calib, mode="frontier", bn=False, relu=False)  # streaming has no ReLU relaxation
    rb = calibrate(b, net, calib, mode="streaming", bn=False)
    assert ra.mode == "frontier" and rb.mode == "streaming"
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    assert ra.output_error_after == pytest.approx(rb.output_error_after, rel=1e-4)


def test_blocks_that_cannot_be_unfolded_refit_their_pointwise_conv():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1)).eval()
    small = fxsurgeon.convert(net, separable=dict(multiplier=1))
    rep = calibrate(small, net, [torch.randn(8, 8, 10, 10) for _ in range(2)])
    layers = {x.target: x for x in rep.layers}
    assert layers["0"].layer == "0.pointwise" and layers["0"].refit  # reflect padding: no unfold
    assert layers["2"].layer == "2" and layers["2"].refit
    assert rep.output_error_after < rep.output_error_before


def test_calibrate_accepts_an_eager_original_and_a_single_tensor():
    net = trained_cnn()
    small = fxsurgeon.convert(net, separable=dict(multiplier=1))
    x = make_task(64, torch.Generator().manual_seed(3))[0]
    rep = calibrate(small, net, x)
    assert rep.batches == 1 and rep.output_error_after < rep.output_error_before


def test_reestimate_batchnorm_is_exact_and_independent_of_batch_order():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)).eval()
    a = torch.randn(32, 3, 10, 10) + 2.0  # two "classes" with different statistics
    b = torch.randn(32, 3, 10, 10) - 1.0
    sorted_net, mixed_net = copy.deepcopy(net), copy.deepcopy(net)
    assert reestimate_batchnorm(sorted_net, [a, b]) == 2
    reestimate_batchnorm(mixed_net, [torch.cat([a[:16], b[:16]]), torch.cat([a[16:], b[16:]])])
    for n in ("1", "4"):
        bs, bm = sorted_net.get_submodule(n), mixed_net.get_submodule(n)
        torch.testing.assert_close(bs.running_mean, bm.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bs.running_var, bm.running_var, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        h = net[0](torch.cat([a, b]))
    torch.testing.assert_close(sorted_net[1].running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sorted_net[1].running_var, h.var((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not any(m.training for m in sorted_net.modules())


def test_bad_calibration_inputs():
    net = trained_cnn()
    small = fxsurgeon.convert(net, separable=dict(multiplier=1))
    with pytest.raises(SurgeryError, match="empty"):
        as_batches([])
    with pytest.raises(SurgeryError, match="tensor"):
        as_batches([1, 2])
    with pytest.raises(SurgeryError, match="iterable"):
        as_batches(3)
    x, y = make_task(8, torch.Generator().manual_seed(0))
    with pytest.raises(SurgeryError, match=r"\(inputs, labels\)"):
        calibrate(small, net, [(x, y)], mode="streaming")
    with pytest.raises(SurgeryError, match="bn"):
        calibrate(small, net, x, bn="sometimes")


@pytest.mark.timm
def test_timm_model_error_falls_with_random_data():
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_resnet", pretrained=False, zero_init_last=False).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, 64, 64, generator=g) for _ in range(2)]
    held_out = torch.randn(8, 3, 64, 64, generator=g)
    free = fxsurgeon.convert(model, separable=dict(multiplier=2))
    cal = fxsurgeon.convert(model, separable=dict(multiplier=2), calibration=calib)
    with torch.no_grad():
        ref = model(held_out)
        e_free, e_cal = rel_err(free(held_out), ref), rel_err(cal(held_out), ref)
    assert e_cal < e_free
    report = fxsurgeon.get_record(cal).extras["calibration"]
    assert report["output_error_after"] < report["output_error_before"]
    assert sum(x["refit"] for x in report["layers"]) >= 5


def test_concat_fusion_reduce_consumers_are_refit():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 12, 3, padding=1)
            self.b = nn.Conv2d(4, 12, 1)
            self.bn = nn.BatchNorm2d(24)
            self.head = nn.Conv2d(24, 16, 3, padding=1)

        def forward(self, x):
            return self.head(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # correlated channels, as trained features are: a reduction has something to keep
        net.b.weight.copy_(net.a.weight[:, :, 1:2, 1:2] + 0.1 * net.b.weight)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 4, 12, 12, generator=g) for _ in range(3)]
    x = torch.randn(2, 4, 12, 12)
    out = fxsurgeon.convert(net, example_inputs=x, separable=False, conv_head=False, calibration=calib,
                            concat_fusion=dict(mode="reduce", out_channels=8))
    rec = fxsurgeon.get_record(out)
    rw = next(r for r in rec.rewrites if r.pass_name == "concat_fusion")
    assert any("calibration_positions" in s for s in rw.details["sites"])  # convert handed the data to the pass
    c = rw.details["calibration"]
    assert c["layer"] == "head" and c["refit"] and c["error_after"] < c["error_before"]
    report = rec.extras["calibration"]
    assert report["output_error_after"] < report["output_error_before"]


def test_calibrated_model_saves_and_loads(tmp_path):
    from fxsurgeon.models import resnet20

    torch.manual_seed(0)
    model = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    small = fxsurgeon.convert(model, calibration=[torch.randn(4, 3, 32, 32)], source=resnet20,
                              separable=dict(multiplier=2))
    path = tmp_path / "small.safetensors"
    fxsurgeon.save(small, path)
    again = fxsurgeon.load(path)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x))
    assert fxsurgeon.get_record(again).extras["calibration"]["output_error_after"] is not None


def _distill_recipe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "distill.py"
    spec = importlib.util.spec_from_file_location("fxsurgeon_recipe_distill", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_distill_recipe_moves_the_student_towards_the_teacher():
    recipe = _distill_recipe()
    teacher = trained_cnn()
    student = fxsurgeon.convert(teacher, separable=dict(multiplier=1))
    student.train()  # modes are the caller's: restored after distilling
    g = torch.Generator().manual_seed(4)
    images = make_task(128, g)[0]
    held_out = make_task(128, g)[0]
    with torch.no_grad():
        ref = teacher(held_out)
        before = rel_err(student.eval()(held_out), ref)
    student.train()
    stats = recipe.distill(student, teacher, images, epochs=6, batch_size=32, augment=None, progress=False)
    assert student.training and not teacher.training
    assert all(p.is_contiguous() for p in student.parameters())  # back from channels-last
    assert stats["steps"] == 24 and stats["loss_last"] < stats["loss_first"]
    with torch.no_grad():
        assert rel_err(student.eval()(held_out), ref) < before
    aug = recipe.cifar_augment(images[:4], torch.Generator().manual_seed(0))
    assert aug.shape == images[:4].shape


# ------------------------------------------------------------------------------- residual-aware targets


class _Residual(nn.Module):
    """Two ResNet basic blocks; the second downsamples with a 1×1 conv shortcut traced *after* its conv2."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a1, self.an1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a2, self.an2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.b1, self.bn1 = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24)
        self.b2, self.bn2 = nn.Conv2d(24, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24)
        self.down = nn.Sequential(nn.Conv2d(16, 24, 1, stride=2, bias=False), nn.BatchNorm2d(24))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.an2(self.a2(torch.relu(self.an1(self.a1(x))))))
        y = self.bn2(self.b2(torch.relu(self.bn1(self.b1(x)))))
        return torch.relu(y + self.down(x))


def _residual_net():
    torch.manual_seed(0)
    net = _Residual()
    g = torch.Generator().manual_seed(0)
    for m in net.modules():  # BatchNorms with statistics of their own, as a trained net has
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return net.eval()


def _residual_sums(model, x):
    """The value of every residual sum (the inputs of the blocks' last ReLUs) on ``x``."""
    gm = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    out = {}
    interp = torch.fx.Interpreter(gm)
    run_node = interp.run_node

    def keep(n):
        v = run_node(n)
        if n in adds:
            out[adds.index(n)] = v
        return v

    interp.run_node = keep
    with torch.no_grad():
        interp.run(x)
    return [out[i] for i in range(len(adds))]


def test_block_targets_fit_the_sum_not_the_layer():
    net = _residual_net()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 3, 16, 16, generator=g) for _ in range(3)]
    x = torch.cat(calib)
    ref = _residual_sums(net, x)
    small = fxsurgeon.convert(net, separable=dict(form="dw-pw", multiplier=1), conv_head=False)
    errs = {}
    for kind in ("layer", "block"):
        m = copy.deepcopy(small)
        rep = calibrate(m, net, calib, targets=kind, bn=False, relu=False)  # compares the sums before the ReLU
        kinds = {r.layer: r.target_kind for r in rep.layers}
        errs[kind] = [rel_err(a, b) for a, b in zip(_residual_sums(m, x), ref)]
        if kind == "block":
            # the blocks' last convs (a2: identity shortcut; b2: a shortcut conv that runs after it) fit the sum
            assert kinds["a2"] == kinds["b2"] == "block"
            assert kinds["a1"] == kinds["b1"] == "layer"  # followed by a ReLU, not a sum
        else:
            assert set(kinds.values()) == {"layer"}
    # the first block's shortcut is the exact stem's output: no error to cancel, the same fit
    assert errs["block"][0] == pytest.approx(errs["layer"][0], rel=1e-5)
    # the second's carries the first block's error: fitting the sum cancels part of it
    assert errs["block"][1] < 0.99 * errs["layer"][1]


@pytest.mark.parametrize("option, value", [("targets", "blocks"), ("relu", "yes"), ("downstream", "all")])
def test_calibrate_rejects_bad_options(option, value):
    net = _residual_net()
    small = fxsurgeon.convert(net, separable=dict(multiplier=1), conv_head=False)
    with pytest.raises(SurgeryError, match=option):
        calibrate(small, net, torch.randn(2, 3, 16, 16), **{option: value})


def test_three_factor_refit_lowers_the_error_it_reports():
    import fxsurgeon.calibrate.separable_stats as C  # the module that reads the knob

    net = _residual_net()
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(16, 3, 16, 16, generator=g) for _ in range(2)]
    small = fxsurgeon.convert(net, separable=dict(form="pw-dw-pw", multiplier=1), conv_head=False)
    errs, reduce_w = {}, {}
    for refit_reduce in (False, True):
        m = copy.deepcopy(small)
        old = C.REFIT_REDUCE
        C.REFIT_REDUCE = refit_reduce
        try:
            rep = calibrate(m, net, calib, targets="layer", bn=False, relu=False)  # measured before the ReLU
        finally:
            C.REFIT_REDUCE = old
        layers = {r.layer: r for r in rep.layers}
        errs[refit_reduce] = layers["b1"].error_after
        reduce_w[refit_reduce] = m.get_submodule("b1.reduce").weight.detach().clone()
        # the reported error is the true one: the block's output on the calibration data against the original's
        xs, ys = [], []
        h1 = m.get_submodule("b1").register_forward_hook(lambda mod, a, o, xs=xs: xs.append(o))
        h2 = net.get_submodule("b1").register_forward_hook(lambda mod, a, o, ys=ys: ys.append(o))
        with torch.no_grad():
            for b in calib:
                m(b)
                net(b)
        h1.remove()
        h2.remove()
        measured = rel_err(torch.cat(xs), torch.cat(ys))
        assert measured == pytest.approx(layers["b1"].error_after, rel=1e-3)
    assert errs[True] < 0.97 * errs[False]
    assert not torch.equal(reduce_w[True], small.get_submodule("b1.reduce").weight)
    torch.testing.assert_close(reduce_w[False], small.get_submodule("b1.reduce").weight)


def test_calibrate_finds_the_record_of_a_torch_loaded_model(tmp_path):
    net = _residual_net()
    small = fxsurgeon.convert(net, separable=dict(multiplier=1), conv_head=False)
    torch.save(small, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    rep = calibrate(again, net, torch.randn(8, 3, 16, 16))  # rewrites come from the record
    assert rep.layers and rep.output_error_after < rep.output_error_before


def test_residual_join_matches_only_sums_fed_through_at_most_a_batchnorm():
    from fxsurgeon.calibrate.targets import residual_join

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
            self.bn1, self.bn3 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            x = x + self.bn1(self.c1(x))  # through a BatchNorm
            x = self.c2(x) + x  # directly, either side of the sum
            x = x + torch.relu(self.bn3(self.c3(x)))  # an activation between: no
            y = self.c4(x)
            return y + y  # the layer's output with itself: no

    gm = torch.fx.symbolic_trace(Net().eval())
    node = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    other, scale = residual_join(gm, node["c1"])
    assert other.op == "placeholder" and scale.shape == (4,)
    torch.testing.assert_close(scale, (gm.bn1.running_var.double() + gm.bn1.eps).rsqrt() * gm.bn1.weight.double())
    other, scale = residual_join(gm, node["c2"])
    assert other.name == "add" and scale is None
    assert residual_join(gm, node["c3"]) is None and residual_join(gm, node["c4"]) is None


def test_block_targets_reach_a_block_that_refits_only_its_pointwise_conv():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", bias=False)  # no unfold: pointwise only
            self.bn = nn.BatchNorm2d(8)
            self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)

        def forward(self, x):
            x = x + self.bn(self.b(torch.relu(x)))  # through a BatchNorm
            return x + self.a(x)  # directly, the block's output being its pointwise conv's

    torch.manual_seed(0)
    net = Net().eval()
    small = fxsurgeon.convert(net, separable=dict(multiplier=1), conv_head=False)
    rep = calibrate(small, net, [torch.randn(8, 8, 10, 10) for _ in range(2)], bn=False)
    kinds = {r.layer: r.target_kind for r in rep.layers}
    assert kinds == {"b": "block", "a.pointwise": "block"}


# ------------------------------------------------------------------------------- ReLU-aware targets


def test_relax_for_relu_keeps_what_the_relu_passes_and_frees_the_rest():
    from fxsurgeon.calibrate.targets import _relax_for_relu

    g = torch.Generator().manual_seed(0)
    y, pred, shift = (torch.randn(4, 3, 5, 5, generator=g) for _ in range(3))
    scale = torch.tensor([2.0, -0.5, 0.0], dtype=torch.float64)  # a negative BatchNorm scale, and a dead channel
    a = scale.float().reshape(1, -1, 1, 1)
    v = a * y + shift  # the original's ReLU input

    def u(t):  # the converted model's ReLU input when the layer outputs t
        return v + a * (t - y)

    relaxed, dead = _relax_for_relu(y, pred, v, scale)
    zeroed = (v <= 0) & (a != 0)
    assert dead == int(zeroed.sum()) > 0
    assert torch.equal(relaxed[~zeroed], y[~zeroed])  # what the ReLU passes on is asked for exactly
    assert (u(relaxed)[zeroed] <= 1e-6).all()  # elsewhere, anything the ReLU zeroes too
    already = zeroed & (u(pred) <= 0)
    assert torch.equal(relaxed[already], pred[already])  # an output already zeroed stays where it is
    moved = zeroed & (u(pred) > 0)
    assert moved.any()
    torch.testing.assert_close(u(relaxed)[moved], torch.zeros(int(moved.sum())), atol=1e-6, rtol=0)  # the boundary
    same, _ = _relax_for_relu(y, pred, y, None)  # no BatchNorm: the ReLU reads the layer's output itself
    torch.testing.assert_close(same, torch.where(y > 0, y, torch.clamp_max(pred, 0)))


def _post_relu(model, names, x):
    """Every named layer's output after its BatchNorm and ReLU (a1 → an1 → relu in _Residual)."""
    out = {}
    hooks = [model.get_submodule(bn).register_forward_hook(lambda m, a, o, bn=bn: out.__setitem__(bn, o.relu()))
             for bn in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_relu_targets_lower_the_error_after_the_relu_and_report_it():
    net = _residual_net()
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(16, 3, 16, 16, generator=g) for _ in range(3)]
    x = torch.cat(calib)
    small = fxsurgeon.convert(net, separable=dict(form="dw-pw", multiplier=1), conv_head=False)
    runs = {}
    for relu in (False, True):
        m = copy.deepcopy(small)
        rep = calibrate(m, net, calib, bn=False, relu=relu)
        runs[relu] = (m, {r.layer: r for r in rep.layers})
    plain, relaxed = runs[False][1], runs[True][1]
    assert all(r.relu_relaxed is None for r in plain.values())
    # every rewritten conv here feeds a ReLU (a1, b1 through a BatchNorm; a2, b2 through a BatchNorm and a sum)
    assert all(0 < relaxed[n].relu_relaxed < 1 for n in ("a1", "a2", "b1", "b2"))
    assert relaxed["a2"].target_kind == "block" and relaxed["a1"].target_kind == "layer"
    # a1's inputs are exact (the stem is the original's), so its post-ReLU error compares the two fits directly
    ref = _post_relu(net, ["an1"], x)["an1"]
    errs = {relu: rel_err(_post_relu(m, ["an1"], x)["an1"], ref) for relu, (m, _) in runs.items()}
    assert errs[True] < 0.97 * errs[False]  # 0.362 against 0.384
    # the reported error is the one the ReLU sees: passed positions in full, zeroed ones by how far they pass
    m = runs[True][0]
    ys, preds = [], []
    h1 = net.get_submodule("a1").register_forward_hook(lambda mod, a, o: ys.append(o))
    h2 = m.get_submodule("a1").register_forward_hook(lambda mod, a, o: preds.append(o))
    with torch.no_grad():
        net(x)
        m(x)
    h1.remove()
    h2.remove()
    bn = net.an1
    scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().reshape(1, -1, 1, 1)
    y, pred = ys[0].double(), preds[0].double()
    v = bn(ys[0]).detach().double()
    u = v + scale * (pred - y)
    dist = torch.where(v > 0, pred - y, u.clamp_min(0) / scale.abs())
    assert relaxed["a1"].error_after == pytest.approx(float(dist.norm() / y.norm()), rel=1e-4)
    assert relaxed["a1"].relu_relaxed == pytest.approx(float((v <= 0).double().mean()), abs=1e-6)
    assert relaxed["a1"].error_after < relaxed["a1"].error_before


# ------------------------------------------------------------------------------- downstream layers


def test_downstream_layers_compensate_the_error_reaching_them():
    net = _residual_net()
    g = torch.Generator().manual_seed(4)
    calib = [torch.randn(16, 3, 16, 16, generator=g) for _ in range(3)]
    x = torch.cat(calib)
    # only the first block is rewritten: the second block's convs and its 1×1 shortcut are downstream
    small = fxsurgeon.convert(net, separable=dict(form="dw-pw", multiplier=1, exclude=["b1", "b2"]),
                              conv_head=False)
    runs = {}
    for downstream in (False, True):
        m = copy.deepcopy(small)
        rep = calibrate(m, net, calib, bn=False, downstream=downstream)
        runs[downstream] = (m, {r.layer: r for r in rep.layers}, rep)
    (m0, plain, _), (m1, comp, rep1) = runs[False], runs[True]
    assert set(plain) == {"a1", "a2"} and not any(r.downstream for r in plain.values())
    torch.testing.assert_close(m0.get_submodule("down.0").weight, net.get_submodule("down.0").weight)
    # the stem runs before every rewrite: nothing reaches it; the shortcut conv is traced after b2 and b2's
    # ReLU-aware targets recompute it: its own targets must still pair one to one with its inputs
    assert set(comp) == {"a1", "a2", "b1", "b2", "down.0"}
    for n in ("b1", "b2", "down.0"):
        r = comp[n]
        assert r.downstream and r.target == n and r.refit and r.error_after < r.error_before, (n, r)
    assert comp["b2"].target_kind == comp["down.0"].target_kind == "block"
    assert rep1.options["downstream"] is True
    # the first block's refits are the same; the output is closer to the original's
    torch.testing.assert_close(m0.get_submodule("a2").pointwise.weight, m1.get_submodule("a2").pointwise.weight)
    with torch.no_grad():
        ref = net(x)
        assert rel_err(m1(x), ref) < 0.97 * rel_err(m0(x), ref)


def test_downstream_refits_a_conv_head_against_the_original_linear():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    small = fxsurgeon.convert(net, separable=dict(multiplier=1), conv_head=True)
    head = [rw for rw in fxsurgeon.get_record(small).rewrites if rw.exact]
    assert head and isinstance(small.get_submodule(head[0].target), nn.Conv2d)  # the exact GAP + 1×1 conv head
    g = torch.Generator().manual_seed(5)
    calib = [torch.randn(100, 3, 10, 10, generator=g) for _ in range(2)]
    # one row per image for 17 unknowns per output: 64 images are too few to change a layer that was right
    few = copy.deepcopy(small)
    r = {x.layer: x for x in calibrate(few, net, [c[:32] for c in calib], bn=False).layers}[head[0].target]
    assert r.downstream and not r.refit and "too few samples" in r.reason and "170" in r.reason
    torch.testing.assert_close(few.get_submodule(head[0].target).weight, small.get_submodule(head[0].target).weight)
    rep = calibrate(small, net, calib, bn=False)
    r = {x.layer: x for x in rep.layers}[head[0].target]
    assert r.downstream and r.refit and r.error_after < r.error_before and r.samples == 200
    # the record's head rewrite says what calibration did to it
    assert head[0].details["calibration"]["layer"] == head[0].target and head[0].details["calibration"]["refit"]


def test_streaming_refits_the_same_downstream_layers():
    net = _residual_net()
    small = fxsurgeon.convert(net, separable=dict(form="dw-pw", multiplier=1, exclude=["b1", "b2"]),
                              conv_head=False)
    calib = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    layers = {}
    for mode in ("frontier", "streaming"):
        rep = calibrate(copy.deepcopy(small), net, calib, bn=False, mode=mode)
        layers[mode] = [r.layer for r in rep.layers if r.downstream]
    assert sorted(layers["frontier"]) == sorted(layers["streaming"]) == ["b1", "b2", "down.0"]


def test_the_row_subset_does_not_depend_on_how_the_data_is_batched(monkeypatch):
    import fxsurgeon.calibrate.stats as S  # the module that reads the cap

    monkeypatch.setattr(S, "rows_cap", lambda columns: 3000)  # keeps about a tenth of the images here
    net = _residual_net()
    small = fxsurgeon.convert(net, separable=dict(multiplier=1), conv_head=False)
    x = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    states, reports = [], []
    for size in (48, 16, 5):
        m = copy.deepcopy(small)
        reports.append(calibrate(m, net, [x[i:i + size] for i in range(0, 48, size)], bn=False))
        states.append(m.state_dict())
    samples = [[r.samples for r in rep.layers] for rep in reports]
    assert samples[0] == samples[1] == samples[2] and min(samples[0]) < 48 * 16 * 16 / 2  # a subset, the same
    for st in states[1:]:
        for k, v in states[0].items():
            torch.testing.assert_close(st[k], v, rtol=1e-3, atol=1e-4, msg=k)
