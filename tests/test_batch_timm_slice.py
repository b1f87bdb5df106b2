"""A fixed slice of the timm coverage sweep (benchmarks/timm_sweep.py) for CI: fast models of different families.

Each runs the sweep's own job function with the exact recipe (recipes/exact.yaml), ``pretrained=False``, on a
32×32 input: it must convert, every rewrite must claim exactness, and the outputs must match the original
within float tolerance. The expected rewrites pin down that each pass still finds what it should.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fxsurgeon.batch import Job, convert_one
from fxsurgeon.recipes import load_recipe

EXACT = Path(__file__).resolve().parents[1] / "recipes" / "exact.yaml"

# model → minimum rewrites per pass
SLICE = {
    "test_resnet": {"separable": 5, "conv_head": 1},  # ResNet basic blocks
    "test_efficientnet": {"separable": 1, "conv_head": 1},  # inverted residuals, SE
    "test_convnext": {"separable": 1, "conv_head": 1},  # 7×7 depthwise (skipped), norm head
    "test_byobnet": {"separable": 1, "conv_head": 1},  # timm's BYOB blocks
    "test_vit": {"separable": 1},  # patch embedding conv; token head left alone
    "regnetx_002": {"separable": 1, "conv_head": 1},  # grouped convs (skipped), stem
    "dla46_c": {"concat_fusion": 1, "separable": 1},  # DLA aggregation nodes concatenate; 1×1 conv head
}


@pytest.mark.timm
@pytest.mark.parametrize("name", list(SLICE))
def test_exact_recipe_converts_and_verifies(name):
    res = convert_one(Job(name, recipe=load_recipe(EXACT), image_size=32, count_macs=False))
    assert res["status"] == "ok" and res["verified"] and res["exact_expected"]
    assert res["rel_error"] <= res["tolerance"] == 1e-4
    for pass_name, minimum in SLICE[name].items():
        counts = res["passes"][pass_name]
        assert counts["rewrites"] >= minimum, (pass_name, counts, res["skip_reasons"])
        assert counts["exact"] == counts["rewrites"]
