"""Time of ``fxsurgeon.convert()`` (no verification) over the time of tracing alone.

Run: .venv/bin/python benchmarks/convert_speed.py [--repeats 5]

"Tracing alone" is ``fxsurgeon.trace(model)``, which includes the private deep copy of the model: convert()
must copy too (it never mutates the caller's model), so the copy is part of the honest floor. The script also
prints bare ``torch.fx.symbolic_trace`` (no copy, no timm leaves) for reference. Target: ratio ≤ 1.5×.
Each figure is the median of ``--repeats`` runs after one warm-up.

``floor`` adds to the trace the maths the default conversion cannot skip: the per-layer SVDs of the convs the
separable pass rewrites (``separable_factors`` at multiplier 1, on a thread pool as wide as the pass's). A model
whose 3×3 convs carry most of its weights (ResNet-50: 16 convs, 11.3 M weights) pays for them on top of the
trace; ``vs floor`` is convert() over that.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import timm
import torch

import fxsurgeon

MODELS = ("resnet50", "efficientnet_b0", "convnext_tiny")


def decompositions(converted: torch.nn.Module, model: torch.nn.Module):
    """A function doing the SVDs of the convs the separable pass rewrote, the way the pass does them."""
    from fxsurgeon.forms.decompose import separable_factors

    rec = fxsurgeon.get_record(converted)
    convs = [model.get_submodule(r.target) for r in rec.rewrites if r.pass_name == "separable"]
    workers = min(len(convs), torch.get_num_threads(), 8)

    def run() -> None:
        if workers < 2:
            for c in convs:
                separable_factors(c.weight, 1)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda c: separable_factors(c.weight, 1), convs))

    return run


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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'model':<18}{'trace (s)':>11}{'convert (s)':>13}{'ratio':>8}{'floor (s)':>11}{'vs floor':>10}"
          f"{'bare fx (s)':>13}  rewrites")
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        t_trace = median_time(lambda m=model: fxsurgeon.trace(m), args.repeats)
        t_conv = median_time(lambda m=model: fxsurgeon.convert(m, verify=False), args.repeats)
        t_bare = median_time(lambda m=model: torch.fx.symbolic_trace(m), args.repeats) if name == "resnet50" else float("nan")
        converted = fxsurgeon.convert(model, verify=False)
        n = len(fxsurgeon.get_record(converted).rewrites)
        floor = t_trace + median_time(decompositions(converted, model), args.repeats)
        print(f"{name:<18}{t_trace:>11.3f}{t_conv:>13.3f}{t_conv / t_trace:>7.2f}×{floor:>11.3f}"
              f"{t_conv / floor:>9.2f}×{t_bare:>13.3f}  {n}")


if __name__ == "__main__":
    main()
