"""What synthetic calibration images cost for a timm model at 224×224 (issue 22), on the CPU.

Run: PYTHONPATH=src .venv/bin/python benchmarks/synthetic_timm224.py [--model resnet18] [--count 8] [--steps 30]
                                                                   [--json benchmarks/results/synthetic_timm224.json]

Random weights (``pretrained=False``): the BatchNorms' running statistics are the initial ones (mean 0,
variance 1), so this measures seconds per image-step and the shape of the matching-loss curve, never accuracy.
The seconds scale with images × steps; the row says what the library defaults would take at this size.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import timm
import torch

import fxsurgeon
from fxsurgeon import synthetic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", default="benchmarks/results/synthetic_timm224.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    load = os.getloadavg()[0]
    t = time.perf_counter()
    data = fxsurgeon.synthesize(model, (3, 224, 224), count=args.count, steps=args.steps, batch_size=args.count)
    seconds = time.perf_counter() - t
    per = seconds / (args.count * args.steps)
    row = {"model": args.model, "size": 224, "count": args.count, "steps": args.steps, "lr": synthetic.DEFAULT_LR,
           "schedule": synthetic.DEFAULT_SCHEDULE, "tol": synthetic.DEFAULT_TOL, "steps_run": data.steps_run,
           "seconds": round(seconds, 1), "seconds_per_image_step": round(per, 4),
           "defaults_estimate_s": round(per * synthetic.DEFAULT_COUNT * synthetic.DEFAULT_STEPS, 0),
           "loss_start": data.loss_start, "loss_end": data.loss_end,
           "history": [round(h, 3) for h in data.history], "threads": torch.get_num_threads(),
           "load_average": load, "torch": torch.__version__, "timm": timm.__version__}
    path = Path(args.json)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows.append(row)
    path.write_text(json.dumps({"rows": rows}, indent=1))
    print(f"{args.model} 224: {args.count} images × {args.steps} steps in {seconds:.1f} s ({per * 1000:.0f} ms per "
          f"image-step; the defaults, {synthetic.DEFAULT_COUNT} × {synthetic.DEFAULT_STEPS}, would take about "
          f"{row['defaults_estimate_s']:.0f} s); loss {data.loss_start:.2f} → {data.loss_end:.2f}")


if __name__ == "__main__":
    main()
