"""benchmark(): structure, statistics, copies, inputs and errors on CPU; the bench CLI on a tiny timm model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon.bench.eager import (
    BenchmarkResult,
    BenchmarkRow,
    compare,
    cudnn_benchmark_mode,
    ieee_fp32,
    parse_dtype,
    percentile,
    time_calls,
)
from fxsurgeon.bench.results import write_result
from fxsurgeon.cli import main


class Recorder(nn.Module):
    """A conv net that notes every call's batch size, dtype, memory format and inference mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.calls: list[tuple] = []

    def forward(self, x):
        self.calls.append((x.shape[0], x.dtype, x.is_contiguous(memory_format=torch.channels_last)
                           and not x.is_contiguous(), torch.is_inference_mode_enabled()))
        return self.conv(x).relu()


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()


def test_result_structure_and_numbers():
    res = fxsurgeon.benchmark(small_net(), torch.randn(2, 3, 16, 16), batch_sizes=[1, 3], warmup=2, iters=5)
    assert isinstance(res, BenchmarkResult)
    assert [r.batch_size for r in res.rows] == [1, 3]
    for r in res.rows:
        assert 0 < r.latency_ms_min <= r.latency_ms_median <= r.latency_ms_p90
        assert r.throughput == pytest.approx(r.batch_size / (r.latency_ms_mean / 1000))
        assert r.peak_memory_mib is None  # CPU: no allocator peak statistics
        assert r.first_call_s > 0 and r.iters == 5 and r.warmup == 2
    assert res.device == "cpu" and res.dtype == "fp32" and res.compile is None and not res.channels_last
    assert res.params == sum(p.numel() for p in small_net().parameters())
    assert res.weights_mib > 0 and res.settings["timer"] == "perf_counter"
    assert res.input_shapes == [[2, 3, 16, 16]]
    data = json.loads(json.dumps(res.to_dict()))
    assert data["rows"][1]["batch_size"] == 3
    md = res.to_markdown()
    assert "| batch | median ms | p90 ms |" in md and "\n| 3 |" in md


def test_calls_batches_dtype_format_and_inference_mode():
    net = Recorder().eval()
    fxsurgeon.benchmark(net, torch.randn(2, 3, 8, 8), batch_sizes=[1, 5], warmup=2, iters=3)
    # no copy needed (eval, fp32, CPU): the recorder saw every call, warm-up included
    assert [c[0] for c in net.calls] == [1] * 5 + [5] * 5
    assert all(c[1] == torch.float32 and not c[2] and c[3] for c in net.calls)


def test_default_batch_is_the_examples():
    net = Recorder().eval()
    res = fxsurgeon.benchmark(net, torch.randn(3, 3, 8, 8), warmup=0, iters=2)
    assert [r.batch_size for r in res.rows] == [3] and res.rows[0].first_call_s is None
    assert len(net.calls) == 2


def test_callers_model_untouched_when_cast_moved_to_channels_last(snapshot):
    net = Recorder().train()
    check = snapshot(net)
    res = fxsurgeon.benchmark(net, torch.randn(1, 3, 8, 8), dtype="fp64", channels_last=True, warmup=1, iters=2)
    check()
    assert net.calls == []  # a copy ran
    assert net.training and net.conv.weight.dtype == torch.float32
    assert res.dtype == "fp64" and res.channels_last


def test_copy_runs_in_dtype_and_channels_last():
    # the copy's calls are invisible from outside; a module that raises on the wrong input checks them
    class Strict(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
            assert self.conv.weight.dtype == torch.bfloat16
            assert not self.training and torch.is_inference_mode_enabled()
            return self.conv(x)

    res = fxsurgeon.benchmark(Strict().train(), torch.randn(2, 3, 8, 8), dtype=torch.bfloat16,
                              channels_last=True, warmup=1, iters=2)
    assert res.dtype == "bf16"


def test_integer_inputs_keep_their_dtype():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, ids, scale):
            assert ids.dtype == torch.long and scale.dtype == torch.float64
            return self.emb(ids).double() * scale

    ids = torch.randint(0, 10, (2, 5))
    res = fxsurgeon.benchmark(Embed().double(), (ids, torch.ones(2, 1, 1, dtype=torch.float64)),
                              batch_sizes=[4], warmup=1, iters=2)
    assert res.dtype == "fp64" and res.rows[0].batch_size == 4


