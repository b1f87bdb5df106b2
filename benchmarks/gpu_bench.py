"""Original vs converted timm models on one device: latency, throughput, memory; stops at a deadline.

Run by ``benchmarks/gpu_check.sh`` (which sets the deadline), or alone:

    PYTHONPATH=src python3 benchmarks/gpu_bench.py --device cuda --out gpu_out

For every model it builds the timm model (``pretrained=False``: latency does not depend on the weights),
converts it with ``convert()``'s defaults (or ``--recipe``) where it lives, counts MACs with fvcore when
fvcore is installed, then measures configurations in priority order:

1. eager: every model × dtype × batch size (cheap: seconds each);
2. latency-aware: each model converted again with ``separable=dict(latency_aware=...)`` timed at the first
   dtype and the largest batch size, then benchmarked there, showing which rewrites survive on this device;
3. compiled (``torch.compile``, default mode, static shapes): every model × dtype × batch size.

Before each configuration the time it will take is estimated from the ones already measured (compile
times included); when it would overrun ``--deadline`` it is recorded as skipped instead of run. Results are
rewritten to ``gpu_bench.md`` / ``gpu_bench.json`` after every configuration, so an interrupted run still
leaves everything measured so far. Exit status: 0 all run configurations succeeded, 1 some failed, 130
interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import fxsurgeon
from fxsurgeon.bench import benchmark, device_name, dtype_name, parse_dtype, resolve_device

#: first estimates (seconds) of one configuration — original and converted — before any was measured
DEFAULT_ESTIMATE_S = {"eager": 10.0, "latency-aware": 40.0, "compiled": 75.0}
# Estimates are scaled by this. It is small on purpose: gpu_check.sh interrupts a run that passes the deadline,
# and what was measured by then is already written, so erring late costs one configuration, erring early many.
SAFETY = 1.1


@dataclass
class Row:
    model: str
    variant: str  # "default" (convert()'s defaults or --recipe) or "latency-aware"
    mode: str  # "eager" or "compiled"
    dtype: str
    batch_size: int
    status: str = "ok"  # ok | skipped | error
    reason: str = ""
    original_ms: float | None = None
    converted_ms: float | None = None
    original_p90_ms: float | None = None
    converted_p90_ms: float | None = None
    original_throughput: float | None = None
    converted_throughput: float | None = None
    original_peak_mib: float | None = None
    converted_peak_mib: float | None = None
    original_first_call_s: float | None = None
    converted_first_call_s: float | None = None
    seconds: float | None = None

    @property
    def speedup(self) -> float | None:
        if self.original_ms and self.converted_ms:
            return self.original_ms / self.converted_ms
        return None


@dataclass
class Prepared:
    name: str
    original: torch.nn.Module
    converted: torch.nn.Module
    x: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    latency_aware: torch.nn.Module | None = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="resnet50,efficientnet_b0,convnext_tiny,densenet121")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--modes", default="eager,latency-aware,compiled",
                   help="phases to run, in this order of priority")
    p.add_argument("--no-channels-last", action="store_true", help="benchmark in NCHW instead of channels_last")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="default: each model's")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--recipe", help="recipe YAML for the default conversion")
    p.add_argument("--deadline", type=float, default=None, help="UNIX time by which to stop (default: none)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_out", help="folder for gpu_bench.md/.json")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"gpu_bench: {msg}", flush=True)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "fxsurgeon": fxsurgeon.__version__, "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   float32_matmul_precision=torch.get_float32_matmul_precision())
    try:
        import fvcore  # noqa: F401

        env["fvcore"] = True
    except ImportError:
        env["fvcore"] = False
    return env


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> int | None:
    """fvcore MACs (one multiply-add = 1 MAC) at batch 1, or None without fvcore or when it fails."""
    try:
        from fxsurgeon.report.count import count_model

        return int(count_model(model, (x,), torch_counter=False).total_macs)
    except ImportError:
        return None
    except Exception as exc:  # a model fvcore cannot trace: the table says n/a, the log says why
        log(f"  MAC count failed: {type(exc).__name__}: {exc}")
        return None


def prepare(name: str, args, device: torch.device, recipe: dict[str, Any]) -> Prepared:
    import timm

    t0 = time.perf_counter()
    model = timm.create_model(name, pretrained=False).eval().to(device)
    size = args.input_size or model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(device)
    converted = fxsurgeon.convert(model, example_inputs=x, **recipe)  # converted where the model lives
    rec = converted.meta["fxsurgeon"]
    v = rec.verification
    info = {
        "input_size": list(size), "params_before": rec.params_before, "params_after": rec.params_after,
        "rewrites": len(rec.rewrites), "skipped": len(rec.skipped),
        "rewrites_by_pass": {p: c["rewrites"] for p, c in rec.counts().items()},
        "rel_error": v.rel_error if v else None, "verified_on": v.device if v else None,
        "convert_s": round(time.perf_counter() - t0, 2),
    }
    info["macs_before"] = count_macs(model, x)
    info["macs_after"] = count_macs(converted, x)
    log(f"{name}: {info['rewrites']} rewrites, params {info['params_before']:,} → {info['params_after']:,}, "
        f"MACs {fmt_int(info['macs_before'])} → {fmt_int(info['macs_after'])}, converted on "
        f"{info['verified_on']} in {info['convert_s']} s")
    return Prepared(name, model, converted, x, info)


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |"


def fmt_int(v: int | None) -> str:
    return "n/a" if v is None else f"{v:,}"


def fmt(v: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{format(v, spec)}{suffix}"


def pct(after: int | None, before: int | None) -> str:
    if not after or not before:
        return "n/a"
    return f"{(after - before) / before:+.1%}"


class Runner:
    def __init__(self, args, device: torch.device):
        self.args = args
        self.device = device
        self.channels_last = not args.no_channels_last
        self.rows: list[Row] = []
        self.models: dict[str, dict[str, Any]] = {}
        self.observed: dict[tuple[str, str], float] = {}
        self.errors = 0
        self.env = environment(device)
        self.started = time.time()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------------------------- time

    def estimate(self, model: str, mode: str) -> float:
        seen = self.observed.get((model, mode))
        if seen is None:
            same_mode = [s for (m, md), s in self.observed.items() if md == mode]
            seen = max(same_mode) if same_mode else DEFAULT_ESTIMATE_S[mode]
        return seen * SAFETY

    def time_left(self) -> float:
        return math.inf if self.args.deadline is None else self.args.deadline - time.time()

    def fits(self, model: str, mode: str) -> tuple[bool, str]:
        need, left = self.estimate(model, mode), self.time_left()
        if need <= left:
            return True, ""
        return False, f"time budget: needs ~{need:.0f} s, {max(left, 0):.0f} s left before the deadline"

    # ----------------------------------------------------------------------------------------- measuring

    def measure(self, row: Row, original, converted, x, compile: bool) -> None:
        settings = dict(device=self.device, dtype=parse_dtype(row.dtype), channels_last=self.channels_last,
                        compile=compile, batch_sizes=[row.batch_size], warmup=self.args.warmup,
                        iters=self.args.iters)
        for which, model in (("original", original), ("converted", converted)):
            if compile:
                torch._dynamo.reset()  # a fresh cache per model: no recompile limits, no shared guards
            res = benchmark(model, x, name=row.model, **settings).rows[0]
            setattr(row, f"{which}_ms", res.latency_ms_median)
            setattr(row, f"{which}_p90_ms", res.latency_ms_p90)
            setattr(row, f"{which}_throughput", res.throughput)
            setattr(row, f"{which}_peak_mib", res.peak_memory_mib)
            setattr(row, f"{which}_first_call_s", res.first_call_s)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if compile:
            torch._dynamo.reset()

    def run_row(self, row: Row, fn) -> None:
        ok, why = self.fits(row.model, row.variant if row.variant == "latency-aware" else row.mode)
        if not ok:
            row.status, row.reason = "skipped", why
            log(f"SKIP {row.model} {row.variant} {row.mode} {row.dtype} b{row.batch_size}: {why}")
            self.rows.append(row)
            self.write()
            return
        t0 = time.perf_counter()
        try:
            fn(row)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            row.status, row.reason = "error", f"{type(exc).__name__}: {exc}"[:500]
            self.errors += 1
            log(f"ERROR {row.model} {row.variant} {row.mode} {row.dtype} b{row.batch_size}: {row.reason}")
            traceback.print_exc()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        row.seconds = round(time.perf_counter() - t0, 2)
        key = (row.model, row.variant if row.variant == "latency-aware" else row.mode)
        self.observed[key] = max(self.observed.get(key, 0.0), row.seconds)
        if row.status == "ok":
            log(f"{row.model:16s} {row.variant:13s} {row.mode:8s} {row.dtype} b{row.batch_size:<3d} "
                f"original {row.original_ms:8.3f} ms  converted {row.converted_ms:8.3f} ms  "
                f"speed-up {row.speedup:5.2f}×  ({row.seconds:.1f} s)")
        self.rows.append(row)
        self.write()

    # ------------------------------------------------------------------------------------------- output

    def write(self) -> None:
        data = {"environment": self.env, "channels_last": self.channels_last, "warmup": self.args.warmup,
                "iters": self.args.iters, "models": self.models, "elapsed_s": round(time.time() - self.started, 1),
                "rows": [{**asdict(r), "speedup": r.speedup} for r in self.rows]}
        tmp = self.out / ".gpu_bench.json.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, self.out / "gpu_bench.json")
        tmp = self.out / ".gpu_bench.md.tmp"
        tmp.write_text(self.markdown() + "\n")
        os.replace(tmp, self.out / "gpu_bench.md")

    def markdown(self) -> str:
        e = self.env
        head = f"{e['device_name']} ({e['device']})"
        if e.get("cuda"):
            head += f", CUDA {e['cuda']}, cuDNN {e['cudnn']}"
        lines = [
            f"#### {head}; torch {e['torch']}, timm {e.get('timm')}",
            "",
            f"Inputs {'channels_last' if self.channels_last else 'NCHW'}, models cast to the dtype; "
            f"median of {self.args.iters} timed calls after {self.args.warmup} warm-up calls "
            f"({'CUDA events, synchronised per call' if self.device.type == 'cuda' else 'perf_counter'}); "
            "cuDNN benchmark mode on; `torch.compile` default mode, static shapes. Speed-up = original / "
            "converted latency (above 1: converted is faster). MACs are fvcore's (one multiply-add = 1 MAC), "
            "per image.",
            "",
            md_row(["model", "params", "MACs", "rewrites", "latency-aware rewrites (kept / dropped)"]),
            md_row(["---", "---:", "---:", "---:", "---"]),
        ]
        for name, m in self.models.items():
            if "error" in m:
                lines.append(md_row([name, f"conversion failed: {m['error'][:150]}", "", "", ""]))
                continue
            params = (f"{m['params_before'] / 1e6:.2f}M → {m['params_after'] / 1e6:.2f}M "
                      f"({pct(m['params_after'], m['params_before'])})")
            macs = (f"{m['macs_before'] / 1e9:.2f}G → {m['macs_after'] / 1e9:.2f}G "
                    f"({pct(m['macs_after'], m['macs_before'])})"
                    if m.get("macs_before") and m.get("macs_after") else "n/a (needs fvcore)")
            la = m.get("latency_aware")
            la_text = (f"{la['kept']} / {la['dropped']} at {la['dtype']}, batch {la['batch_size']}" if la else "")
            lines.append(md_row([name, params, macs, str(m["rewrites"]), la_text]))
        lines += [
            "",
            md_row(["model", "variant", "mode", "dtype", "batch", "original ms", "converted ms", "speed-up",
                    "original p90", "converted p90", "original img/s", "converted img/s", "original peak MiB",
                    "converted peak MiB", "first call s (orig / conv)"]),
            md_row(["---"] * 4 + ["---:"] * 10 + ["---"]),
        ]
        for r in self.rows:
            cells = [r.model, r.variant, r.mode, r.dtype, str(r.batch_size)]
            if r.status != "ok":
                lines.append(md_row([*cells, f"{r.status}: {r.reason[:150]}", *[""] * 9]))
                continue
            lines.append(md_row([
                *cells, fmt(r.original_ms), fmt(r.converted_ms), fmt(r.speedup, ".2f", "×"), fmt(r.original_p90_ms),
                fmt(r.converted_p90_ms), fmt(r.original_throughput, ",.1f"), fmt(r.converted_throughput, ",.1f"),
                fmt(r.original_peak_mib, ",.0f"), fmt(r.converted_peak_mib, ",.0f"),
                f"{fmt(r.original_first_call_s, '.1f')} / {fmt(r.converted_first_call_s, '.1f')}",
            ]))
        skipped = sum(r.status == "skipped" for r in self.rows)
        errors = sum(r.status == "error" for r in self.rows)
        lines += ["", f"{sum(r.status == 'ok' for r in self.rows)} configurations measured, {skipped} skipped "
                      f"for time, {errors} failed; {time.time() - self.started:.0f} s."]
        return "\n".join(lines)

    # -------------------------------------------------------------------------------------------- phases

    def run(self) -> int:
        a = self.args
        names = [m for m in a.models.split(",") if m]
        sizes = [int(b) for b in a.batch_sizes.split(",") if b]
        dtypes = [dtype_name(parse_dtype(d)) for d in a.dtypes.split(",") if d]
        modes = [m for m in a.modes.split(",") if m]
        unknown = set(modes) - set(DEFAULT_ESTIMATE_S)
        if unknown:
            raise SystemExit(f"gpu_bench: unknown modes {sorted(unknown)}; use {', '.join(DEFAULT_ESTIMATE_S)}")
        recipe: dict[str, Any] = {}
        if a.recipe:
            from fxsurgeon.recipes import load_recipe

            recipe = load_recipe(a.recipe)
        log(f"device {self.env['device_name']} ({self.device}); torch {self.env['torch']}; "
            f"{len(names)} models; deadline in {self.time_left():.0f} s")
        prepared: dict[str, Prepared] = {}
        for name in names:
            try:
                prepared[name] = prepare(name, a, self.device, recipe)
                self.models[name] = prepared[name].info
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                self.errors += 1
                self.models[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                log(f"ERROR preparing {name}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
            self.write()

        for mode in modes:
            if mode == "latency-aware":
                for name, p in prepared.items():
                    self.run_row(Row(name, "latency-aware", "eager", dtypes[-1], max(sizes)),
                                 lambda row, p=p: self.latency_aware(row, p, recipe))
                continue
            for dtype in (dtypes[::-1] if mode == "compiled" else dtypes):  # compiled: bf16 first (deployment)
                for b in (sorted(sizes, reverse=True) if mode == "compiled" else sizes):
                    for name, p in prepared.items():
                        self.run_row(Row(name, "default", mode, dtype, b),
                                     lambda row, p=p: self.measure(row, p.original, p.converted, p.x,
                                                                   compile=row.mode == "compiled"))
        self.write()
        print(self.markdown(), flush=True)
        return 1 if self.errors else 0

    def latency_aware(self, row: Row, p: Prepared, recipe: dict[str, Any]) -> None:
        sep = recipe.get("separable", {})
        sep = dict(sep) if isinstance(sep, dict) else {}
        sep["latency_aware"] = dict(dtype=row.dtype, channels_last=self.channels_last, batch_size=row.batch_size,
                                    warmup=3, iters=10)
        sep["device"] = str(self.device)
        la = fxsurgeon.convert(p.original, example_inputs=p.x, **{**recipe, "separable": sep})
        rec = la.meta["fxsurgeon"]
        kept = [r for r in rec.rewrites if "latency" in r.details]
        dropped = [s for s in rec.skipped if s.reason.startswith("latency_aware")]
        self.models[p.name]["latency_aware"] = {
            "dtype": row.dtype, "batch_size": row.batch_size, "kept": len(kept), "dropped": len(dropped),
            "params_after": rec.params_after,
            "layers": {**{r.target: r.details["latency"] for r in kept},
                       **{s.target: s.details.get("latency") for s in dropped}},
        }
        log(f"  latency-aware {p.name}: {len(kept)} rewrites kept, {len(dropped)} dropped "
            f"({row.dtype}, batch {row.batch_size})")
        self.measure(row, p.original, la, p.x, compile=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    runner = Runner(args, device)
    try:
        return runner.run()
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
        runner.write()
        print(runner.markdown(), flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
