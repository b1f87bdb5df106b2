import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.tracing import timm_notrace, trace


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: untraceable
            return x
        return -x


def test_untraceable_model_names_module_and_line():
    with pytest.raises(SurgeryError) as info:
        trace(DataDependent())
    msg = str(info.value)
    assert "'gate'" in msg and "Gate" in msg
    assert "test_tracing.py" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules=[Gate]" in msg and "concrete_args" in msg
    assert info.value.__cause__ is not None


def test_leaf_module_makes_it_traceable_and_convert_reaches_inside():
    model = DataDependent()
    gm = trace(model, leaf_modules=[Gate])
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x))


def test_len_on_traced_value_is_a_surgery_error():
    class UsesLen(nn.Module):
        def forward(self, x):
            return x[: len(x) // 2]

    with pytest.raises(SurgeryError, match="UsesLen"):
        fxsurgeon.convert(UsesLen())


def test_not_a_module():
    with pytest.raises(SurgeryError, match=r"nn\.Module"):
        trace(lambda x: x)
    with pytest.raises(SurgeryError, match="leaf_modules"):
        trace(nn.ReLU(), leaf_modules=[int])


def test_trace_uses_a_private_copy():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    gm = trace(model)
    assert gm.get_submodule("0") is not model[0]
    assert trace(model, copy_model=False).get_submodule("0") is model[0]


@pytest.mark.timm
def test_timm_notrace_registry_is_used():
    pytest.importorskip("timm")
    modules, functions = timm_notrace()
    assert modules and functions
    import timm

    # a model whose forward calls a registered no-trace function / module
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    gm = trace(model)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.timm
@pytest.mark.parametrize("name", ["levit_128s", "efficientvit_m0", "tiny_vit_5m_224"])
def test_device_cache_models_trace_twice(name):
    """These models cache tensors per device; tracing must not poison the caller's instance."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    before = model(x)
    trace(model)
    trace(model)
    torch.testing.assert_close(model(x), before)
    gm = trace(model)
    torch.testing.assert_close(gm(x), before)