def test_converted_model_benchmarks_and_compare():
    net = small_net()
    x = torch.randn(1, 3, 16, 16)
    conv = fxsurgeon.convert(net, example_inputs=x, separable=dict(include_stem=True))
    a = fxsurgeon.benchmark(net, x, batch_sizes=[1, 2], warmup=1, iters=3)
    b = fxsurgeon.benchmark(conv, x, batch_sizes=[1, 2], warmup=1, iters=3)
    assert b.params < a.params
    comp = compare(a, b)
    rows = comp.rows()
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r, ra, rb in zip(rows, a.rows, b.rows):
        assert r["speedup"] == pytest.approx(ra.latency_ms_median / rb.latency_ms_median)
        assert r["throughput_ratio"] == pytest.approx(rb.throughput / ra.throughput)
        assert r["memory_ratio"] is None  # CPU: no peak memory
    md = comp.to_markdown()
    assert "| batch | original ms | converted ms | speed-up |" in md and "×" in md
    json.dumps(comp.to_dict())


def _result(**kw):
    base = dict(model="m", device="cpu", device_name="x", dtype="fp32", channels_last=False, compile=None,
                input_shapes=[[1, 3, 4, 4]], params=10, weights_mib=0.1)
    base.update(kw)
    return BenchmarkResult(**base)


def _row(b, ms, peak=None):
    return BenchmarkRow(b, ms, ms * 1.5, ms, ms * 0.9, b / (ms / 1000), peak, 0.1, 5, 1)


def test_compare_ratios_from_known_rows_and_refuses_mismatched_configs():
    a = _result(rows=[_row(1, 4.0, 100.0), _row(64, 40.0, 800.0)])
    b = _result(params=5, rows=[_row(1, 2.0, 50.0), _row(64, 80.0, 1000.0)])
    rows = compare(a, b).rows()
    assert [r["speedup"] for r in rows] == [2.0, 0.5]
    assert [r["memory_ratio"] for r in rows] == [0.5, 1.25]
    assert "| 1 | 4.000 | 2.000 | 2.00× |" in compare(a, b).to_markdown()
    with pytest.raises(fxsurgeon.SurgeryError, match="different dtype"):
        compare(a, _result(dtype="bf16"))
    with pytest.raises(fxsurgeon.SurgeryError, match="different compile"):
        compare(a, _result(compile="default"))


def test_write_result_by_suffix(tmp_path):
    res = _result(rows=[_row(1, 1.0)])
    assert json.loads(write_result(res, tmp_path / "r.json").read_text())["rows"][0]["batch_size"] == 1
    assert write_result(res, tmp_path / "sub" / "r.md").read_text().startswith("**m**")
    with pytest.raises(fxsurgeon.SurgeryError, match=r"\.md or \.json"):
        write_result(res, tmp_path / "r.txt")


def test_compile_path_runs_with_eager_backend():
    res = fxsurgeon.benchmark(small_net(), torch.randn(1, 3, 8, 8), compile=dict(backend="eager"),
                              batch_sizes=[1, 2], warmup=1, iters=2)
    assert res.compile == "eager backend, default" and len(res.rows) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(device="cuda"), "cuda"),
        (dict(dtype="int8"), "unknown dtype"),
        (dict(batch_sizes=[0]), "batch_sizes"),
        (dict(batch_sizes=[]), "batch_sizes"),
        (dict(iters=0), "iters"),
        (dict(warmup=-1), "warmup"),
        (dict(compile=3), "compile="),
        (dict(device="meta"), "meta"),
    ],
)
def test_bad_arguments_are_surgery_errors(kwargs, match):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(fxsurgeon.SurgeryError, match=match):
        fxsurgeon.benchmark(small_net(), torch.randn(1, 3, 8, 8), **{"warmup": 0, "iters": 1, **kwargs})


