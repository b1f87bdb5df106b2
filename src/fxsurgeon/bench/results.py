"""What a benchmark measured: rows per batch size, one model's result, and two models side by side.

:class:`BenchmarkResult` is :func:`fxsurgeon.benchmark`'s answer for one model (a :class:`BenchmarkRow` per batch
size, with the device, dtype and versions it ran on); :func:`compare` and :class:`Comparison` put an original
and a converted model's results side by side with their ratio, which is what ``fxsurgeon bench`` prints;
:func:`write_result` writes either as Markdown or JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SurgeryError

__all__ = ["NOISY_P90_RATIO", "UNSTABLE_SPREAD", "BenchmarkResult", "BenchmarkRow", "Comparison", "compare",
           "noise_warnings", "write_result"]

#: a timing whose 90th percentile is more than this many times its median is called noisy
NOISY_P90_RATIO = 1.5
#: a speed-up whose per-round values spread (max - min) by more than this fraction of their median is unstable
UNSTABLE_SPREAD = 0.15


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
