"""Converted models are ordinary modules for PyTorch's exporters: torch.export and ONNX (onnxruntime)."""

import warnings

import pytest
import torch

import fxsurgeon


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small models: on the shared 2-core CI box, thread hand-offs cost more than they save
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def converted_resnet18():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    small = fxsurgeon.convert(model, example_inputs=x).eval()
    rec = fxsurgeon.get_record(small)
    assert {r.pass_name for r in rec.rewrites} >= {"separable"}
    return small, x


@pytest.mark.timm
def test_torch_export_matches(converted_resnet18):
    small, x = converted_resnet18
    batch = torch.export.Dim("batch", min=1, max=64)
    name = next(n.target for n in small.graph.nodes if n.op == "placeholder")
    ep = torch.export.export(small, (x,), dynamic_shapes={name: {0: batch}})
    exported = ep.module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), small(x), rtol=1e-5, atol=1e-5)
        x5 = torch.randn(5, 3, 32, 32)  # the batch dimension stays dynamic
        torch.testing.assert_close(exported(x5), small(x5), rtol=1e-5, atol=1e-5)
    convs = [n for n in ep.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]
    depthwise = [n for n in convs if len(n.args) > 6 and n.args[6] > 1]  # aten.conv2d(x, w, b, s, p, d, groups)
    assert len(depthwise) == sum(1 for r in fxsurgeon.get_record(small).rewrites if r.pass_name == "separable")


@pytest.mark.timm
@pytest.mark.slow
def test_onnx_export_matches_onnxruntime(converted_resnet18, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    small, x = converted_resnet18
    path = tmp_path / "small.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter progress/deprecation chatter
        torch.onnx.export(small, (x,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = small(x)
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.timm
def test_loaded_model_exports_too(converted_resnet18, tmp_path):
    """save → load gives a GraphModule the exporters accept just the same."""
    small, x = converted_resnet18
    path = tmp_path / "small.safetensors"
    fxsurgeon.save(small, path)
    again = fxsurgeon.load(path).eval()
    ep = torch.export.export(again, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), small(x), rtol=1e-5, atol=1e-5)
