"""benchmark(): latency, throughput and peak memory of a model, the same API on CUDA and on CPU.

Timing follows timm's ``benchmark.py`` habits: the model runs in eval mode under ``torch.inference_mode()``,
warm-up calls come first (they absorb ``torch.compile`` and cuDNN's algorithm search), and every timed call is
measured on its own — with CUDA events recorded on the model's stream and synchronised after each call on
CUDA, with ``time.perf_counter`` on CPU. Latency is the median and 90th percentile over those calls; throughput
is the batch size over the mean latency. The caller's model is never moved, cast or put in eval mode: a copy is
benchmarked whenever anything has to change.

:func:`compare` puts an original and a converted model's results side by side with their ratio, which is what
``fxsurgeon bench`` prints.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
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


@dataclass
class BenchmarkRow:
    """One batch size's measurement.

    Attributes:
        batch_size: samples per call.
        latency_ms_median / latency_ms_p90 / latency_ms_mean / latency_ms_min: per-call latency in ms.
        throughput: samples per second, ``batch_size / mean latency``.
        peak_memory_mib: CUDA only (None on CPU, whose allocator keeps no peak statistics): the memory one
            forward of this model needs on its own — its weights and inputs plus the peak extra allocation
            during the timed calls (activations, workspaces) as ``torch.cuda.max_memory_allocated`` saw it.
        first_call_s: wall time of the first warm-up call, which includes ``torch.compile``'s compilation
            and cuDNN's algorithm search; None when ``warmup=0``.
        iters / warmup: timed and untimed calls.
    """

    batch_size: int
    latency_ms_median: float
    latency_ms_p90: float
    latency_ms_mean: float
    latency_ms_min: float
    throughput: float
    peak_memory_mib: float | None
    first_call_s: float | None
    iters: int
    warmup: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchmarkResult:
    """What :func:`benchmark` measured, for one model in one configuration, one row per batch size."""

    model: str
    device: str
    device_name: str
    dtype: str
    channels_last: bool
    compile: str | None
    input_shapes: list[list[int]]
    params: int
    weights_mib: float
    rows: list[BenchmarkRow] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def row(self, batch_size: int) -> BenchmarkRow:
        for r in self.rows:
            if r.batch_size == batch_size:
                return r
        raise KeyError(f"no row for batch size {batch_size}; measured: {[r.batch_size for r in self.rows]}")

    def config(self) -> str:
        """``"cuda (NVIDIA H100), bf16, channels_last, compiled"``: the configuration in one line."""
        parts = [f"{self.device} ({self.device_name})", self.dtype,
                 "channels_last" if self.channels_last else "contiguous (NCHW)",
                 f"compiled ({self.compile})" if self.compile else "eager"]
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = [r.to_dict() for r in self.rows]
        return out

    def to_markdown(self) -> str:
        lines = [
            f"**{self.model}** — {self.config()}; {self.params:,} parameters ({self.weights_mib:.1f} MiB)",
            "",
            "| batch | median ms | p90 ms | samples/s | peak MiB | first call s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.batch_size} | {r.latency_ms_median:.3f} | {r.latency_ms_p90:.3f} | {r.throughput:,.1f} "
                f"| {_fmt_mem(r.peak_memory_mib)} | {_fmt(r.first_call_s, '.2f')} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _fmt_mem(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


@dataclass
class Comparison:
    """An original and a converted model benchmarked in the same configuration, side by side.

    ``speedup`` is original latency / converted latency (above 1: the converted model is faster);
    ``memory_ratio`` is converted / original peak memory (below 1: it needs less).
    """

    original: BenchmarkResult
    converted: BenchmarkResult
    conversion: dict[str, Any] = field(default_factory=dict)
    #: per batch size, when timed interleaved (:func:`benchmark_pair`): the speed-up of every round, median, spread
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        """Noisy timings and unstable speed-ups (see :func:`noise_warnings`)."""
        return noise_warnings(self)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for a in self.original.rows:
            try:
                b = self.converted.row(a.batch_size)
            except KeyError:
                continue
            out.append({
                "batch_size": a.batch_size,
                "original_ms": a.latency_ms_median, "converted_ms": b.latency_ms_median,
                "speedup": _ratio(a.latency_ms_median, b.latency_ms_median),
                "original_p90_ms": a.latency_ms_p90, "converted_p90_ms": b.latency_ms_p90,
                "original_throughput": a.throughput, "converted_throughput": b.throughput,
                "throughput_ratio": _ratio(b.throughput, a.throughput),
                "original_peak_mib": a.peak_memory_mib, "converted_peak_mib": b.peak_memory_mib,
                "memory_ratio": _ratio(b.peak_memory_mib, a.peak_memory_mib),
            })
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {"original": self.original.to_dict(), "converted": self.converted.to_dict(),
               "comparison": self.rows(), "conversion": self.conversion}
        if self.rounds:
            out["interleaved"] = {str(b): s for b, s in self.rounds.items()}
            out["warnings"] = self.warnings
        return out

    def to_markdown(self) -> str:
        o, c = self.original, self.converted
        lines = [
            f"### {o.model}: original vs converted — {o.config()}",
            "",
            f"parameters {o.params:,} → {c.params:,} ({_pct(c.params, o.params)}); "
            f"warm-up {o.rows[0].warmup if o.rows else 0}, {o.rows[0].iters if o.rows else 0} timed calls per row; "
            "speed-up = original / converted latency (above 1: converted is faster)",
            "",
            "| batch | original ms | converted ms | speed-up | original p90 | converted p90 | original samples/s "
            "| converted samples/s | original peak MiB | converted peak MiB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows():
            lines.append(
                f"| {r['batch_size']} | {r['original_ms']:.3f} | {r['converted_ms']:.3f} | "
                f"{_fmt(r['speedup'], '.2f')}× | {r['original_p90_ms']:.3f} | {r['converted_p90_ms']:.3f} | "
                f"{r['original_throughput']:,.1f} | {r['converted_throughput']:,.1f} | "
                f"{_fmt_mem(r['original_peak_mib'])} | {_fmt_mem(r['converted_peak_mib'])} |"
            )
        if self.rounds:
            lines += ["", "Timed interleaved in one process (original and converted alternating, same load); "
                          "speed-up per round:"]
            for b, st in self.rounds.items():
                lines.append(f"- batch {b}: median {st['speedup_median']:.2f}× over {st['rounds']} rounds of "
                             f"{st['iters_per_round']} calls, {st['speedup_min']:.2f}×–{st['speedup_max']:.2f}×")
            for w in self.warnings:
                lines.append(f"- **warning:** {w}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write Markdown (``.md``) or JSON (``.json``) by the file's suffix; the path written."""
        return write_result(self, path)


