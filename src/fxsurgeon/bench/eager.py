"""benchmark(): latency, throughput and peak memory of a model, the same API on CUDA and on CPU.

Timing follows timm's ``benchmark.py`` habits: the model runs in eval mode under ``torch.inference_mode()``,
warm-up calls come first (they absorb ``torch.compile`` and cuDNN's algorithm search), and every timed call is
measured on its own — with CUDA events recorded on the model's stream and synchronised after each call on
CUDA, with ``time.perf_counter`` on CPU. Latency is the median and 90th percentile over those calls; throughput
is the batch size over the mean latency. The caller's model is never moved, cast or put in eval mode: a copy is
benchmarked whenever anything has to change.

:func:`benchmark_pair` times an original and a converted model interleaved, in rounds; the results and their
side-by-side comparison are in :mod:`fxsurgeon.bench.results`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError
from ..runtime import (
    DTYPES,
    batch_of,
    benchmark_inputs,
    benchmark_versions,
    compile_options,
    cudnn_benchmark_mode,
    device_name,
    dtype_name,
    ieee_fp32,
    model_dtype,
    model_name,
    parse_dtype,
    percentile,
    prepare_inputs,
    resolve_device,
    synchronize,
    time_calls,
)
from .results import (
    BenchmarkResult,
    BenchmarkRow,
    Comparison,
    compare,
    noise_warnings,
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


# ---------------------------------------------------------------------------------------------- benchmark


def _needs_copy(model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> bool:
    if any(m.training for m in model.modules()):
        return True
    for t in (*model.parameters(), *model.buffers()):
        if t.device != device or (t.is_floating_point() and t.dtype != dtype):
            return True
        if channels_last and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
            return True
    return False


def _compile_label(opts: dict[str, Any] | None) -> str | None:
    if opts is None:
        return None
    label = opts.get("mode") or "default"
    if opts.get("backend") not in (None, "inductor"):
        label = f"{opts['backend']} backend, {label}"
    return label


def _mib(nbytes: float) -> float:
    return nbytes / 2**20


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _precision_settings() -> dict[str, Any]:
    """TF32 settings that change float32 speed on CUDA, for the record."""
    out: dict[str, Any] = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
    try:
        out["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    except RuntimeError:  # legacy and new TF32 APIs mixed: torch refuses to read the legacy flag
        out["cudnn_allow_tf32"] = "unknown"
    return out


@dataclass
class _Prepared:
    """A model made ready to time once (copied/cast/compiled as asked), shared by every round of timing."""

    fn: Callable[..., Any]
    result: BenchmarkResult
    inputs: tuple
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    compiled: bool
    weight_bytes: int
    sizes: list[int | None]


def _prepare(model: nn.Module, example_inputs: Any, *, device, dtype, channels_last: bool, compile,
             batch_sizes, warmup: int, iters: int, cudnn_benchmark, name: str | None) -> _Prepared:
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"benchmark() takes a torch.nn.Module, got {type(model).__name__}")
    inputs = benchmark_inputs(example_inputs)
    if not isinstance(iters, int) or not isinstance(warmup, int) or iters < 1 or warmup < 0:
        raise SurgeryError(f"need iters >= 1 and warmup >= 0 (ints), got iters={iters!r}, warmup={warmup!r}")
    example_batch = batch_of(inputs)
    sizes = list(batch_sizes) if batch_sizes is not None else [example_batch]
    if not sizes or any(b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1) for b in sizes):
        raise SurgeryError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    if batch_sizes is not None and example_batch is None:
        raise SurgeryError("batch_sizes given, but no example input has a batch dimension to resize")
    dev = resolve_device(device, model)
    dt = parse_dtype(dtype) or model_dtype(model)
    compile_opts = compile_options(compile)
    label = name or model_name(model)

    run_model = model
    if _needs_copy(model, dev, dt, channels_last):
        run_model = copy.deepcopy(model)
        run_model.eval()
        run_model.to(device=dev, dtype=dt)
        if channels_last:
            run_model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in run_model.parameters())
    weight_bytes = _tensor_bytes([*run_model.parameters(), *run_model.buffers()])
    fn_model: Callable[..., Any] = run_model
    if compile_opts is not None:
        opts = {"dynamic": False, **compile_opts}
        try:
            fn_model = torch.compile(run_model, **opts)
        except Exception as exc:  # bad options are reported before any run
            raise SurgeryError(f"torch.compile({opts}) failed for {label}: {type(exc).__name__}: {exc}") from exc

    result = BenchmarkResult(
        model=label, device=str(dev), device_name=device_name(dev), dtype=dtype_name(dt),
        channels_last=bool(channels_last), compile=_compile_label(compile_opts),
        input_shapes=[list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
        params=params, weights_mib=_mib(weight_bytes),
        settings={
            "warmup": warmup, "iters": iters, "cudnn_benchmark": cudnn_benchmark,
            "timer": "cuda events" if dev.type == "cuda" else "perf_counter",
            "threads": torch.get_num_threads(),
            **(_precision_settings() if dev.type == "cuda" else {}),
            **({"compile_options": {k: str(v) for k, v in compile_opts.items()}} if compile_opts else {}),
        },
        versions=benchmark_versions(dev),
    )
    return _Prepared(fn_model, result, inputs, dev, dt, bool(channels_last), compile_opts is not None,
                     weight_bytes, sizes)


class _Timer:
    """One batch size of one prepared model: warm it up once, then time as many rounds as asked."""

    def __init__(self, prep: _Prepared, b: int | None) -> None:
        self.prep = prep
        self.batch = prepare_inputs(prep.inputs, b, prep.device, prep.dtype, prep.channels_last)
        self.batch_size = b if b is not None else 1
        r = prep.result
        self.what = (f"benchmarking {r.model} at batch {self.batch_size} on {prep.device} ({r.dtype}"
                     f"{', channels_last' if prep.channels_last else ''}{', compiled' if prep.compiled else ''})")
        self.first: float | None = None
        self.times: list[float] = []
        self.peak: float | None = None

    def call(self) -> None:
        try:
            self.prep.fn(*self.batch)
        except Exception as exc:
            raise SurgeryError(f"{self.what} failed: {type(exc).__name__}: {exc}") from exc

    def warm(self, warmup: int) -> None:
        dev = self.prep.device
        if warmup:
            synchronize(dev)
            t0 = time.perf_counter()
            self.call()
            synchronize(dev)
            self.first = time.perf_counter() - t0
        for _ in range(warmup - 1):
            self.call()
        synchronize(dev)

    def time(self, iters: int) -> list[float]:
        dev = self.prep.device
        mem_base = None
        if dev.type == "cuda":
            synchronize(dev)
            mem_base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        times = time_calls(self.call, dev, warmup=0, iters=iters)
        if mem_base is not None:
            extra = torch.cuda.max_memory_allocated(dev) - mem_base
            peak = _mib(self.prep.weight_bytes + _tensor_bytes(self.batch) + max(extra, 0))
            self.peak = peak if self.peak is None else max(self.peak, peak)
        self.times += times
        return times

    def row(self, warmup: int) -> BenchmarkRow:
        ms = [t * 1000.0 for t in self.times]
        mean = sum(ms) / len(ms)
        return BenchmarkRow(
            batch_size=self.batch_size, latency_ms_median=percentile(ms, 50), latency_ms_p90=percentile(ms, 90),
            latency_ms_mean=mean, latency_ms_min=min(ms), throughput=self.batch_size / (mean / 1000.0),
            peak_memory_mib=self.peak, first_call_s=self.first, iters=len(ms), warmup=warmup,
        )


def benchmark(
    model: nn.Module,
    example_inputs: Any,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    channels_last: bool = False,
    compile: bool | str | dict[str, Any] = False,
    batch_sizes: Sequence[int] | None = None,
    warmup: int = 10,
    iters: int = 50,
    cudnn_benchmark: bool | None = True,
    name: str | None = None,
) -> BenchmarkResult:
    """Latency (median, p90), throughput and peak memory of ``model`` on ``device``, per batch size.

    The model runs in eval mode under ``torch.inference_mode()``. When it must be moved, cast, put in
    channels_last or eval mode, a deep copy is benchmarked, so the caller's model is never changed. Inputs
    are resized to each batch size by repeating the example rows and cast like the model (integer inputs
    keep their dtype).

    Args:
        model: any ``nn.Module`` (a converted ``GraphModule`` too).
        example_inputs: a tensor or tuple of positional inputs; their first dimension is the batch.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``, ... (default: where the model lives).
        dtype: ``"fp32"``, ``"bf16"``, ``"fp16"``, a ``torch.dtype`` (default: the model's); the model and the
            floating inputs are cast to it (a real cast, not autocast).
        channels_last: run the model and its 4-D inputs in ``torch.channels_last`` memory format.
        compile: ``torch.compile`` the model first: True (default mode), a mode name (``"max-autotune"``) or a
            dict of ``torch.compile`` options. Shapes are static (``dynamic=False``, unless the dict says
            otherwise), so each batch size is compiled for its own shape during its warm-up; the first call's
            time (``first_call_s``) shows the compile cost. Many configurations in one process can reach
            dynamo's recompile limit: call ``torch._dynamo.reset()`` between them.
        batch_sizes: batch sizes to measure (default: the example's).
        warmup / iters: untimed and timed calls per batch size.
        cudnn_benchmark: ``torch.backends.cudnn.benchmark`` during the run (restored after; None leaves it).
            On by default, as in deployment: cuDNN then picks the fastest algorithm per layer shape.
        name: label for the result (default: the timm architecture or class name).

    Returns:
        A :class:`BenchmarkResult` (``to_dict()``, ``to_markdown()``).

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    >>> res = benchmark(net, torch.randn(1, 3, 16, 16), batch_sizes=[1, 4], warmup=1, iters=3)
    >>> [r.batch_size for r in res.rows], res.rows[0].latency_ms_median > 0
    ([1, 4], True)
    """
    prep = _prepare(model, example_inputs, device=device, dtype=dtype, channels_last=channels_last,
                    compile=compile, batch_sizes=batch_sizes, warmup=warmup, iters=iters,
                    cudnn_benchmark=cudnn_benchmark, name=name)
    dev = prep.device
    with torch.inference_mode(), cudnn_benchmark_mode(cudnn_benchmark if dev.type == "cuda" else None):
        for b in prep.sizes:
            timer = _Timer(prep, b)
            timer.warm(warmup)
            timer.time(iters)
            prep.result.rows.append(timer.row(warmup))
            del timer
    return prep.result



def interleaved_rounds(t_o: Any, t_c: Any, rounds: int, per_round: int,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Time two warmed-up timers (``.time(n)`` → that many call times) in ``rounds`` alternating rounds of
    ``per_round`` calls; each round's speed-up is the ratio of the medians (first / second timer). Returns the
    per-round speed-ups with their median, min, max and spread, as :attr:`Comparison.rounds` holds them."""
    speedups = []
    for r in range(rounds):
        # alternate which model goes first, so neither always runs right after the other's cache use
        first, second = (t_o, t_c) if r % 2 == 0 else (t_c, t_o)
        a = first.time(per_round)
        c = second.time(per_round)
        o_times, c_times = (a, c) if first is t_o else (c, a)
        speedups.append(percentile(o_times, 50) / percentile(c_times, 50))
        if progress is not None:
            progress(1)
    med = percentile(speedups, 50)
    return {
        "rounds": rounds, "iters_per_round": per_round, "speedups": speedups, "speedup_median": med,
        "speedup_min": min(speedups), "speedup_max": max(speedups),
        "spread": (max(speedups) - min(speedups)) / med if med else None,
    }


def benchmark_pair(
    original: nn.Module,
    converted: nn.Module,
    example_inputs: Any,
    *,
    rounds: int = 5,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    channels_last: bool = False,
    compile: bool | str | dict[str, Any] = False,
    batch_sizes: Sequence[int] | None = None,
    warmup: int = 10,
    iters: int = 50,
    cudnn_benchmark: bool | None = True,
    name: str | None = None,
    conversion: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Comparison:
    """Time ``original`` and ``converted`` interleaved in this process and compare them.

    Both models are warmed up, then timed in ``rounds`` alternating rounds of ``iters / rounds`` calls each
    (original, converted, original, ...), so that a change of machine load, clock or thermal state during the
    run hits both alike. Each round gives a speed-up (original / converted median latency); the comparison
    reports their median and spread, and :attr:`Comparison.warnings` says when a timing is noisy (p90 above
    :data:`~fxsurgeon.bench.results.NOISY_P90_RATIO` × median) or the speed-up unstable across rounds (spread above
    :data:`~fxsurgeon.bench.results.UNSTABLE_SPREAD` of the median). ``progress`` is called with 1 after every timed round.

    >>> import torch.nn as nn
    >>> a, b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 1)
    >>> c = benchmark_pair(a, b, torch.randn(1, 3, 16, 16), rounds=3, warmup=1, iters=6)
    >>> c.rounds[1]["rounds"], len(c.rounds[1]["speedups"]), c.original.rows[0].iters
    (3, 3, 6)
    """
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise SurgeryError(f"rounds must be an int ≥ 1, got {rounds!r}")
    per_round = max(1, -(-iters // rounds)) if isinstance(iters, int) else iters
    settings = dict(device=device, dtype=dtype, channels_last=channels_last, compile=compile,
                    batch_sizes=batch_sizes, warmup=warmup, iters=iters, cudnn_benchmark=cudnn_benchmark)
    prep_o = _prepare(original, example_inputs, name=name, **settings)
    prep_c = _prepare(converted, example_inputs, name=name or prep_o.result.model, **settings)
    dev = prep_o.device
    stability: dict[int, dict[str, Any]] = {}
    with torch.inference_mode(), cudnn_benchmark_mode(cudnn_benchmark if dev.type == "cuda" else None):
        for b in prep_o.sizes:
            t_o, t_c = _Timer(prep_o, b), _Timer(prep_c, b)
            t_o.warm(warmup)
            t_c.warm(warmup)
            stability[t_o.batch_size] = interleaved_rounds(t_o, t_c, rounds, per_round, progress)
            prep_o.result.rows.append(t_o.row(warmup))
            prep_c.result.rows.append(t_c.row(warmup))
            del t_o, t_c
    return Comparison(prep_o.result, prep_c.result, dict(conversion or {}), rounds=stability)
