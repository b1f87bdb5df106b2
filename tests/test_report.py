"""savings(): MACs by hand on the seed examples, fvcore's own totals on timm resnet18, the cross-check with
FlopCounterMode, fidelity, the JSON schema, Markdown / CSV / table renderers and the plot."""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError, savings
from fxsurgeon.report import fidelity, load_schema
from fxsurgeon.report.count import exclusive_torch_flops, inclusive_torch_flops, op_category
from fxsurgeon.report.render import CSV_FIELDS, totals_line

# ----------------------------------------------------------------------------------- seed example 2


@pytest.fixture(scope="module")
def example2():
    """Standard 3×3 conv 32→64 on (1, 32, 32, 32) and its separable form at m=1."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, bias=False))
    x = torch.randn(1, 32, 32, 32)
    converted = fxsurgeon.convert(net, example_inputs=x, separable=dict(multiplier=1))
    return net, converted, x, savings(net, converted, x, depth=2)


def test_example2_macs_and_params_by_hand(example2):
    _, _, _, r = example2
    # standard: C_out·H·W·C_in·k² = 64·32·32·32·9; depthwise: C_in·H·W·k²; pointwise: C_out·H·W·C_in
    assert r.macs_before == 64 * 32 * 32 * 32 * 9 == 18_874_368
    assert r.macs_after == 32 * 32 * 32 * 9 + 64 * 32 * 32 * 32 == 294_912 + 2_097_152 == 2_392_064
    assert (r.params_before, r.params_after) == (18_432, 288 + 2_048)
    rows = {m["name"]: m for m in r.by_module(2)}
    assert rows["0.depthwise"]["macs_after"] == 294_912 and rows["0.depthwise"]["macs_before"] == 0
    assert rows["0.pointwise"]["macs_after"] == 2_097_152 and rows["0.pointwise"]["params_after"] == 2_048
    assert rows["0"]["macs_before"] == 18_874_368 and rows["0"]["macs_after"] == 2_392_064
    assert r.mac_savings == pytest.approx(1 - 2_392_064 / 18_874_368)


def test_example2_per_pass_and_per_rewrite(example2):
    _, converted, _, r = example2
    record = converted.meta["fxsurgeon"]
    assert r.passes["separable"] == {"rewrites": 1, "exact": 0, "skipped": 0, "macs_before": 18_874_368,
                                     "macs_after": 2_392_064, "params_before": 18_432, "params_after": 2_336}
    assert r.unattributed == {"macs": 0, "params": 0}
    (w,) = r.rewrites
    assert (w["target"], w["pass"], w["counted"]) == ("0", "separable", True)
    assert (w["before"], w["after"]) == (record.rewrites[0].before, record.rewrites[0].after)


def test_example2_cross_check_conv_agrees(example2):
    *_, r = example2
    (row,) = r.cross_check["ops"]
    assert row["op"] == "conv" and row["agree"] and row["reason"] is None
    assert row["torch_flops_before"] == 2 * 18_874_368 and row["torch_flops_after"] == 2 * 2_392_064
    assert r.cross_check["modules"] == []


def test_fidelity_from_the_record_when_not_measured(example2):
    net, converted, x, measured = example2
    r = savings(net, converted, x, measure_fidelity=False, torch_cross_check=False)
    verification = converted.meta["fxsurgeon"].verification
    assert r.fidelity_source == "conversion record" and r.cross_check is None
    assert (r.max_abs_error, r.rel_error) == (verification.max_abs_error, verification.rel_error)
    assert r.rel_error == pytest.approx(measured.rel_error, rel=1e-5)  # same inputs, same models
    assert r.cosine_similarity is None and r.top1_agreement is None


def test_depth_cuts_the_module_breakdown(example2):
    *_, r = example2
    assert [m["name"] for m in r.by_module(0)] == [""]
    assert [m["name"] for m in r.by_module(1)] == ["", "0"]
    assert [m["name"] for m in r.by_module(2)] == ["", "0", "0.depthwise", "0.pointwise"]
    assert r.to_dict()["modules"] == r.by_module(2)


# ------------------------------------------------------------------------------ seed examples 3 and 4


class Fusion(nn.Module):
    """Seed example 3: two branches concatenated to 96 channels, then a 1×1 fusion conv to 48."""

    def __init__(self) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(96, 48, 1, bias=True)

    def forward(self, a, b):
        return self.fuse(torch.cat([a, b], dim=1))


def test_example3_fusion_conv_macs_two_inputs():
    net = Fusion().eval()
    a, b = torch.randn(1, 32, 16, 16), torch.randn(1, 64, 16, 16)
    r = savings(net, copy.deepcopy(net), (a, b))
    assert r.macs_before == r.macs_after == 48 * 96 * 16 * 16 == 1_179_648
    assert r.params_before == 96 * 48 + 48 == 4_656
    assert r.input_shapes == [[1, 32, 16, 16], [1, 64, 16, 16]]
    assert r.max_abs_error == 0 and r.rel_error == 0 and r.cosine_similarity == pytest.approx(1.0)
    assert r.top1_agreement is None  # a feature map, not classifier logits
    assert r.rewrites == [] and r.passes == {}  # no conversion record: nothing per pass
    assert r.uncounted_ops == {"before": {}, "after": {}}  # fvcore ignores aten::cat on purpose: no work


def _heads():
    linear = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()
    conv = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(128, 10, 1, bias=True), nn.Flatten()).eval()
    with torch.no_grad():
        conv[1].weight.copy_(linear[2].weight[:, :, None, None])
        conv[1].bias.copy_(linear[2].bias)
    return linear, conv


def test_example4_gap_conv_head_equals_linear_head():
    linear, conv = _heads()
    x = torch.randn(4, 128, 7, 7)
    r = savings(linear, conv, x)
    # MACs are per sample whatever the batch size (4 here): counted on the first sample
    pool = 128 * 7 * 7  # fvcore: average pooling = 1 per input element
    head = 10 * 128  # classes · features
    assert r.batch_size == 4
    assert r.macs_before == r.macs_after == pool + head == 7_552
    assert r.macs_by_operator == {"before": {"adaptive_avg_pool2d": 6_272, "linear": 1_280},
                                  "after": {"adaptive_avg_pool2d": 6_272, "conv": 1_280}}
    assert r.params_before == r.params_after == 1_290
    assert r.rel_error < 1e-6 and r.top1_agreement == 1.0 and r.cosine_similarity == pytest.approx(1.0)
    ops = {o["op"]: o for o in r.cross_check["ops"]}
    assert ops["adaptive_avg_pool2d"]["agree"] is False and "pooling" in ops["adaptive_avg_pool2d"]["reason"]
    assert ops["adaptive_avg_pool2d"]["torch_flops_before"] == 0
    assert ops["matmul"]["agree"] and ops["matmul"]["torch_flops_before"] == 2 * head
    assert ops["conv"]["agree"] and ops["conv"]["torch_flops_after"] == 2 * head
    where = {(m["model"], m["module"]): m["difference_macs"] for m in r.cross_check["modules"]}
    assert where == {("before", "0"): {"adaptive_avg_pool2d": pool}, ("after", "0"): {"adaptive_avg_pool2d": pool}}


# ------------------------------------------------------------------------------- timm resnet18


@pytest.fixture(scope="module")
def resnet18():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    return model, fxsurgeon.convert(model, example_inputs=x), x


@pytest.mark.timm
def test_resnet18_equals_fvcore_own_totals(resnet18, snapshot, caplog):
    from fvcore.nn import FlopCountAnalysis, parameter_count

    model, converted, x = resnet18
    model.train()  # a traced forward in train mode would move BatchNorm statistics: must not happen
    check, check_converted = snapshot(model), snapshot(converted)
    logger = logging.getLogger("fvcore.nn.jit_analysis")
    level = logger.level
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = savings(model, converted, x, depth=3)
    check()
    check_converted()
    model.eval()
    assert not [rec for rec in caplog.records if rec.name.startswith("fvcore")], "fvcore logged warnings"
    assert not caught, [str(w.message) for w in caught]
    assert logger.level == level and not logger.disabled  # nothing silenced globally

    for m, macs, params, side in ((model, r.macs_before, r.params_before, "before"),
                                  (converted, r.macs_after, r.params_after, "after")):
        ref = FlopCountAnalysis(m, (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        assert macs == ref.total()
        assert params == parameter_count(m)[""] == sum(p.numel() for p in m.parameters())
        by_module = ref.by_module()
        for row in r.by_module():
            assert row[f"macs_{side}"] == by_module.get(row["name"], 0), row
        assert r.uncounted_ops[side] == dict(ref.unsupported_ops())
    assert "aten::max_pool2d" in r.uncounted_ops["before"]
    assert r.macs_after < r.macs_before and r.params_after < r.params_before


@pytest.mark.timm
def test_resnet18_passes_cross_check_and_fidelity(resnet18):
    model, converted, x = resnet18
    r = savings(model, converted, x)
    record = converted.meta["fxsurgeon"]
    for name, c in record.counts().items():
        assert {k: r.passes[name][k] for k in c} == c
        assert r.passes[name]["rewrites"] == sum(w["pass"] == name for w in r.rewrites)
        assert r.passes[name]["skipped"] == sum(s["pass"] == name for s in r.skipped)
    assert r.passes["separable"]["rewrites"] == 16  # every 3×3 conv; the 7×7 stem is skipped
    assert len(r.rewrites) == len(record.rewrites) and len(r.skipped) == len(record.skipped)
    delta = sum(w["macs_after"] - w["macs_before"] for w in r.rewrites if w["counted"])
    assert delta + r.unattributed["macs"] == r.macs_after - r.macs_before
    # every rewrite target is a module of both models here: nothing is left unexplained
    assert r.unattributed == {"macs": 0, "params": 0}
    ops = {o["op"]: o for o in r.cross_check["ops"]}
    assert ops["conv"]["agree"] and ops["matmul"]["agree"]
    assert not ops["batch_norm"]["agree"] and "normalisation" in ops["batch_norm"]["reason"]
    assert r.cross_check["torch_flops_before"] == 2 * (r.macs_before - ops["batch_norm"]["fvcore_macs_before"]
                                                       - ops["adaptive_avg_pool2d"]["fvcore_macs_before"])
    verification = record.verification
    assert r.max_abs_error == pytest.approx(verification.max_abs_error, abs=1e-6)
    assert r.rel_error == pytest.approx(verification.rel_error, abs=1e-6)
    assert r.top1_agreement is not None and 0 <= r.top1_agreement <= 1
    assert [s["name"] for s in r.stages()] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4",
                                               "global_pool", "fc"]


# ------------------------------------------------------------------------------- outputs


def test_json_validates_against_the_shipped_schema(example2):
    jsonschema = pytest.importorskip("jsonschema")  # absent on bare GPU images
    *_, r = example2
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    data = json.loads(r.to_json())
    jsonschema.validate(data, schema)
    for key in ("schema_version", "model", "params_before", "params_after", "macs_before", "macs_after",
                "max_abs_error", "rel_error", "rewrites", "skipped"):
        assert key in data
    assert data["schema_version"] == 2 and data["macs_after"] == 2_392_064
    # the schema is not vacuous: a missing key, an undocumented key or a wrong type is refused
    for broken in ({k: v for k, v in data.items() if k != "macs_before"}, {**data, "extra": 1},
                   {**data, "macs_after": "2.39M"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_json_of_a_report_without_record_or_cross_check_validates():
    jsonschema = pytest.importorskip("jsonschema")  # absent on bare GPU images
    linear, conv = _heads()
    r = savings(linear, conv, torch.randn(2, 128, 7, 7), torch_cross_check=False, measure_fidelity=False)
    data = r.to_dict()
    jsonschema.validate(data, load_schema())
    assert data["cross_check"] is None and data["fidelity_source"] == "none" and data["rel_error"] is None


def test_non_finite_errors_become_null():
    zero = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False))
    nn.init.zeros_(zero[0].weight)
    other = copy.deepcopy(zero)
    nn.init.ones_(other[0].weight)
    r = savings(zero, other, torch.randn(1, 3, 4, 4))
    assert r.rel_error == float("inf")
    assert r.to_dict()["rel_error"] is None
    json.loads(r.to_json())  # strict JSON: no Infinity
    assert r.check(max_rel_error=1.0) == ["relative L2 error inf > allowed 1"]


def test_markdown_has_totals_first_and_details(example2):
    *_, r = example2
    md = r.to_markdown()
    line = "**Totals:** MACs per sample 18.87M → 2.39M (-87.3%) · parameters 18.43K → 2.34K (-87.3%) · relative L2 error "
    assert line in md and totals_line(r).startswith(line)
    lines = md.splitlines()
    assert lines[0].startswith("### ") and lines[2] == totals_line(r)
    assert md.index("**Totals:**") < md.index("<details>")
    assert "<details><summary>Per module (depth 2)</summary>" in md and "`0.depthwise`" not in md
    assert "| separable |" in md and "MACs = multiply-accumulates" in md


def test_table_and_csv(example2):
    *_, r = example2
    table = r.to_table()
    assert "18,874,368" in table and "2,392,064" in table and "MAC" in table
    rows = list(csv.DictReader(io.StringIO(r.to_csv(header=True))))
    assert len(rows) == 1 and tuple(rows[0]) == CSV_FIELDS
    row = rows[0]
    assert int(row["macs_before"]) == 18_874_368 and int(row["macs_after"]) == 2_392_064
    assert row["input_shape"] == "1x32x32x32" and row["rewrites"] == "1" and row["top1_agreement"] == ""
    assert r.to_csv().count("\n") == 1


def test_plot_written_only_when_asked(example2, tmp_path, monkeypatch):
    *_, r = example2
    monkeypatch.chdir(tmp_path)
    assert list(tmp_path.iterdir()) == []  # savings() itself wrote nothing
    r.plot(str(tmp_path / "stages.png"))
    r.plot(str(tmp_path / "stages.svg"))
    assert (tmp_path / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "stages.svg").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.png", "stages.svg"]
    with pytest.raises(SurgeryError, match="unknown format"):
        r.plot(str(tmp_path / "stages.gif"))
    with pytest.raises(SurgeryError, match="does not exist"):
        r.plot(str(tmp_path / "missing" / "stages.png"))


def test_check_thresholds(example2):
    *_, r = example2
    assert r.check(min_mac_savings=0.8, min_param_savings=0.8) == []
    fails = r.check(min_mac_savings=0.9, min_param_savings=0.95, max_rel_error=1e-3)
    assert fails == ["MAC savings 87.3% < required 90.0%", "parameter savings 87.3% < required 95.0%",
                     f"relative L2 error {r.rel_error:.3g} > allowed 0.001"]


# ------------------------------------------------------------------------------- pure pieces and errors


def test_fidelity_by_hand():
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 1.0]])
    f = fidelity(y, z)
    assert f["max_abs_error"] == 1.0
    assert f["rel_error"] == pytest.approx((2 / 7) ** 0.5)
    assert f["cosine_similarity"] == pytest.approx(6 / 7)  # y·z = 6, |y|² = |z|² = 7
    assert f["top1_agreement"] == pytest.approx(2 / 3)
    assert fidelity((y, y), (y, y))["top1_agreement"] is None  # tuple output: not one logits tensor
    assert fidelity(torch.zeros(2, 3), torch.zeros(2, 3))["cosine_similarity"] == 1.0


def test_torch_flops_partition():
    raw = {"Global": {"aten.mm": 10, "aten.convolution": 8},
           "Net": {"aten.mm": 10, "aten.convolution": 8},
           "Net.a.x": {"aten.mm": 4}, "Net.a": {"aten.mm": 6}, "Net.b.c": {"aten.convolution": 8}}
    ex = exclusive_torch_flops(raw)
    assert ex == {"": {"matmul": 4}, "a": {"matmul": 2}, "a.x": {"matmul": 4}, "b.c": {"conv": 8}}
    assert inclusive_torch_flops(ex, "") == {"matmul": 10, "conv": 8}
    assert inclusive_torch_flops(ex, "a") == {"matmul": 6}
    assert inclusive_torch_flops(ex, "b") == {"conv": 8}  # "b" itself never on the call stack (GraphModule)
    assert op_category("aten._scaled_dot_product_flash_attention") == "attention"
    assert op_category("batch_norm") == "batch_norm"


def test_bad_input_is_a_surgery_error(example2):
    net, converted, x, _ = example2
    with pytest.raises(SurgeryError, match=r"nn\.Module"):
        savings(net, "converted.pt", x)
    with pytest.raises(SurgeryError, match="example_inputs"):
        savings(net, converted, None)
    with pytest.raises(SurgeryError, match="depth"):
        savings(net, converted, x, depth=-1)
    with pytest.raises(SurgeryError, match=r"failed on example_inputs|could not trace"):
        savings(net, converted, torch.randn(1, 3, 8, 8))


# ------------------------------------------------------------------------------- per-rewrite attribution


class Branches(Fusion):
    """Seed example 3 with its branches: two 3×3 convs from one 8-channel input, concat, 1×1 fusion 96→48."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 32, 3, padding=1), nn.Conv2d(8, 64, 3, padding=1)

    def forward(self, x):
        return self.fuse(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


@pytest.mark.parametrize("mode", ["identity", "reduce"])
def test_example3_concat_fusion_rewrite_is_attributed(mode):
    if "concat_fusion" not in fxsurgeon.list_passes():
        pytest.skip("the concat_fusion pass is not in this build")
    net = Branches().eval()
    x = torch.randn(1, 8, 16, 16)
    opts = {"mode": "identity"} if mode == "identity" else {"mode": "reduce", "out_channels": 24}
    converted = fxsurgeon.convert(net, example_inputs=x, separable=False, concat_fusion=opts)
    r = savings(net, converted, x)
    hw = 16 * 16
    branches = (32 + 64) * 8 * 9 * hw
    assert r.macs_before == branches + 48 * 96 * hw
    (w,) = r.rewrites
    if mode == "identity":  # an identity 96→96 1×1 conv after the concat: added, nothing removed
        assert (w["macs_before"], w["macs_after"], w["params_after"]) == (0, 96 * 96 * hw, 96 * 96)
    else:  # fusion 96→24 before the consumer, which narrows to 24→48
        assert w["modules"] == [*w["details"]["modules"], "fuse"]
        assert (w["macs_before"], w["macs_after"]) == (48 * 96 * hw, 24 * 96 * hw + 48 * 24 * hw)
        assert (w["params_before"], w["params_after"]) == (96 * 48 + 48, 96 * 24 + 24 * 48 + 48)
    assert r.passes["concat_fusion"]["macs_after"] - r.passes["concat_fusion"]["macs_before"] == \
        r.macs_after - r.macs_before
    assert r.unattributed == {"macs": 0, "params": 0}


def test_attribution_counts_each_module_once():
    from fxsurgeon.passes.base import Rewrite
    from fxsurgeon.report.attrib import attribute_rewrites, footprint
    from fxsurgeon.report.count import Counts

    def counts(macs: dict, params: dict) -> Counts:
        return Counts(total_macs=macs[""], params=params, module_macs=macs, module_ops={}, uncounted={},
                      module_names=list(macs))

    before = counts({"": 100, "a": 60, "a.x": 40, "b": 40}, {"": 10, "a": 6, "a.x": 4, "b": 4})
    after = counts({"": 50, "a": 30, "a.x": 10, "b": 10, "new": 10}, {"": 5, "a": 3, "a.x": 1, "b": 1, "new": 1})
    rewrites = [
        Rewrite("a.x", "x", "x'", True, "p1"),
        Rewrite("a", "a", "a'", False, "p2", details={"modules": ["new"], "consumers": ["b"], "role": "b"}),
        Rewrite("a.x", "x", "x''", True, "p2"),
    ]
    assert footprint(rewrites[1], after.module_names) == ["a", "new", "b"]
    rows, passes, unattributed = attribute_rewrites(rewrites, {}, before, after)
    assert [(w["modules"], w["counted"]) for w in rows] == [(["a.x"], True), (["a", "new", "b"], True), ([], False)]
    # "a" encloses the already counted "a.x": only its remainder is the second rewrite's
    assert (rows[1]["macs_before"], rows[1]["macs_after"]) == (20 + 0 + 40, 20 + 10 + 10)
    assert passes["p1"]["macs_before"] == 40 and passes["p2"]["params_after"] == 2 + 1 + 1
    assert unattributed == {"macs": 0, "params": 0}


# ------------------------------------------------------------------------------- ops torch.fx inlined


class FunctionalConv(nn.Module):
    """Not a torch.nn leaf: fx traces into it, so its F.conv2d lands in the GraphModule's root forward."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c, 3, 3) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1)


class InlinedBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = FunctionalConv(c), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn(self.conv(x))


def test_inlined_ops_stay_with_their_module():
    from fvcore.nn import FlopCountAnalysis

    net = nn.Sequential(InlinedBlock(8), InlinedBlock(8)).eval()
    x = torch.randn(1, 8, 16, 16)
    gm = fxsurgeon.convert(net, example_inputs=x, separable=False, conv_head=False)  # nothing rewritten
    plain = FlopCountAnalysis(gm, x).unsupported_ops_warnings(False).by_module()
    assert plain["0.conv"] == 0 and plain[""] == 2 * (8 * 8 * 9 * 256 + 2 * 8 * 256)  # what fvcore alone says
    r = savings(net, gm, x, depth=2)
    assert r.macs_after == plain[""]
    for row in r.by_module():
        assert (row["macs_before"], row["params_before"]) == (row["macs_after"], row["params_after"]), row
    assert {row["name"]: row["macs_after"] for row in r.by_module()}["0.conv"] == 8 * 8 * 9 * 16 * 16
    # FlopCounterMode's per-module FLOPs follow the same attribution: only batch norm differs, as explained
    assert {c for m in r.cross_check["modules"] for c in m["difference_macs"]} == {"batch_norm"}


@pytest.mark.gpu
def test_counts_and_fidelity_on_cuda_match_cpu(example2):
    net, converted, x, r = example2
    on_gpu = savings(copy.deepcopy(net).cuda(), copy.deepcopy(converted).cuda(), x)  # x moved to the models
    assert (on_gpu.macs_before, on_gpu.macs_after, on_gpu.params_before, on_gpu.params_after) == (
        r.macs_before, r.macs_after, r.params_before, r.params_after)
    assert on_gpu.rel_error == pytest.approx(r.rel_error, rel=1e-2)  # TF32 convolutions may round differently
    assert on_gpu.cross_check["ops"] == r.cross_check["ops"]
