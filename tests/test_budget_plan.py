"""fxsurgeon.budget.plan: whole-model MAC and parameter budgets (the refusals shared with latency budgets)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.budget.plan import check_budget_options, model_macs


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_macs=0.0), "target_macs is a fraction"),
    (dict(target_macs=1.5), "target_macs is a fraction"),
    (dict(target_macs=True), "target_macs is a fraction"),
    (dict(target_params="0.5"), "target_params is a fraction"),
    (dict(errors="bn"), "allocation errors must be"),
    (dict(errors="sensitivity"), "needs calibration batches"),
])
def test_check_budget_options_refuses_what_no_budget_can_mean(kwargs, match):
    args = {"target_macs": None, "target_params": None, "errors": "auto", "calibration": None, **kwargs}
    with pytest.raises(SurgeryError, match=match):
        check_budget_options(**args)
    check_budget_options(0.6, None, "weight", None)  # a sound set passes
    check_budget_options(None, 1, "data", [torch.zeros(1)])


def test_model_macs_counts_one_multiply_add_as_one():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 4 * 4, 2, bias=False))
    macs, counter = model_macs(net, (torch.randn(1, 3, 4, 4),))
    assert macs == 8 * 3 * 9 * 16 + 128 * 2 and counter == "fvcore"


def test_a_budget_the_rest_of_the_model_cannot_meet_says_how_low_it_can_go():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
    with pytest.raises(SurgeryError, match=r"cannot be met.*of the parameters") as info:
        fxsurgeon.convert(net, example_inputs=torch.randn(1, 3, 8, 8), conv_head=False,
                          separable=dict(target_params=0.05))
    # the allocation's own reason follows as a sentence of its own
    assert re.search(r"by this pass\)\. [A-Z]", str(info.value)), str(info.value)
