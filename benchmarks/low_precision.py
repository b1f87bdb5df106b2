"""Converted models in low precision: the budget defaults on the trained ResNet-20 and ResNet-32, run in float32,
bfloat16 and float16, for several ALS ridges.

Run: PYTHONPATH=src .venv/bin/python benchmarks/low_precision.py [--ridges 0 1e-5] [--targets 0.60 0.45]
                                                                  [--models resnet20 resnet32] [--json PATH]

The CP form's ALS (:mod:`fxsurgeon.forms.als`) can drift into degeneracy on trained weights: components grow and
cancel, which float32 computes well and bfloat16 (8 bits of mantissa) does not. Per ridge
(``fxsurgeon.forms.cp.ALS_RIDGE``, patched for the run) each model is converted from its weights alone with
``separable=dict(target_macs=t)`` and its logits on the 5,000 evaluation images ``x[1::2]`` compared with the
original's in float32: logit error ``‖z′ − z‖ / ‖z‖``, agreement and accuracy, the converted model cast to each
dtype (a real cast, as ``model.bfloat16()``), beside the original cast the same way; and the largest weight of
any conv in the converted model (the original's are under 2). Rows go to
``benchmarks/results/low_precision.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch
from defaults_two_models import CHECKPOINTS, compare, load_model, logits
from torch import nn

import fxsurgeon
import fxsurgeon.forms.cp as cp
from fxsurgeon.models import load_cifar10_test

warnings.filterwarnings("ignore")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ridges", type=float, nargs="+", default=[0.0, 1e-5])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.60, 0.45])
    ap.add_argument("--models", nargs="+", default=list(CHECKPOINTS), choices=list(CHECKPOINTS))
    ap.add_argument("--json", default="benchmarks/results/low_precision.json")
    args = ap.parse_args()
    x, y = load_cifar10_test(split="eval")
    rows: list[dict] = []
    default_ridge = cp.ALS_RIDGE

    def save(summary: list[dict] | None = None) -> None:  # after every row: a run that dies keeps what it measured
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "machine": platform.machine(),
                                               "threads": torch.get_num_threads(), "default_ridge": default_ridge,
                                               "evaluated_on": "x[1::2] (5,000 images)", "rows": rows,
                                               "summary": summary or []}, indent=1))
    try:  # the ridge is a module global: put it back however the run ends
        for name in args.models:
            base = load_model(name)
            ref = logits(base, x, torch.float32)
            rows.append({"model": name, "ridge": None, "target": None,
                         **{d: compare(ref, logits(base, x, dt), y) for d, dt in DTYPES.items()},
                         "max_abs_weight": max(float(m.weight.abs().max()) for m in base.modules()
                                               if isinstance(m, nn.Conv2d))})
            for ridge in args.ridges:
                cp.ALS_RIDGE = ridge
                for target in args.targets:
                    cp.clear_cache()
                    t0 = time.perf_counter()
                    model = fxsurgeon.convert(base, separable=dict(target_macs=target), conv_head=False,
                                              example_inputs=x[:1])
                    seconds = time.perf_counter() - t0
                    row = {"model": name, "ridge": ridge, "target": target, "convert_s": round(seconds, 1),
                           **{d: compare(ref, logits(model, x, dt), y) for d, dt in DTYPES.items()},
                           "max_abs_weight": max(float(m.weight.abs().max()) for m in model.modules()
                                                 if isinstance(m, nn.Conv2d))}
                    rows.append(row)
                    save()
                    print(f"{name} ridge {ridge:g} target {target:.2f}: " + "  ".join(
                        f"{d} {row[d]['logit_error']:.4f} / {row[d]['accuracy']:.2f} %" for d in DTYPES)
                        + f"  max|w| {row['max_abs_weight']:.1f}  ({seconds:.0f} s)", flush=True)
    finally:
        cp.ALS_RIDGE = default_ridge
    summary = []
    for ridge in args.ridges:
        cells = [r for r in rows if r["ridge"] == ridge]
        summary.append({"ridge": ridge, "cells": len(cells), **{
            f"mean_logit_error_{d}": sum(r[d]["logit_error"] for r in cells) / len(cells) for d in DTYPES}})
        print(f"ridge {ridge:g}: mean logit error " + ", ".join(
            f"{d} {summary[-1][f'mean_logit_error_{d}']:.4f}" for d in DTYPES))
    save(summary)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
