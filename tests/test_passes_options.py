"""Pass options dataclasses (fxsurgeon.passes.options): one declaration per pass, the only validation.

convert(), recipe files and the CLI all go through ``PassInfo.check_options`` → ``PassOptions.from_dict``;
these tests hold the dataclasses to the pass functions they configure and to the registry.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.passes import PassInfo, PassResult, get_pass, list_passes
from fxsurgeon.passes.concat_fusion import ConcatFusionOptions
from fxsurgeon.passes.conv_head import ConvHeadOptions
from fxsurgeon.passes.options import OptionError, PassOptions, options_from_signature
from fxsurgeon.passes.separable import SeparableOptions, separable
from fxsurgeon.tracing import trace

BUILTIN = {"separable": SeparableOptions, "conv_head": ConvHeadOptions, "concat_fusion": ConcatFusionOptions}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_each_builtin_pass_registers_a_frozen_options_dataclass(name):
    info = get_pass(name)
    cls = info.option_class()
    assert cls is BUILTIN[name] and cls.pass_name == name
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    opts = cls()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(opts, next(iter(cls.defaults())), None)
    assert list(info.options()) == [f.name for f in dataclasses.fields(cls)]


def test_from_dict_to_dict_round_trip_and_changed_only():
    opts = SeparableOptions.from_dict({"multiplier": 2, "exclude": "layer4.*", "kernel_sizes": [3, 5]})
    assert opts.exclude == ["layer4.*"] and opts.kernel_sizes == (3, 5)  # normalised once, here
    again = SeparableOptions.from_dict(opts.to_dict())
    assert again == opts
    changed = opts.to_dict(changed_only=True)
    assert changed == {"multiplier": 2, "kernel_sizes": (3, 5), "exclude": ["layer4.*"]}


def test_budget_defaults_are_filled_in_and_reported():
    opts = SeparableOptions(target_macs=0.6)
    assert opts.defaulted == {"form": "auto", "weighting": None, "bias_correction": True, "kernel_sizes": (3,)}
    given = SeparableOptions(target_macs=0.6, form="dw-pw", weighting="bn", kernel_sizes=[3, 5])
    assert given.defaulted == {"bias_correction": True} and given.form == "dw-pw"
    # a latency budget also matches the 1×1 convs, unless told otherwise
    assert SeparableOptions(target_latency=0.6).kernel_sizes == (1, 3)
    assert SeparableOptions(target_latency=0.6, kernel_sizes=[3]).kernel_sizes == (3,)
    assert SeparableOptions(target_latency=0.6, form="tucker2").kernel_sizes == (3,)  # a named spatial form
    assert SeparableOptions(target_macs=0.6, form="pw-pw").kernel_sizes == (1,)
    assert SeparableOptions(multiplier=2).kernel_sizes == (3,)
    assert "kernel_sizes" not in SeparableOptions(multiplier=2).to_dict(changed_only=True)


@pytest.mark.parametrize(("options", "key", "kind", "message"), [
    ({"mutliplier": 2}, "mutliplier", "unknown", r"unknown option 'mutliplier' .*did you mean 'multiplier'"),
    ({"include_stem": "no"}, "include_stem", "type", r"^separable: include_stem must be True or False, got str"),
    ({"multiplier": 0}, "multiplier", "value", r"^separable: multiplier must be an int >= 1"),
    ({"energy": 0.9, "form": "pw-dw-pw"}, "energy", "value", r"energy= picks dw-pw's multiplier"),
    ({"target_macs": 0.5, "multiplier": 2}, "target_macs", "value", r"exclude multiplier="),
    ({"exclude": [None]}, "exclude", "value", r"exclude\[0\] must be a string"),
    ({"weighting": "fisher"}, "weighting", "value", r"weighting must be None or 'bn'"),
])
def test_refusals_name_the_option_and_kind(options, key, kind, message):
    with pytest.raises(OptionError, match=message) as exc:
        get_pass("separable").check_options(options)
    assert exc.value.key == key and exc.value.kind == kind
    assert isinstance(exc.value, SurgeryError)


def test_strict_checks_types_against_annotations_before_values():
    check = get_pass("separable").check_options
    check({"exclude": "layer4.*"})  # Python callers may give one pattern...
    with pytest.raises(OptionError) as exc:  # ...a recipe must give a list
        check({"exclude": "layer4.*"}, strict=True)
    assert exc.value.kind == "type" and exc.value.key == "exclude"
    with pytest.raises(OptionError, match="concat_fusion: ratio must be"):
        get_pass("concat_fusion").check_options({"mode": "reduce", "ratio": "half"}, strict=True)


def test_pass_takes_an_options_object_or_keywords_not_both():
    conv = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
    res = separable(trace(conv), SeparableOptions(multiplier=2))
    assert res.rewrites[0].details["rank"] == 2
    with pytest.raises(SurgeryError, match="not both"):
        separable(trace(conv), SeparableOptions(multiplier=2), multiplier=3)
    with pytest.raises(SurgeryError, match="options must be SeparableOptions, got dict"):
        separable(trace(conv), {"multiplier": 2})


def test_convert_refuses_option_values_before_tracing():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: symbolic tracing would fail
                return self.conv(x)
            return x

    with pytest.raises(OptionError, match="multiplier must be an int >= 1"):
        fxsurgeon.convert(Untraceable(), separable=dict(multiplier=-1))


def test_a_pass_without_a_dataclass_gets_one_from_its_signature(monkeypatch):
    import fxsurgeon.passes.registry as registry

    def toy(gm, *, level: int = 1, flag: bool = False, names: list[str] | None = None) -> PassResult:
        return PassResult(gm)

    monkeypatch.setitem(registry._PASSES, "toy", PassInfo("toy", toy, 999, False, False))
    info = get_pass("toy")
    assert info.options() == {"level": 1, "flag": False, "names": None}
    assert info.check_options({"level": 3}).level == 3
    with pytest.raises(OptionError, match="toy: flag must be True or False"):
        info.check_options({"flag": "yes"})
    with pytest.raises(OptionError, match="toy: level must be int"):
        info.check_options({"level": 2.5}, strict=True)
    assert "toy" in list_passes()


def test_register_pass_refuses_a_non_options_class():
    with pytest.raises(SurgeryError, match="takes a PassOptions dataclass"):
        fxsurgeon.register_pass("bad", options=dict)


def test_options_from_signature_copies_mutable_defaults():
    def toy(gm, *, names: list[str] = ["a"]) -> PassResult:  # noqa: B006 - the point of the test
        return PassResult(gm)

    cls = options_from_signature("toy", toy)
    one, two = cls(), cls()
    assert one.names == ["a"] and one.names is not two.names


def test_custom_options_class_validate_runs_on_construction():
    @dataclasses.dataclass(frozen=True)
    class Scale(PassOptions):
        pass_name: ClassVar[str] = "scale"
        factor: float = 1.0

        def validate(self):
            if not self.factor > 0:
                raise OptionError("scale: factor must be > 0", key="factor")

    assert Scale.from_dict({"factor": 2}).factor == 2
    with pytest.raises(OptionError, match="factor must be > 0"):
        Scale(factor=torch.tensor(-1.0).item())


def test_replay_hook_is_registered_with_the_pass():
    from fxsurgeon.passes.separable.replay import replay_separable

    assert get_pass("separable").replay is replay_separable
    assert get_pass("conv_head").replay is None