def _pct(after: int, before: int) -> str:
    return f"{(after - before) / before:+.1%}" if before else "n/a"


def write_result(result: BenchmarkResult | Comparison, path: str | os.PathLike[str]) -> Path:
    """Write a result as Markdown (``.md``) or JSON (``.json``), chosen by the suffix."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        text = json.dumps(result.to_dict(), indent=2, default=str) + "\n"
    elif p.suffix.lower() in (".md", ".markdown"):
        text = result.to_markdown() + "\n"
    else:
        raise SurgeryError(f"cannot tell what to write to {str(p)!r}: use a .md or .json file name")
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def compare(original: BenchmarkResult, converted: BenchmarkResult,
            conversion: dict[str, Any] | None = None) -> Comparison:
    """Side-by-side :class:`Comparison` of two results measured in the same configuration.

    Raises:
        SurgeryError: the two were measured on different devices, dtypes, memory formats or compile modes,
            so their ratio would mean nothing.
    """
    for key in ("device", "device_name", "dtype", "channels_last", "compile"):
        if getattr(original, key) != getattr(converted, key):
            raise SurgeryError(
                f"cannot compare results measured with different {key}: "
                f"{getattr(original, key)!r} vs {getattr(converted, key)!r}"
            )
    return Comparison(original, converted, dict(conversion or {}))


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


#: a timing whose 90th percentile is more than this many times its median is called noisy
NOISY_P90_RATIO = 1.5
#: a speed-up whose per-round values spread (max - min) by more than this fraction of their median is unstable
UNSTABLE_SPREAD = 0.15


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
    :data:`NOISY_P90_RATIO` × median) or the speed-up unstable across rounds (spread above
    :data:`UNSTABLE_SPREAD` of the median). ``progress`` is called with 1 after every timed round.

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


def noise_warnings(comparison: Comparison) -> list[str]:
    """One line per noisy timing or unstable speed-up of ``comparison`` (empty: the numbers look steady)."""
    out = []
    for res, which in ((comparison.original, "original"), (comparison.converted, "converted")):
        for row in res.rows:
            if row.latency_ms_median > 0 and row.latency_ms_p90 / row.latency_ms_median > NOISY_P90_RATIO:
                out.append(f"{which} at batch {row.batch_size}: noisy timing, p90 {row.latency_ms_p90:.3f} ms is "
                           f"{row.latency_ms_p90 / row.latency_ms_median:.1f}× the median "
                           f"{row.latency_ms_median:.3f} ms (threshold {NOISY_P90_RATIO}×)")
    for b, s in comparison.rounds.items():
        if s["spread"] is not None and s["spread"] > UNSTABLE_SPREAD:
            out.append(f"batch {b}: speed-up unstable across {s['rounds']} rounds, {s['speedup_min']:.2f}× to "
                       f"{s['speedup_max']:.2f}× (spread {s['spread']:.0%} of the median, threshold "
                       f"{UNSTABLE_SPREAD:.0%})")
    if out:
        out.append("close other programs, fix the thread count (OMP_NUM_THREADS), or raise --iters / --rounds, then rerun")
    return out
