"""The pass manager (fxsurgeon.passes.manager): planning passes from convert()'s keywords and running them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxsurgeon import SurgeryError
from fxsurgeon.passes import PassResult, Rewrite
from fxsurgeon.passes.manager import PassPlan, derived_example, plan_passes, run_passes
from fxsurgeon.record import Conversion
from fxsurgeon.tracing import trace


def test_plan_runs_default_passes_in_order_and_validates_options_first():
    plan = plan_passes({})
    assert [n for n, _ in plan.steps] == ["conv_head", "separable"]  # conv_head (order 100) before separable (300)
    plan = plan_passes({"separable": False, "concat_fusion": {"mode": "identity"}})
    assert plan.options() == {"conv_head": {}, "concat_fusion": {"mode": "identity"}}
    with pytest.raises(SurgeryError, match=r"unknown convert\(\) option\(s\) \['seperable'\]"):
        plan_passes({"seperable": True})
    with pytest.raises(SurgeryError, match="separable= takes True, False or a dict of options, got int"):
        plan_passes({"separable": 1})
    with pytest.raises(SurgeryError, match="multiplier must be an int >= 1"):
        plan_passes({"separable": {"multiplier": 0}})


def test_run_passes_records_results_figures_and_times():
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    gm = trace(net)
    record = Conversion(model="Sequential", options={}, source=None, tracing={})
    seconds: dict[str, float] = {}
    x = torch.randn(2, 8, 12, 12)
    run_passes(gm, plan_passes({"conv_head": False, "separable": {"target_macs": 0.5}}), record, shape_inputs=(x,),
               callers_inputs=True, shapes_note=None, calibration=None, seconds=seconds)
    assert [r.target for r in record.rewrites] and all(r.pass_name == "separable" for r in record.rewrites)
    assert record.extras["allocation"]["target_macs"] == 0.5  # PassResult.figures → record.extras
    assert set(seconds) == {"separable"}
    assert gm(x).shape == (2, 16, 12, 12)


def test_a_derived_example_that_fails_leaves_no_shapes_and_says_why():
    class TwoWidths(nn.Module):  # the probe's 224×224 fits; a flatten to a fixed width does not
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    gm = trace(TwoWidths())
    inputs, note = derived_example(gm, None)
    assert note["source"] == "probe" and note["spatial"] == "nominal"
    record = Conversion(model="TwoWidths", options={}, source=None, tracing={"example_inputs": ["probe"]})
    run_passes(gm, plan_passes({"conv_head": False}), record, shape_inputs=inputs, callers_inputs=False,
               shapes_note=note, calibration=None, seconds={})
    assert "failed" in note and "example_inputs" not in record.tracing
    assert not any("tensor_meta" in n.meta for n in gm.graph.nodes)


def test_a_pass_that_edits_the_graph_without_recompiling_is_linted_and_recompiled(monkeypatch):
    import fxsurgeon.passes.registry as registry
    from fxsurgeon.passes import PassInfo

    def lazy(gm, *, flag: bool = False) -> PassResult:
        relu = next(n for n in gm.graph.nodes if n.op == "call_module")
        with gm.graph.inserting_after(relu):
            neg = gm.graph.call_function(torch.neg, (relu,))
        relu.replace_all_uses_with(neg, delete_user_cb=lambda u: u is not neg)
        return PassResult(gm, [Rewrite("0", "relu", "neg(relu)", False)])

    monkeypatch.setitem(registry._PASSES, "lazy", PassInfo("lazy", lazy, 999, False, False))
    gm = trace(nn.Sequential(nn.ReLU()))
    record = Conversion(model="Sequential", options={}, source=None, tracing={})
    run_passes(gm, PassPlan([("lazy", {})]), record, shape_inputs=(), callers_inputs=False, shapes_note=None,
               calibration=None, seconds={})
    x = torch.randn(5)
    torch.testing.assert_close(gm(x), -torch.relu(x))
    assert record.rewrites[0].pass_name == "lazy"
