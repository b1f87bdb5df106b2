"""Data-free defaults of the separable pass, decided on two trained models: ResNet-20 and ResNet-32 (CIFAR-10).

Run: PYTHONPATH=src .venv/bin/python benchmarks/defaults_two_models.py [--models resnet20 resnet32]
                                                                       [--targets 0.60 0.45] [--configs NAME ...]
                                                                       [--json PATH] [--fresh]

Every config converts each model from its weights alone (no data, no synthetic images) at each whole-model
MAC target (``separable=dict(target_macs=t, ...)``, every 3×3 conv but the stem, ``conv_head=False``), then
compares the converted model's logits with the original's on the 5,000 evaluation images ``x[1::2]``:

* logit error: ``||z' − z||_F / ||z||_F`` over all 5,000 × 10 logits (float64);
* agreement: the share of images whose top-1 class is the original's;
* accuracy against the labels.

The decision is made on the *mean logit error over both models and both targets* (accuracy moves by ±0.3
points by chance at these disagreement rates; the logit error does not). Rows are saved after each
conversion, and a row already in the JSON is not measured again (``--fresh`` starts over; with ``--synthetic``
it redoes only the settings named), so configs can be
added to a finished run. ``--configs`` picks configs by name; the default is all of them.

``--synthetic COUNT:STEPS[:LR][:KEY=VALUE...] ...`` measures synthetic calibration instead (on the ResNet-20,
or ``--synthetic-model resnet32``); ``KEY=VALUE`` passes further :func:`fxsurgeon.synthesize` options, e.g.
``128:50:0.1:init=noise:schedule=cosine``. Per setting, images are made once (timed) and reused for every
target (``convert(..., calibration=data)``, timed), with the default separable options; ``--repeats N``
measures each setting N times. Rows go to ``benchmarks/results/synthetic_speed.json`` with the seconds split
(synthesis, allocation = the separable pass, refit = calibrate), the options in effect, the load average and
the thread count, so the error-vs-images and error-vs-steps curves and the time they cost can be read side
by side.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fxsurgeon
from fxsurgeon.forms.cp import clear_cache
from fxsurgeon.models import default_data_dir, load_cifar10_test, resnet20, resnet32

warnings.filterwarnings("ignore")

#: the configs compared: name → separable options besides ``target_macs``. "defaults" is whatever the
#: separable pass does without options (the chosen defaults); the others pin every option explicitly.
CONFIGS: dict[str, dict] = {
    "defaults": {},
    "dw-pw": dict(form="dw-pw", weighting=None, bias_correction=False),
    "auto": dict(form="auto", weighting=None, bias_correction=False),
    "auto, bn": dict(form="auto", weighting="bn", bias_correction=False),
    "auto, bias corr.": dict(form="auto", weighting=None, bias_correction=True),
    "auto, bn, bias corr.": dict(form="auto", weighting="bn", bias_correction=True),
    "pw-dw-pw": dict(form="pw-dw-pw", weighting=None, bias_correction=False),
    "pw-dw-pw, bn": dict(form="pw-dw-pw", weighting="bn", bias_correction=False),
}

CHECKPOINTS = {"resnet20": ("resnet20-12fca82f.th", resnet20), "resnet32": ("resnet32-d509ac18.th", resnet32)}


def load_model(name: str) -> nn.Module:
    """A shared trained CIFAR ResNet, its ``module.`` prefix stripped, strictly loaded, in eval mode."""
    file, build = CHECKPOINTS[name]
    ckpt = torch.load(default_data_dir() / file, map_location="cpu", weights_only=True)
    model = build()
    model.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}, strict=True)
    return model.eval()


def logits(model: nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The model's logits on ``x`` in float64, run in ``dtype`` (another dtype runs on a copy of the model)."""
    model = (model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)).eval()
    with torch.inference_mode():
        return torch.cat([model(x[i:i + 500].to(dtype)).double() for i in range(0, len(x), 500)])


