"""How long a latency-budget conversion takes with a cold cache, and warm, each in a fresh process.

Run (from the repository root):

    .venv/bin/python benchmarks/conversion_time.py --model resnet50 --target 0.6 --threads 1,2 --warm-runs 3

For each thread count: one conversion from an empty cache folder (cold), then ``--warm-runs`` conversions
against the folder it filled (warm: latency tables and CP menu errors both on disk), then, unless
``--no-tables-only``, ``--warm-runs`` more with the CP error file removed before each (the latency tables warm,
the CP menus refitted: how warm conversions were before CP errors were kept). Every conversion runs in its own
Python process, as a user's next run would, so nothing is shared in memory. The model is timm's at 224×224 with
weights drawn from a fixed seed (equal in every process, as trained weights would be; the time does not depend
on their values). Printed per run: wall seconds of ``fxsurgeon.convert`` alone, the latency table's hits and
measurements, the CP errors' hits and fits, the measured ratio and status. Rows are written to ``--out``
(JSON; default ``benchmarks/results/conversion_time.json``, merged by model, target and threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "conversion_time.json"

CHILD = r"""
import json, sys, time, warnings
import torch, timm
import fxsurgeon
warnings.simplefilter("ignore")
model_name, target, threads, cache = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
torch.manual_seed(0)
model = timm.create_model(model_name, pretrained=False).eval()
x = torch.randn(1, 3, 224, 224)
t0 = time.perf_counter()
small = fxsurgeon.convert(model, example_inputs=x, separable=dict(target_latency=target, form="auto",
    latency_aware=dict(device="cpu", batch_size=1, channels_last=True, cache_dir=cache)))
seconds = time.perf_counter() - t0
a = fxsurgeon.get_record(small).extras["allocation"]
cp = a.get("cp_errors") or {}
print("ROW " + json.dumps(dict(seconds=round(seconds, 2), status=a["status"], ratio=a["measured_ratio"],
      table_hits=a["table"]["hits"], table_measured=a["table"]["measured"], cp_hits=cp.get("hits"),
      cp_fits=cp.get("fits"))))
"""


def csv_ints(text: str) -> list[int]:
    try:
        out = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints") from None
    if not out or any(n < 1 for n in out):
        raise argparse.ArgumentTypeError(f"{text!r}: thread counts are positive ints")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", help="timm model name (224×224)")
    p.add_argument("--target", type=float, default=0.6, help="target_latency")
    p.add_argument("--threads", type=csv_ints, default=[1, 2], help="CPU threads, one set of runs each")
    p.add_argument("--warm-runs", type=int, default=3, help="warm conversions per thread count")
    p.add_argument("--no-tables-only", action="store_true", help="skip the runs with only the latency tables warm")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not 0 < args.target <= 1 or args.warm_runs < 1:
        p.error("--target is in (0, 1] and --warm-runs is at least 1")
    return args


def convert_once(args: argparse.Namespace, threads: int, cache: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    proc = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.target), str(threads), str(cache)],
                          env=env, capture_output=True, text=True, check=False)
    rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not rows:
        raise SystemExit(f"conversion failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(rows[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    results = []
    for threads in args.threads:
        cache = Path(tempfile.mkdtemp(prefix="fxsurgeon-conversion-time-"))
        try:
            runs = []
            kinds = ["cold"] + ["warm"] * args.warm_runs + ([] if args.no_tables_only else ["tables"] * args.warm_runs)
            for kind in kinds:
                if kind == "tables":
                    for f in cache.glob("cp-menu-errors-*.json"):
                        f.unlink()
                row = {"cache": kind, **convert_once(args, threads, cache), "load": os.getloadavg()[0]}
                print(f"{args.model} target {args.target} threads {threads} {kind:6s} {row['seconds']:6.1f} s  "
                      f"table {row['table_hits']} hits / {row['table_measured']} timed  CP {row['cp_hits']} hits / "
                      f"{row['cp_fits']} fits  ratio {row['ratio']:.3f} ({row['status'][:40]})", flush=True)
                runs.append(row)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        results.append({"model": args.model, "target": args.target, "threads": threads, "runs": runs,
                        "machine": platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")})
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    keep = [r for r in old if not any((r["model"], r["target"], r["threads"]) == (n["model"], n["target"], n["threads"])
                                      for n in results)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(keep + results, indent=1) + "\n")
    for r in results:
        by = {}
        for run in r["runs"]:
            by.setdefault(run["cache"], []).append(run["seconds"])
        print(f"threads {r['threads']}: " + ", ".join(f"{k} {min(v):.1f}–{max(v):.1f} s" for k, v in by.items()))


if __name__ == "__main__":
    main()
