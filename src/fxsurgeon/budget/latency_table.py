"""Latency tables: how long each candidate rewrite of a conv takes at its input shape, cached on disk.

A latency budget needs, per layer, the time of the original conv and of every (form, rank) the allocation
may pick. The time depends on the conv's geometry, the candidate, the input shape, the device, the dtype,
the memory format, the batch size and (on CPU) the number of threads — not on the weights — so candidates
are built with random weights (no decomposition), layers with equal shapes share their measurements, and
measurements are kept on disk for the next conversion on the same machine.

The cache is one JSON file per (device name, torch version, dtype, memory format, batch size, threads, clock)
under ``~/.cache/fxsurgeon/latency`` (``$FXSURGEON_CACHE_DIR/latency`` when that is set; the ``cache_dir``
option overrides both, ``cache_dir=False`` turns the disk cache off). Files are written atomically (a
temporary file renamed over the old one) and read as untrusted input: JSON only, every field checked; a file
that does not validate is ignored with a warning and rewritten, never executed or partly trusted. The same
folder keeps the CP menu errors of :mod:`fxsurgeon.forms.cp_store`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cachefile import CacheFile
from ..errors import SurgeryError
from ..forms.registry import get_form
from ..onnxrun import onnxruntime_module
from ..runtime import device_name, dtype_name

__all__ = [
    "CACHE_ENV",
    "LatencyTable",
    "cache_root_set",
    "candidate_key",
    "conv_signature",
    "default_cache_dir",
    "hardware_multiple",
]

#: environment variable naming fxsurgeon's cache root (latency tables go in its ``latency`` folder)
CACHE_ENV = "FXSURGEON_CACHE_DIR"
FORMAT = "fxsurgeon-latency-table"
VERSION = 1

#: (form, rank) of the original conv in a table
ORIGINAL = ("original", 0)


def cache_root_set() -> Path | None:
    """``$FXSURGEON_CACHE_DIR`` when the user set it (not empty), else None: the opt-in for caches that a default
    conversion does not keep (the CP menu errors of MAC and parameter budgets)."""
    root = os.environ.get(CACHE_ENV, "").strip()
    return Path(root).expanduser() if root else None


def default_cache_dir() -> Path:
    """``$FXSURGEON_CACHE_DIR/latency`` when the variable is set (and not empty), else ``~/.cache/fxsurgeon/latency``.

    >>> default_cache_dir().name
    'latency'
    """
    return (cache_root_set() or Path.home() / ".cache" / "fxsurgeon") / "latency"


def hardware_multiple(device: torch.device) -> int:
    """Channel counts the device's fast kernels like: 8 on CUDA (tensor-core tiles), the SIMD width in
    float32 lanes on CPU (16 for AVX-512, 8 for AVX2, else 4: SSE / NEON).

    >>> hardware_multiple(torch.device("cuda")), hardware_multiple(torch.device("cpu")) in (4, 8, 16)
    (8, True)
    """
    if device.type == "cuda":
        return 8
    if device.type == "cpu":
        try:
            cap = str(torch.backends.cpu.get_cpu_capability()).upper()
        except Exception:  # an old or unusual build: the narrowest common width
            return 4
        if "512" in cap:
            return 16
        if "AVX2" in cap or "256" in cap:
            return 8
    return 4


def conv_signature(conv: nn.Conv2d) -> str:
    """What a conv's speed depends on besides its input: class, channels, kernel, stride, padding, ...

    >>> conv_signature(nn.Conv2d(8, 16, 3, padding=1))
    'Conv2d(8,16,k3x3,s1x1,p1x1,d1x1,g1,b1,zeros)'
    """
    pad = conv.padding if isinstance(conv.padding, str) else "x".join(str(p) for p in conv.padding)
    return (f"{type(conv).__name__}({conv.in_channels},{conv.out_channels},"
            f"k{'x'.join(map(str, conv.kernel_size))},s{'x'.join(map(str, conv.stride))},p{pad},"
            f"d{'x'.join(map(str, conv.dilation))},g{conv.groups},b{int(conv.bias is not None)},{conv.padding_mode})")


def candidate_key(conv: nn.Conv2d, form: str, rank: int, shapes: Sequence[Sequence[int]]) -> str:
    """Table key: input shapes without the batch (the batch is part of the table's context), conv, candidate.

    >>> candidate_key(nn.Conv2d(8, 8, 3), "dw-pw", 2, [[1, 8, 16, 16]])
    '8x16x16|Conv2d(8,8,k3x3,s1x1,p0x0,d1x1,g1,b1,zeros)|dw-pw:2'
    """
    shape = "+".join("x".join(str(d) for d in s[1:]) for s in shapes)
    return f"{shape}|{conv_signature(conv)}|{form}:{rank}"


def _valid_ms(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


class LatencyTable:
    """Measured milliseconds of conv candidates in one setting (device, dtype, layout, batch), with a disk cache.

    Args:
        judge: a :class:`~fxsurgeon.budget.latency.LatencyJudge`: where and how to time (its ``timer`` replaces the
            clock; a table measured by an injected timer is cached apart from real measurements).
        device / dtype / channels_last / batch_size: the setting (resolved by the caller).
        cache_dir: a directory, None for :func:`default_cache_dir`, False for no disk cache.

    >>> from fxsurgeon.budget.latency import LatencyJudge
    >>> judge = LatencyJudge(timer=lambda m, x: 1e-3 * sum(p.numel() for p in m.parameters()) / 1000)
    >>> table = LatencyTable(judge, torch.device("cpu"), torch.float32, False, 1, cache_dir=False)
    >>> conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    >>> ms = table.measure(conv, [("original", 0), ("dw-pw", 1)], [[1, 8, 16, 16]])
    >>> round(ms[("original", 0)], 3), round(ms[("dw-pw", 1)], 3), table.measured
    (0.576, 0.136, 2)
    """

    def __init__(self, judge: Any, device: torch.device, dtype: torch.dtype, channels_last: bool, batch_size: int,
                 *, cache_dir: Any = None) -> None:
        self.judge = judge
        self.device, self.dtype, self.channels_last, self.batch_size = device, dtype, channels_last, batch_size
        timer = judge.timer
        self.context: dict[str, Any] = {
            "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
            "dtype": dtype_name(dtype), "memory_format": "channels_last" if channels_last else "contiguous",
            "batch": int(batch_size), "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "clock": "measured" if timer is None else f"timer:{getattr(timer, '__qualname__', type(timer).__name__)}",
            "warmup": judge.warmup, "iters": judge.iters, "rounds": judge.rounds,
        }
        runtime = judge.runtime
        if runtime != "eager":  # eager tables keep the context (and file) they had before runtimes existed
            self.context["runtime"] = f"{runtime} {onnxruntime_module().__version__}"
        self.path: Path | None = None
        if cache_dir is not False:
            folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
            digest = hashlib.sha256(json.dumps(self.context, sort_keys=True).encode()).hexdigest()[:20]
            self.path = folder / f"{digest}.json"
        self.file = CacheFile(self.path, FORMAT, VERSION, self.context, valid=_valid_ms, what="latency cache")
        self.hits = 0
        self.measured = 0
        self.seconds = 0.0

    # ------------------------------------------------------------------------------------------- disk

    @property
    def warnings(self) -> list[str]:
        return self.file.warnings

    def flush(self) -> None:
        """Write new measurements to the cache file atomically (merged with what another process wrote)."""
        self.file.flush()

    # ------------------------------------------------------------------------------------------ timing

    def _inputs(self, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        out = []
        for s in shapes:
            x = torch.randn([self.batch_size, *s[1:]], generator=gen).to(device=self.device, dtype=self.dtype)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(x)
        return out

    def _module(self, conv: nn.Conv2d, form: str, rank: int) -> nn.Module:
        if (form, rank) == ORIGINAL:
            mod = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                            bias=conv.bias is not None, padding_mode=conv.padding_mode) \
                if type(conv) is nn.Conv2d or conv.weight.is_meta else conv
        else:
            proto = conv
            if conv.weight.is_meta:
                proto = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                                  padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                                  padding_mode=conv.padding_mode)
            mod, _ = get_form(form).build(proto, rank, init="random")
        return self.judge._place(mod, self.device, self.dtype, self.channels_last)

    def measure(self, conv: nn.Conv2d, candidates: Sequence[tuple[str, int]],
                shapes: Sequence[Sequence[int]]) -> dict[tuple[str, int], float]:
        """Milliseconds of each (form, rank) candidate — ``("original", 0)`` is the conv itself — summed over
        the call sites' input ``shapes`` (batch replaced by the table's). Cached ones are not re-timed.

        The uncached candidates are timed in ``judge.rounds`` rounds, each timing every candidate once in
        turn; a candidate's fastest round counts, so a burst of load does not decide it.
        """
        keys = {c: candidate_key(conv, c[0], c[1], shapes) for c in dict.fromkeys(candidates)}
        out: dict[tuple[str, int], float] = {}
        todo = []
        for c, key in keys.items():
            ms = self.file.get(key)
            if ms is not None:
                out[c] = float(ms)
                self.hits += 1
            else:
                todo.append(c)
        if not todo:
            return out
        t0 = time.perf_counter()
        inputs = self._inputs(shapes)
        modules = {c: self._module(conv, *c) for c in todo}
        best = dict.fromkeys(todo, math.inf)
        try:
            runs = {c: [(self.judge.runnable(modules[c], (x,)), x) for x in inputs] for c in todo}  # built once
            for _ in range(self.judge.rounds):
                for c in todo:
                    best[c] = min(best[c], sum(self.judge.time(run, (x,), self.device) for run, x in runs[c]))
        except SurgeryError:
            raise
        except Exception as exc:
            raise SurgeryError(f"target_latency: timing {conv_signature(conv)} on {self.device} "
                               f"({dtype_name(self.dtype)}) failed: {type(exc).__name__}: {exc}") from exc
        for c in todo:
            ms = max(best[c] * 1000.0, 1e-9)
            out[c] = ms
            self.file.put(keys[c], ms)
        self.measured += len(todo)
        self.seconds += time.perf_counter() - t0
        return out

    def summary(self) -> dict[str, Any]:
        return {"cache_file": str(self.path) if self.path is not None else None, "hits": self.hits,
                "measured": self.measured, "seconds_timing": round(self.seconds, 3), "context": self.context,
                "warnings": list(self.warnings)}
