"""Time of ``fxsurgeon.convert()`` (no verification) over the time of tracing alone.

Run: .venv/bin/python benchmarks/convert_speed.py [--repeats 5]

"Tracing alone" is ``fxsurgeon.trace(model)``, which includes the private deep copy of the model: convert()
must copy too (it never mutates the caller's model), so the copy is part of the honest floor. The script also
prints bare ``torch.fx.symbolic_trace`` (no copy, no timm leaves) for reference. Target: ratio ≤ 1.5×.
Each figure is the median of ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import fxsurgeon

MODELS = ("resnet50", "efficientnet_b0", "convnext_tiny")


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{'model':<18}{'trace (s)':>11}{'convert (s)':>13}{'ratio':>8}{'bare fx (s)':>13}  rewrites")
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        t_trace = median_time(lambda m=model: fxsurgeon.trace(m), args.repeats)
        t_conv = median_time(lambda m=model: fxsurgeon.convert(m, verify=False), args.repeats)
        t_bare = median_time(lambda m=model: torch.fx.symbolic_trace(m), args.repeats) if name == "resnet50" else float("nan")
        n = len(fxsurgeon.get_record(fxsurgeon.convert(model)).rewrites)
        print(f"{name:<18}{t_trace:>11.3f}{t_conv:>13.3f}{t_conv / t_trace:>7.2f}×{t_bare:>13.3f}  {n}")


if __name__ == "__main__":
    main()
