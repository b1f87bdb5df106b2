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

from fxsurgeon.bench.ort import benchmark_onnxruntime, benchmark_onnxruntime_pair, ort_runner


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


def test_pair_is_timed_interleaved_in_rounds():
    model = net()
    small = fxsurgeon.convert(model, example_inputs=torch.randn(1, 3, 12, 12))
    calls = []
    c = benchmark_onnxruntime_pair(model, small, torch.randn(1, 3, 12, 12), rounds=3, batch_sizes=[1, 2],
                                   warmup=1, iters=6, threads=1, progress=calls.append)
    assert calls == [1] * 6  # one per round and batch size
    for b in (1, 2):
        st = c.rounds[b]
        assert st["rounds"] == 3 and st["iters_per_round"] == 2 and len(st["speedups"]) == 3
        assert st["speedup_min"] <= st["speedup_median"] <= st["speedup_max"]
        assert c.original.row(b).iters == 6 and c.converted.row(b).iters == 6
    assert c.original.settings["runtime"] == c.converted.settings["runtime"] == "onnxruntime"
    with pytest.raises(SurgeryError, match="rounds"):
        benchmark_onnxruntime_pair(model, small, torch.randn(1, 3, 12, 12), rounds=0)


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
    assert data["interleaved"]["1"]["rounds"] >= 1  # timed interleaved, like the eager runtime


def test_bench_cli_onnxruntime_usage_errors(capsys):
    assert main(["bench", "resnet10t", "--runtime", "onnxruntime", "--device", "cpu", "--compile"]) == 2
    assert "onnxruntime runs float32 on the CPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "resnet10t", "--runtime", "tensorrt"])