def test_bad_inputs_and_failing_forward():
    with pytest.raises(fxsurgeon.SurgeryError, match="example_inputs"):
        fxsurgeon.benchmark(small_net(), "not a tensor")
    with pytest.raises(fxsurgeon.SurgeryError, match=r"nn\.Module"):
        fxsurgeon.benchmark(lambda x: x, torch.randn(1))
    with pytest.raises(fxsurgeon.SurgeryError, match=r"at batch 2 on cpu.*failed"):
        fxsurgeon.benchmark(small_net(), torch.randn(1, 5, 8, 8), batch_sizes=[2], warmup=1, iters=1)


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.0]
    for q in (0, 10, 50, 90, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_time_calls_counts_calls():
    calls = []
    times = time_calls(lambda: calls.append(1), torch.device("cpu"), warmup=3, iters=4)
    assert len(calls) == 7 and len(times) == 4 and all(t >= 0 for t in times)


def test_parse_dtype():
    assert parse_dtype("BF16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    with pytest.raises(fxsurgeon.SurgeryError, match="floating"):
        parse_dtype(torch.int32)


def test_precision_contexts_restore_global_flags():
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    with cudnn_benchmark_mode(not before[0]):
        assert torch.backends.cudnn.benchmark is (not before[0])
    with ieee_fp32():
        assert torch.backends.cudnn.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "highest"
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision()) == before


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.timm
def test_bench_cli_prints_side_by_side_and_writes(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("separable:\n  multiplier: 2\n")
    md, js = tmp_path / "b.md", tmp_path / "b.json"
    rc = main(["bench", "resnet10t", "--recipe", str(recipe), "--device", "cpu", "--input-size", "3", "32", "32",
               "--batch-sizes", "1,2", "--warmup", "1", "--iters", "2", "--out", str(md), "--out", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "original vs converted" in out and "| batch | original ms | converted ms | speed-up |" in out
    data = json.loads(js.read_text())
    assert [r["batch_size"] for r in data["comparison"]] == [1, 2]
    assert all(r["original_ms"] > 0 and r["converted_ms"] > 0 and r["speedup"] > 0 for r in data["comparison"])
    assert data["converted"]["params"] < data["original"]["params"]
    assert data["conversion"]["rewrites"] > 0 and data["conversion"]["recipe"] == str(recipe)
    assert md.read_text().startswith("### resnet10t: original vs converted")


def test_bench_cli_usage_errors(tmp_path, capsys):
    assert main(["bench", "resnet10t", "--out", str(tmp_path / "x.txt")]) == 2
    assert ".md or .json" in capsys.readouterr().err
    assert main(["bench", "resnet10t", "--dtype", "int4"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "resnet10t", "--batch-sizes", "1,0"])
    if not torch.cuda.is_available():
        assert main(["bench", "resnet10t", "--device", "cuda"]) == 2
        assert "cuda" in capsys.readouterr().err


# ------------------------------------------------------------------------------- benchmarks/gpu_bench.py


def _gpu_bench_module():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("fxsurgeon_gpu_bench_script", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_gpu_bench_estimates_from_what_it_measured(tmp_path):
    gb = _gpu_bench_module()
    args = gb.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    args.deadline = __import__("time").time() + 100
    runner = gb.Runner(args, torch.device("cpu"))
    assert runner.estimate("m", "compiled") == gb.DEFAULT_ESTIMATE_S["compiled"] * gb.SAFETY
    runner.observed[("a", "compiled")] = 30.0
    assert runner.estimate("b", "compiled") == 30.0 * gb.SAFETY  # unseen model: the slowest of its mode
    runner.observed[("b", "compiled")] = 10.0
    assert runner.estimate("b", "compiled") == 10.0 * gb.SAFETY
    assert runner.fits("b", "compiled")[0]
    runner.observed[("b", "compiled")] = 200.0
    ok, why = runner.fits("b", "compiled")
    assert not ok and "time budget" in why


@pytest.mark.timm
def test_gpu_bench_skips_what_does_not_fit_and_still_writes(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_bench.py"), "--device", "cpu", "--models", "resnet10t",
         "--batch-sizes", "1", "--dtypes", "fp32", "--input-size", "3", "32", "32", "--deadline",
         str(time.time() + 5), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert data["models"]["resnet10t"]["rewrites"] > 0
    assert [(r["variant"], r["mode"], r["status"]) for r in data["rows"]] == [
        ("default", "eager", "skipped"), ("latency-aware", "eager", "skipped"), ("default", "compiled", "skipped")]
    md = (tmp_path / "gpu_bench.md").read_text()
    assert "skipped: time budget" in md and "0 configurations measured, 3 skipped for time" in md
