"""Options are checked by type, not truthiness, and every bad input is a one-line SurgeryError naming what and
where (issue 17.9–10, convert side). The caller's model is left as it was whether convert() refused or not."""

import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 2)).eval()


X = torch.randn(1, 3, 8, 8)


def _helper(x):
    return x


BAD = {
    # 9: type, not truthiness
    "inplace_no": (dict(inplace="no"), r"^inplace= takes True or False, got str: 'no'"),
    "inplace_int": (dict(inplace=1), r"^inplace= takes True or False"),
    "verify_no": (dict(example_inputs=X, verify="no"), r"^verify= takes True or False, got str: 'no'"),
    "layers_missing": (dict(separable=dict(layers={"9": {"rank": 2}})),
                       r"^separable: layers names '9', which is not a Conv2d"),
    "layers_near_miss": (dict(separable=dict(layers={"l": {"rank": 2}}, kernel_sizes="all")),
                         r"^separable: layers names 'l'"),
    "layers_unknown_key": (dict(separable=dict(layers={"1": {"rank": 2, "rnak": 3}})),
                           r"^separable: layers\['1'\] has unknown key\(s\) \['rnak'\]"),
    "allocation_nope": (dict(separable=dict(allocation="nope")), r"^separable: allocation must be 'auto', 'weight'"),
    "kernel_sizes_empty": (dict(separable=dict(kernel_sizes=[])), r"^separable: kernel_sizes=\[\] matches no conv"),
    "concrete_args_unknown": (dict(concrete_args={"y": 1}),
                              r"^concrete_args names \['y'\], which Sequential.forward does not take"),
    "concat_force_no": (dict(concat_fusion=dict(mode="reduce", ratio=0.5, force="no")),
                        r"^concat_fusion: force must be True or False"),
    "concat_mode_list": (dict(concat_fusion=dict(mode=["identity"])), r"^concat_fusion: mode must be"),
    "pass_flag_str": (dict(separable=dict(include_stem="no")), r"^separable: include_stem must be True or False"),
    "pass_flag_int": (dict(conv_head=dict(fully_convolutional=1)),
                      r"^conv_head: fully_convolutional must be True or False, got int: 1"),
    # 10: escaped as other exceptions before
    "exclude_none": (dict(separable=dict(exclude=[None])), r"^separable: exclude\[0\] must be a string"),
    "concat_exclude_none": (dict(concat_fusion=dict(exclude=[None])), r"^concat_fusion: exclude\[0\] must be"),
    "tolerance_str": (dict(example_inputs=X, tolerance="x"), r"^tolerance= takes a finite number >= 0"),
    "leaf_modules_str": (dict(leaf_modules="Conv2d"), r"^leaf_modules= takes a list of nn.Module subclasses"),
    "leaf_modules_item": (dict(leaf_modules=[nn.Conv2d, "Linear"]), r"^leaf_modules\[1\] must be one of"),
    "autowrap_int": (dict(autowrap_functions=[3]), r"^autowrap_functions\[0\] must be one of the plain Python"),
    "autowrap_fn": (dict(autowrap_functions=_helper), r"^autowrap_functions= takes a list"),
    "concrete_args_int": (dict(concrete_args=5), r"^concrete_args= takes a dict"),
    "calibration_nan": (dict(example_inputs=X, calibration=[torch.full((2, 3, 8, 8), float("nan"))]),
                        r"^calibration batch 0 input 0 has 384 NaN/Inf"),
    "calibration_inf_second": (dict(example_inputs=X, calibration=[torch.randn(2, 3, 8, 8),
                                                                   torch.full((2, 3, 8, 8), float("inf"))]),
                               r"^calibration batch 1 input 0 has 384 NaN/Inf"),
    "calibration_no_rows": (dict(example_inputs=X, calibration=[torch.empty(0, 3, 8, 8)]),
                            r"^calibration batch 0 input 0 has shape \[0, 3, 8, 8\]: no rows"),
    "calibration_empty": (dict(example_inputs=X, calibration=[]), r"^calibration data is empty"),
    "meta_example_inputs": (dict(example_inputs=X.to("meta")),
                            r"^example_inputs\[0\] is on the meta device .*verify=False"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_option_is_a_one_line_surgery_error_naming_it(case, snapshot):
    kwargs, pattern = BAD[case]
    model = net()
    check = snapshot(model)
    with pytest.raises(SurgeryError, match=pattern) as err:
        fxsurgeon.convert(model, **kwargs)
    assert "\n" not in str(err.value) and "bug in fxsurgeon" not in str(err.value)
    check()


def test_meta_example_inputs_give_shapes_without_verification():
    out = fxsurgeon.convert(net(), example_inputs=X.to("meta"), verify=False)
    assert out.meta["fxsurgeon"].verification is None and out.meta["fxsurgeon"].rewrites


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_conv_weight_is_named(bad):
    model = net()
    with torch.no_grad():
        model[1].weight[0, 0, 0, 0] = bad
    before = model[1].weight.clone()
    with pytest.raises(SurgeryError, match=r"^parameter '1.weight' of Conv2d has 1 NaN/Inf value\(s\) out of 576"):
        fxsurgeon.convert(model)
    torch.testing.assert_close(model[1].weight, before, rtol=0, atol=0, equal_nan=True)


def test_non_finite_buffer_is_named():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3)).eval()
    model[1].running_var[2] = float("inf")
    with pytest.raises(SurgeryError, match=r"^buffer '1.running_var' of BatchNorm2d has 1 NaN/Inf"):
        fxsurgeon.convert(model)


def test_lazy_module_is_named():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyConv2d(8, 3))
    with pytest.raises(SurgeryError, match=r"^parameter '1.weight' of LazyConv2d is uninitialised .*forward"):
        fxsurgeon.convert(model)
    model(X)  # once run, it converts
    assert fxsurgeon.convert(model, example_inputs=X).meta["fxsurgeon"].rewrites


def test_good_options_still_pass():
    out = fxsurgeon.convert(net(), example_inputs=X, inplace=False, verify=True, tolerance=0,
                            leaf_modules=(nn.Flatten,), autowrap_functions=[_helper], concrete_args={},
                            separable=dict(layers={"1": {"rank": 2, "form": "dw-pw"}}, exclude=("0",),
                                           kernel_sizes=[3], allocation="auto"))
    assert [r.target for r in out.meta["fxsurgeon"].rewrites if r.pass_name == "separable"] == ["1"]
