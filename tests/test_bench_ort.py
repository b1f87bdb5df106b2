"""onnxruntime runtime: benchmark_onnxruntime, the runner used for interleaved timing, `bench --runtime`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.cli import main

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from fxsurgeon.bench_ort import benchmark_onnxruntime, ort_runner


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def test_runner_matches_eager_for_a_converted_model():
    model = net()
    x = torch.randn(1, 3, 12, 12)
    small = fxsurgeon.convert(model, example_inputs=x, separable=dict(layers={"2": {"form": "tucker2", "rank": 8}}))
    for b in (1, 3):
        xb = torch.randn(b, 3, 12, 12)
        run = ort_runner(small, (xb,), threads=1)
        np.testing.assert_allclose(run(xb)[0], small(xb).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_a_model_that_computes_with_its_input_size_exports():
    from fxsurgeon.models import resnet20

    model = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    np.testing.assert_allclose(ort_runner(model, (x,), threads=1)(x)[0], model(x).detach().numpy(),
                               rtol=1e-4, atol=1e-4)


def test_benchmark_rows_and_settings():
    model = net()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    res = benchmark_onnxruntime(model, torch.randn(1, 3, 12, 12), batch_sizes=[1, 2], warmup=1, iters=2, threads=1)
    assert [r.batch_size for r in res.rows] == [1, 2] and all(r.latency_ms_median > 0 for r in res.rows)
    assert res.settings["runtime"] == "onnxruntime" and res.settings["threads"] == 1
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    with pytest.raises(SurgeryError, match="batch_sizes"):
        benchmark_onnxruntime(model, torch.randn(1, 3, 12, 12), batch_sizes=[0])
    with pytest.raises(SurgeryError, match="threads"):
        ort_runner(model, (torch.randn(1, 3, 12, 12),), threads=True)


@pytest.mark.timm
def test_bench_cli_onnxruntime(tmp_path, capsys):
    js = tmp_path / "b.json"
    rc = main(["bench", "resnet10t", "--runtime", "onnxruntime", "--threads", "1", "--device", "cpu",
               "--input-size", "3", "32", "32", "--batch-sizes", "1", "--warmup", "1", "--iters", "2",
               "--out", str(js)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(js.read_text())
    assert data["original"]["settings"]["runtime"] == "onnxruntime"
    assert data["comparison"][0]["speedup"] > 0


def test_bench_cli_onnxruntime_usage_errors(capsys):
    assert main(["bench", "resnet10t", "--runtime", "onnxruntime", "--device", "cpu", "--compile"]) == 2
    assert "onnxruntime runs float32 on the CPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "resnet10t", "--runtime", "tensorrt"])