def compare(ref: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Logit error (relative L2), top-1 agreement with the original and accuracy, in percent where a share."""
    return {"logit_error": float((out - ref).norm() / ref.norm()),
            "agreement": 100.0 * float((out.argmax(1) == ref.argmax(1)).double().mean()),
            "accuracy": 100.0 * float((out.argmax(1) == y).double().mean())}


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def summarise(rows: list[dict]) -> list[dict]:
    """Per config: the mean logit error over every (model, target) it was measured on, best first."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["config"] != "original":
            by.setdefault(r["config"], []).append(r)
    cells = {(r["model"], r["target"]) for r in rows if r["config"] != "original"}
    out = []
    for name, rs in by.items():
        out.append({"config": name, "cells": len(rs), "complete": {(r["model"], r["target"]) for r in rs} == cells,
                    "mean_logit_error": statistics.fmean(r["logit_error"] for r in rs),
                    "mean_agreement": statistics.fmean(r["agreement"] for r in rs),
                    "mean_accuracy": statistics.fmean(r["accuracy"] for r in rs)})
    return sorted(out, key=lambda s: (not s["complete"], s["mean_logit_error"]))


def table(rows: list[dict]) -> str:
    """The rows as Markdown: one line per config and model, the targets side by side."""
    targets = sorted({r["target"] for r in rows if r["target"] is not None}, reverse=True)
    head = "| config | model | " + " | ".join(f"{t:.2f}×: logit error / agreement / accuracy" for t in targets) + " |"
    lines = [head, "|---|---|" + "---|" * len(targets)]
    seen = []
    for r in rows:
        key = (r["config"], r["model"])
        if r["config"] != "original" and key not in seen:
            seen.append(key)
    for config, model in seen:
        cells = []
        for t in targets:
            r = next((r for r in rows if (r["config"], r["model"], r["target"]) == (config, model, t)), None)
            cells.append("—" if r is None else
                         f"{r['logit_error']:.3f} / {r['agreement']:.1f} % / {r['accuracy']:.2f} %")
        lines.append(f"| {config} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_setting(setting: str) -> tuple[int, int, float, dict]:
    """``COUNT:STEPS[:LR][:KEY=VALUE...]`` → count, steps, lr and further :func:`fxsurgeon.synthesize` options."""
    parts = setting.split(":")
    count, steps = int(parts[0]), int(parts[1])
    lr = float(parts[2]) if len(parts) > 2 and "=" not in parts[2] else fxsurgeon.synthetic.DEFAULT_LR
    extra = {}
    for part in parts[2:]:
        if "=" in part:
            k, v = part.split("=", 1)
            try:
                extra[k] = json.loads(v)
            except json.JSONDecodeError:
                extra[k] = v  # a bare word: a string option, e.g. init=noise
    return count, steps, lr, extra


def effective_options(extra: dict) -> dict:
    """The synthesize options a row ran with, the library's defaults filled in (they change between versions)."""
    syn = fxsurgeon.synthetic
    return {"schedule": getattr(syn, "DEFAULT_SCHEDULE", "constant"), "tol": getattr(syn, "DEFAULT_TOL", 0.0),
            "init": getattr(syn, "DEFAULT_INIT", "noise"),
            "batch_size": 128, **extra}


def synthetic_rows(settings: list[str], targets: list[float], path: Path, fresh: bool,
                   model_name: str = "resnet20", repeats: int = 1) -> None:
    """Synthetic calibration on one model: one row per (setting, target, repeat), saved after each."""
    rows: list[dict] = json.loads(path.read_text())["rows"] if path.exists() else []
    if fresh:  # measure these settings again; every other row stays
        again = {(model_name, *parse_setting(st)[:3], json.dumps(parse_setting(st)[3], sort_keys=True))
                 for st in settings}
        rows = [r for r in rows if (r.get("model", "resnet20"), r["count"], r["steps"], r["lr"],
                                    json.dumps(r.get("options", {}), sort_keys=True)) not in again]
    x, y = load_cifar10_test(split="eval")
    base = load_model(model_name)
    ref = logits(base, x)
    for setting, run in [(s, i) for i in range(repeats) for s in settings]:
        count, steps, lr, extra = parse_setting(setting)
        key = (model_name, count, steps, lr, extra, run)
        todo = [t for t in targets if not any(
            (r.get("model", "resnet20"), r["count"], r["steps"], r["lr"], r.get("options", {}), r.get("run", 0),
             r["target"]) == (*key, t) for r in rows)]
        if not todo:
            continue
        load = load_average()
        data = fxsurgeon.synthesize(base, (3, 32, 32), count=count, steps=steps, lr=lr, **extra)
        for target in todo:
            clear_cache()  # every conversion from a cold decomposition cache, as a user's first call
            load_c = load_average()
            t = time.perf_counter()
            model = fxsurgeon.convert(base, separable=dict(target_macs=target), conv_head=False,
                                      example_inputs=x[:1], calibration=data)
            seconds = time.perf_counter() - t
            rec = fxsurgeon.get_record(model)
            row = {"model": model_name, "count": count, "steps": steps, "lr": lr, "options": extra,
                   "effective": effective_options(extra), "steps_run": data.steps_run, "run": run,
                   "target": target,
                   "synth_s": round(data.seconds, 1), "convert_s": round(seconds, 1),
                   "separable_s": round(rec.seconds.get("separable", float("nan")), 1),
                   "calibrate_s": round(rec.seconds.get("calibrate", float("nan")), 1),
                   "total_s": round(data.seconds + seconds, 1),
                   "load_average": load, "load_average_convert": load_c, "threads": torch.get_num_threads(),
                   "loss_start": data.loss_start, "loss_end": data.loss_end, **compare(ref, logits(model, x), y)}
            rows.append(row)
            path.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
            print(f"{model_name} synthetic {extra} {count:4d} images {steps:4d} steps lr {lr}  target {target:.2f}  "
                  f"logit err {row['logit_error']:.4f}  agree {row['agreement']:5.1f} %  acc {row['accuracy']:6.2f} %  "
                  f"synth {data.seconds:.0f} s  convert {seconds:.0f} s (load {load})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(CHECKPOINTS), choices=list(CHECKPOINTS))
    ap.add_argument("--targets", type=float, nargs="+", default=[0.60, 0.45])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME")
    ap.add_argument("--json", default="benchmarks/results/defaults_two_models.json")
    ap.add_argument("--fresh", action="store_true",
                    help="measure again: --json starts over; with --synthetic, only the settings named are redone")
    ap.add_argument("--synthetic", nargs="+", metavar="COUNT:STEPS[:LR]",
                    help="measure synthetic calibration on the ResNet-20 for these settings instead")
    ap.add_argument("--synthetic-json", default="benchmarks/results/synthetic_speed.json")
    ap.add_argument("--repeats", type=int, default=1, help="--synthetic: measure every setting this many times")
    ap.add_argument("--synthetic-model", default="resnet20", choices=list(CHECKPOINTS),
                    help="the model --synthetic measures")
    args = ap.parse_args()
    if args.synthetic:
        synthetic_rows(args.synthetic, args.targets, Path(args.synthetic_json), args.fresh, args.synthetic_model,
                       args.repeats)
        return

    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = [] if args.fresh or not path.exists() else json.loads(path.read_text())["rows"]
    x, y = load_cifar10_test(split="eval")
    probe = x[:1]

    def save() -> None:
        path.write_text(json.dumps({
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "evaluated_on": "x[1::2] (5,000 images)", "rows": rows, "summary": summarise(rows)}, indent=1))

    for model_name in args.models:
        base = load_model(model_name)
        ref = logits(base, x)
        if not any(r["config"] == "original" and r["model"] == model_name for r in rows):
            rows.append({"config": "original", "model": model_name, "target": None, "options": {},
                         **compare(ref, ref, y), "convert_s": 0.0})
        clear_cache()
        for config in args.configs:
            for target in args.targets:
                if any((r["config"], r["model"], r["target"]) == (config, model_name, target) for r in rows):
                    continue
                opts = dict(CONFIGS[config], target_macs=target)
                load = load_average()
                t = time.perf_counter()
                model = fxsurgeon.convert(base, separable=opts, conv_head=False, example_inputs=probe)
                seconds = time.perf_counter() - t
                rec = fxsurgeon.get_record(model)
                alloc = rec.extras.get("allocation", {})
                forms: dict[str, int] = {}
                for r in rec.rewrites:
                    forms[r.details.get("form")] = forms.get(r.details.get("form"), 0) + 1
                row = {"config": config, "model": model_name, "target": target, "options": opts,
                       **compare(ref, logits(model, x), y), "convert_s": round(seconds, 1),
                       "load_average": load, "macs_fraction": alloc.get("macs_fraction"),
                       "forms": forms, "kept": sum(1 for s in rec.skipped if "budget allocation" in s.reason),
                       "choices": rec.extras.get("defaults", {})}
                rows.append(row)
                save()
                print(f"{model_name:9s} {config:24s} {target:.2f}  logit err {row['logit_error']:.4f}  "
                      f"agree {row['agreement']:5.1f} %  acc {row['accuracy']:6.2f} %  ({seconds:.0f} s, "
                      f"load {load})", flush=True)
    save()
    print()
    print(table(rows))
    print()
    for s in summarise(rows):
        print(f"{s['config']:24s} mean logit error {s['mean_logit_error']:.4f}  agreement {s['mean_agreement']:.1f} %  "
              f"accuracy {s['mean_accuracy']:.2f} %  ({s['cells']} cells{'' if s['complete'] else ', incomplete'})")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
