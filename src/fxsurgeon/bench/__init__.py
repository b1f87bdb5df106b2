"""Benchmarks: latency and throughput of an original and its converted model, timed interleaved in rounds.

Modules: ``eager`` (PyTorch eager and ``torch.compile``, CPU or CUDA) and ``ort`` (onnxruntime on CPU, imported
only when asked for).
"""

from __future__ import annotations

from .eager import (
    DTYPES,
    BenchmarkResult,
    BenchmarkRow,
    Comparison,
    benchmark,
    benchmark_pair,
    compare,
    cudnn_benchmark_mode,
    device_name,
    dtype_name,
    ieee_fp32,
    interleaved_rounds,
    noise_warnings,
    parse_dtype,
    percentile,
    resolve_device,
    synchronize,
    time_calls,
)

__all__ = [
    "DTYPES",
    "BenchmarkResult",
    "BenchmarkRow",
    "Comparison",
    "benchmark",
    "benchmark_pair",
    "compare",
    "cudnn_benchmark_mode",
    "device_name",
    "dtype_name",
    "ieee_fp32",
    "interleaved_rounds",
    "noise_warnings",
    "parse_dtype",
    "percentile",
    "resolve_device",
    "synchronize",
    "time_calls",
]
