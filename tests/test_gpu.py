"""CUDA: conversion on the GPU, moving and casting converted models, benchmarks and latency-aware timing there.

Every test carries the ``gpu`` marker and is skipped without CUDA (tests/conftest.py). They complement the
CPU tests, never replace them; ``benchmarks/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon.bench import ieee_fp32, time_calls
from fxsurgeon.cli import main
from fxsurgeon.convert import DEFAULT_TOLERANCE
from fxsurgeon.modules import SeparableConv2d

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def resnet():
    timm = pytest.importorskip("timm")
    # zero_init_last=False: timm zero-initialises each block's last BN, which would hide the convs' output
    return timm.create_model("resnet18", pretrained=False, zero_init_last=False).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_convert_on_cuda_stays_there_and_verifies_there():
    model = resnet().to(CUDA)
    x = torch.randn(2, 3, 64, 64)
    gm = fxsurgeon.convert(model, example_inputs=x, separable=dict(multiplier="full"))  # inputs moved to CUDA
    assert all(t.device.type == "cuda" for t in (*gm.parameters(), *gm.buffers()))
    assert any(isinstance(m, SeparableConv2d) for m in gm.modules())
    v = gm.meta["fxsurgeon"].verification
    assert v.device.startswith("cuda") and v.exact_expected and v.rel_error <= v.tolerance
    xc = x.to(CUDA)
    with torch.no_grad(), ieee_fp32():
        assert rel(gm(xc), model(xc)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_convert_half_and_channels_last_model_on_cuda(dtype):
    model = resnet().to(CUDA, dtype).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, device=CUDA, dtype=dtype).contiguous(memory_format=torch.channels_last)
    gm = fxsurgeon.convert(model, example_inputs=x, separable=dict(multiplier="full"))
    assert all(p.device.type == "cuda" and p.dtype == dtype for p in gm.parameters())
    v = gm.meta["fxsurgeon"].verification
    assert v.dtype == str(dtype).replace("torch.", "") and v.rel_error <= DEFAULT_TOLERANCE[dtype]


@pytest.fixture(scope="module")
def converted_on_cpu():
    """(original, input, converted with exact rewrites), all on the CPU; tests copy before moving."""
    torch.manual_seed(0)
    model = resnet()
    x = torch.randn(2, 3, 64, 64)
    return model, x, fxsurgeon.convert(model, example_inputs=x, separable=dict(multiplier="full"))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_converted_model_moves_and_casts_like_any_module(converted_on_cpu, dtype, channels_last):
    model, x, gm = converted_on_cpu
    cast = {torch.float32: lambda m: m.float(), torch.float16: lambda m: m.half(),
            torch.bfloat16: lambda m: m.bfloat16()}[dtype]
    ref = cast(copy.deepcopy(model).to("cuda"))
    out = cast(copy.deepcopy(gm).to("cuda"))
    xi = x.to(CUDA, dtype)
    if channels_last:
        ref = ref.to(memory_format=torch.channels_last)
        out = out.to(memory_format=torch.channels_last)
        xi = xi.contiguous(memory_format=torch.channels_last)
    assert all(p.device.type == "cuda" and p.dtype == dtype for p in out.parameters())
    with torch.no_grad(), ieee_fp32():
        a, b = ref(xi), out(xi)
    assert b.dtype == dtype and b.device.type == "cuda"
    assert rel(b, a) <= DEFAULT_TOLERANCE[dtype]
    assert next(gm.parameters()).device.type == "cpu"  # the copies moved, not the converted model


def test_cuda_event_times_follow_the_work():
    dev = torch.device("cuda", torch.cuda.current_device())
    big = torch.randn(8192, 8192, device=dev)
    small = torch.randn(64, 64, device=dev)
    t_big = time_calls(lambda: big @ big, dev, warmup=2, iters=5)
    t_small = time_calls(lambda: small @ small, dev, warmup=2, iters=5)
    assert min(t_big) > 5 * max(t_small)  # an 8192³ matmul is far more work than a 64³ one
    # events are synchronised per call: the total cannot be much less than the wall time around it
    import time

    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    times = time_calls(lambda: big @ big, dev, warmup=0, iters=5)
    wall = time.perf_counter() - t0
    assert 0.5 * wall < sum(times) <= wall * 1.05


def test_benchmark_on_cuda_leaves_the_cpu_model_alone(snapshot):
    model = resnet()
    check = snapshot(model)
    res = fxsurgeon.benchmark(model, torch.randn(1, 3, 64, 64), device="cuda", dtype="bf16", channels_last=True,
                              batch_sizes=[1, 8], warmup=3, iters=5)
    check()
    assert next(model.parameters()).device.type == "cpu"
    assert res.device.startswith("cuda") and res.device_name == torch.cuda.get_device_name(res.device)
    assert res.dtype == "bf16" and res.channels_last and res.settings["timer"] == "cuda events"
    assert [r.batch_size for r in res.rows] == [1, 8]
    for r in res.rows:
        assert 0 < r.latency_ms_min <= r.latency_ms_median <= r.latency_ms_p90
        assert r.peak_memory_mib is not None and r.peak_memory_mib > res.weights_mib > 0
    assert "cuda" in res.versions


def test_benchmark_compiled_on_cuda():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    gm = fxsurgeon.convert(net, example_inputs=torch.randn(1, 3, 16, 16), separable=dict(include_stem=True))
    torch._dynamo.reset()
    res = fxsurgeon.benchmark(gm, torch.randn(1, 3, 16, 16), device="cuda", compile=True, batch_sizes=[2],
                              warmup=2, iters=3)
    torch._dynamo.reset()
    assert res.compile == "default" and [r.batch_size for r in res.rows] == [2]
    assert all(r.latency_ms_median > 0 and r.first_call_s > 0 for r in res.rows)


@pytest.mark.parametrize(("dtype", "channels_last"), [(None, None), ("bf16", True)], ids=["as-is", "bf16-cl"])
def test_latency_aware_times_on_cuda(dtype, channels_last):
    model = resnet()
    gm = fxsurgeon.convert(model, example_inputs=torch.randn(1, 3, 64, 64), separable=dict(
        latency_aware=dict(warmup=2, iters=5, dtype=dtype, channels_last=channels_last), device="cuda"))
    assert next(gm.parameters()).device.type == "cpu"  # timed on CUDA copies; the model stays on the CPU
    rec = gm.meta["fxsurgeon"]
    timings = [r.details["latency"] for r in rec.rewrites if r.pass_name == "separable"]
    timings += [s.details["latency"] for s in rec.skipped if "latency" in s.details]
    assert len(timings) == 16  # resnet18's 3×3 convs outside the stem, each kept or dropped on its times
    for t in timings:
        assert t["device"].startswith("cuda") and t["original_ms"] > 0 and t["replacement_ms"] > 0
        assert t["kept"] == (t["replacement_ms"] < t["original_ms"])
        if dtype:
            assert t["dtype"] == "bf16" and t["memory_format"] == "channels_last"


def test_bench_cli_on_cuda(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "resnet10t", "--device", "cuda", "--dtype", "bf16", "--channels-last",
               "--input-size", "3", "64", "64", "--batch-sizes", "1,4", "--warmup", "2", "--iters", "3",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["original"]["device"].startswith("cuda") and data["original"]["dtype"] == "bf16"
    assert [r["batch_size"] for r in data["comparison"]] == [1, 4]
    for r in data["comparison"]:
        assert r["original_peak_mib"] > 0 and r["converted_peak_mib"] > 0 and r["speedup"] > 0


def test_first_cuda_conversion_in_a_fresh_process_with_worker_threads():
    """torch loads its CUDA linalg library lazily and not thread-safely (pytorch/pytorch#90613): the separable
    pass's worker threads must not be the first to call it. A fresh process, so nothing has loaded it yet."""
    import subprocess
    import sys

    code = (
        "import torch, timm, fxsurgeon\n"
        "torch.set_num_threads(4)\n"
        "m = timm.create_model('resnet18', pretrained=False).cuda().eval()\n"
        "gm = fxsurgeon.convert(m, example_inputs=torch.randn(1, 3, 64, 64))\n"
        "n = sum(r.pass_name == 'separable' for r in fxsurgeon.get_record(gm).rewrites)\n"
        "print('rewrites', n)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rewrites 16" in run.stdout  # resnet18's sixteen 3×3 convs after the stem
