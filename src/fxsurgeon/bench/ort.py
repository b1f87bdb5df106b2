"""Benchmark a model under onnxruntime on the CPU: where many CPU users deploy.

A model fast in eager PyTorch is not necessarily fast after export: onnxruntime fuses and schedules the graph
itself, and its depthwise kernels differ from PyTorch's. :func:`benchmark_onnxruntime` exports the model to
ONNX (one export per batch size, static shapes; dynamo's exporter, else the TorchScript one), opens an
``InferenceSession`` on the CPU execution provider with every graph optimisation on and ``threads`` intra-op
threads, and times it like :func:`fxsurgeon.benchmark` (warm-up, then timed calls; median, p90, mean, min,
throughput), returning the same :class:`~fxsurgeon.bench.BenchmarkResult`, so ``compare()`` and
``fxsurgeon bench --runtime onnxruntime`` treat it as any other runtime. :func:`ort_runner` gives the bare
callable, for interleaved timing (:func:`fxsurgeon.budget.latency.interleaved_ratio`), and
:func:`benchmark_onnxruntime_pair` times an original and a converted model interleaved. The export and the
session live in :mod:`fxsurgeon.onnxrun` (latency budgets time in onnxruntime with them too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError
from ..onnxrun import export_onnx, ort_runner
from ..onnxrun import onnxruntime_module as _ort
from ..runtime import (
    batch_of,
    benchmark_inputs,
    device_name,
    model_name,
    percentile,
    prepare_inputs,
    time_calls,
)
from .eager import interleaved_rounds
from .results import BenchmarkResult, BenchmarkRow, Comparison

__all__ = ["benchmark_onnxruntime", "benchmark_onnxruntime_pair", "export_onnx", "ort_runner"]


def _check_settings(model: nn.Module, example_inputs: Any, batch_sizes: Sequence[int] | None, warmup: Any,
                    iters: Any) -> tuple[tuple, list[int]]:
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"onnxruntime benchmarks take a torch.nn.Module, got {type(model).__name__}")
    inputs = benchmark_inputs(example_inputs)
    if (isinstance(iters, bool) or isinstance(warmup, bool) or not isinstance(iters, int)
            or not isinstance(warmup, int) or iters < 1 or warmup < 0):
        raise SurgeryError(f"need iters >= 1 and warmup >= 0 (ints), got iters={iters!r}, warmup={warmup!r}")
    sizes = list(batch_sizes) if batch_sizes is not None else [batch_of(inputs) or 1]
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise SurgeryError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    return inputs, sizes


def _result(model: nn.Module, inputs: tuple, run: Any, name: str | None, warmup: int, iters: int) -> BenchmarkResult:
    ort = _ort()
    dev = torch.device("cpu")
    return BenchmarkResult(
        model=name or model_name(model), device="cpu", device_name=device_name(dev), dtype="fp32",
        channels_last=False, compile=None, input_shapes=[list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
        params=sum(p.numel() for p in model.parameters()),
        weights_mib=sum(p.numel() * 4 for p in model.parameters()) / 2**20,
        settings={"runtime": "onnxruntime", "warmup": warmup, "iters": iters, "timer": "perf_counter",
                  "threads": run.session.get_session_options().intra_op_num_threads,
                  "graph_optimization": "all", "execution_provider": "CPUExecutionProvider"},
        versions={"onnxruntime": ort.__version__, "torch": torch.__version__},
    )


class _OrtTimer:
    """One model at one batch size: warm-up (first call timed apart), then timed calls appended per round."""

    def __init__(self, model: nn.Module, inputs: tuple, batch_size: int, threads: int | None) -> None:
        self.batch_size = batch_size
        self.batch = prepare_inputs(inputs, batch_size, torch.device("cpu"), torch.float32, False)
        self.run = ort_runner(model, self.batch, threads=threads)
        self.first: float | None = None
        self.ms: list[float] = []

    def warm(self, warmup: int) -> None:
        if warmup:
            t0 = time.perf_counter()
            self.run(*self.batch)
            self.first = time.perf_counter() - t0
            for _ in range(warmup - 1):
                self.run(*self.batch)

    def time(self, iters: int) -> list[float]:
        ms = [t * 1000.0 for t in time_calls(lambda: self.run(*self.batch), torch.device("cpu"), warmup=0,
                                              iters=iters)]
        self.ms.extend(ms)
        return ms

    def row(self, warmup: int) -> BenchmarkRow:
        mean = sum(self.ms) / len(self.ms)
        return BenchmarkRow(
            batch_size=self.batch_size, latency_ms_median=percentile(self.ms, 50),
            latency_ms_p90=percentile(self.ms, 90), latency_ms_mean=mean, latency_ms_min=min(self.ms),
            throughput=self.batch_size / (mean / 1000.0), peak_memory_mib=None, first_call_s=self.first,
            iters=len(self.ms), warmup=warmup,
        )


def benchmark_onnxruntime(
    model: nn.Module,
    example_inputs: Any,
    *,
    batch_sizes: Sequence[int] | None = None,
    warmup: int = 10,
    iters: int = 50,
    threads: int | None = None,
    name: str | None = None,
) -> BenchmarkResult:
    """Latency and throughput of ``model`` exported to ONNX and run by onnxruntime on the CPU, per batch size.

    Args:
        model: any exportable ``nn.Module`` (a converted ``GraphModule`` too); never changed (a copy is
            exported, in float32).
        example_inputs: a tensor or tuple of positional inputs; the first dimension is the batch.
        batch_sizes / warmup / iters / name: as for :func:`fxsurgeon.benchmark`.
        threads: onnxruntime's intra-op threads (default: torch's current number).

    To compare two models, use :func:`benchmark_onnxruntime_pair`: it times them interleaved.

    >>> res = benchmark_onnxruntime(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 16, 16), batch_sizes=[1, 2],
    ...                             warmup=1, iters=2, threads=1)
    >>> [r.batch_size for r in res.rows], res.settings["runtime"]
    ([1, 2], 'onnxruntime')
    """
    inputs, sizes = _check_settings(model, example_inputs, batch_sizes, warmup, iters)
    timers = [_OrtTimer(model, inputs, b, threads) for b in sizes]
    result = _result(model, inputs, timers[0].run, name, warmup, iters)
    for t in timers:
        t.warm(warmup)
        t.time(iters)
        result.rows.append(t.row(warmup))
    return result


def benchmark_onnxruntime_pair(
    original: nn.Module,
    converted: nn.Module,
    example_inputs: Any,
    *,
    rounds: int = 5,
    batch_sizes: Sequence[int] | None = None,
    warmup: int = 10,
    iters: int = 50,
    threads: int | None = None,
    name: str | None = None,
    conversion: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Comparison:
    """Time ``original`` and ``converted`` under onnxruntime interleaved, as :func:`fxsurgeon.bench.benchmark_pair`
    does in eager PyTorch: both exported and warmed up, then ``rounds`` alternating rounds of ``iters / rounds``
    calls each; the comparison carries every round's speed-up, their median and spread, and noise warnings.

    >>> c = benchmark_onnxruntime_pair(nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 1), torch.randn(1, 3, 16, 16),
    ...                                rounds=2, warmup=1, iters=4, threads=1)
    >>> c.rounds[1]["rounds"], c.original.rows[0].iters, c.converted.settings["runtime"]
    (2, 4, 'onnxruntime')
    """
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise SurgeryError(f"rounds must be an int ≥ 1, got {rounds!r}")
    inputs, sizes = _check_settings(original, example_inputs, batch_sizes, warmup, iters)
    _check_settings(converted, example_inputs, batch_sizes, warmup, iters)
    per_round = max(1, -(-iters // rounds))
    res_o = res_c = None
    stability: dict[int, dict[str, Any]] = {}
    for b in sizes:
        t_o, t_c = _OrtTimer(original, inputs, b, threads), _OrtTimer(converted, inputs, b, threads)
        if res_o is None:
            res_o = _result(original, inputs, t_o.run, name, warmup, iters)
            res_c = _result(converted, inputs, t_c.run, name or res_o.model, warmup, iters)
        t_o.warm(warmup)
        t_c.warm(warmup)
        stability[b] = interleaved_rounds(t_o, t_c, rounds, per_round, progress)
        res_o.rows.append(t_o.row(warmup))
        res_c.rows.append(t_c.row(warmup))
    return Comparison(res_o, res_c, dict(conversion or {}), rounds=stability)
