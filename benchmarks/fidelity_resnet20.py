"""Keeping a trained model's accuracy at a MAC budget: the CIFAR-10 ResNet-20 of shared/data.

Run (from the repository root; about 15 minutes on 2 CPU cores, most of it calibration and distillation):

    .venv/bin/python benchmarks/fidelity_resnet20.py

Every 3×3 conv but the stem is rewritten. Calibration and distillation use ``x[0::2]`` of the CIFAR-10 test
JPEGs only; every accuracy is on ``x[1::2]`` (5,000 images). MACs are fvcore's count on the whole model for
one 32×32 image (one multiply-add = one MAC), as a fraction of the original's. Rows:

* ``uniform m``: one channel multiplier everywhere, data-free SVD (and the same ``+ calibration``);
* ``budget``: ``separable=dict(target_macs=b)`` with the budget defaults (``form="auto"``: every registered form
  competes per layer, bias correction from the BatchNorm statistics; :data:`fxsurgeon.budget.allocation.BUDGET_DEFAULTS`),
  per-layer ranks chosen by :mod:`fxsurgeon.budget.allocation` on the data-free weight error; and the same with
  ``form="dw-pw"``, the depthwise → pointwise form alone;
* ``budget + calibration``: the same options and ``convert(..., calibration=...)``: ranks chosen on the layers'
  output errors measured on the calibration images (``allocation="auto"`` becomes ``"data"``), then the layers
  refit in network order (:func:`fxsurgeon.calibrate`);
* ``+ distillation``: ``recipes/distill.py`` on top of the ``auto`` model, at most ``--distill-minutes`` of
  fine-tuning.

Wall time is per step (conversion incl. allocation, calibration, distillation) and is real elapsed time on
this machine, *shared with other jobs*: the load average during each step is printed beside it. Results go
to ``benchmarks/results/fidelity_resnet20.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

import fxsurgeon
from fxsurgeon.budget.plan import model_macs
from fxsurgeon.forms import FORMS
from fxsurgeon.models import load_cifar10_test, load_resnet20

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _load_recipe():
    spec = importlib.util.spec_from_file_location("fxsurgeon_distill_recipe", HERE.parent / "recipes" / "distill.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class Step:
    """Wall time and load average of one step."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.load = os.getloadavg()[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="0.6,0.45", help="MAC budgets (fractions of the original)")
    p.add_argument("--uniform", default="2,3,4,5,6", help="uniform multipliers for the data-free curve")
    p.add_argument("--uniform-calibrated", default="3,4", help="uniform multipliers also shown calibrated")
    p.add_argument("--calibration-images", type=int, default=2500, help="images of x[0::2] for calibration")
    p.add_argument("--distill-epochs", type=float, default=4.0)
    p.add_argument("--distill-minutes", type=float, default=9.5, help="cap on each distillation step")
    p.add_argument("--distill-budgets", default="0.6,0.45", help="budgets that also get distillation")
    p.add_argument("--no-cp", action="store_true", help="skip the CP-form rows even when the form exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "fidelity_resnet20"), help="output path prefix")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in OUT.json (written after every row) and measure only the others")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    recipe = _load_recipe()

    model = load_resnet20()
    x_cal, _ = load_cifar10_test(split="calib")
    x_ev, y_ev = load_cifar10_test(split="eval")
    gen = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(x_cal), generator=gen)[: args.calibration_images]
    calib = [x_cal[pick[i:i + 250]] for i in range(0, len(pick), 250)]
    one = x_cal[:1]
    base_macs = model_macs(model, (one,))[0]
    print(f"# ResNet-20 fidelity (load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"original: {base_macs / 1e6:.2f} M MACs per image (fvcore), calibration: {len(pick)} images of x[0::2]")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if args.resume and out.with_suffix(".json").exists():
        rows = json.loads(out.with_suffix(".json").read_text())["rows"]
        print(f"resuming: {len(rows)} rows measured already")

    def have(method, budget=None, form="dw-pw") -> bool:
        return any((r["method"], r["budget"], r["form"]) == (method, budget, form) for r in rows)

    def add(method, m, *, budget=None, form="dw-pw", steps=None, note=""):
        macs = model_macs(m, (one,))[0]
        acc = recipe.evaluate(m, x_ev, y_ev)
        row = {"method": method, "budget": budget, "form": form, "macs": macs, "macs_fraction": macs / base_macs,
               "params": sum(q.numel() for q in m.parameters()), "accuracy": acc, "steps": steps or {},
               "note": note}
        rows[:] = [r for r in rows if (r["method"], r["budget"], r["form"]) != (method, budget, form)] + [row]
        out.with_suffix(".json").write_text(json.dumps({"base_macs": base_macs, "rows": rows}, indent=1))
        times = ", ".join(f"{k} {v['seconds']:.0f} s (load {v['load']:.1f})" for k, v in row["steps"].items())
        print(f"{method:<34} {form:<9} MACs {row['macs_fraction']:.3f}  acc {acc:6.2f} %  {times} {note}",
              flush=True)
        return row

    if not have("original", form="-"):
        add("original", model, form="-")
    for mult in [int(v) for v in args.uniform.split(",") if v]:
        if have(f"uniform m={mult}"):
            continue
        with Step() as st:
            m = fxsurgeon.convert(model, separable=dict(multiplier=mult))
        add(f"uniform m={mult}", m, steps={"convert": vars(st)})
    for mult in [int(v) for v in args.uniform_calibrated.split(",") if v]:
        if have(f"uniform m={mult} + calibration"):
            continue
        with Step() as st:
            m = fxsurgeon.convert(model, separable=dict(multiplier=mult), calibration=calib)
        cal = fxsurgeon.get_record(m).seconds.get("calibrate", 0.0)
        add(f"uniform m={mult} + calibration", m,
            steps={"convert": {"seconds": st.seconds - cal, "load": st.load},
                   "calibrate": {"seconds": cal, "load": st.load}})

    # dw-pw: the MobileNet form alone; auto: the budget defaults, every registered form competing per layer
    forms = {"dw-pw": {"form": "dw-pw"}}
    if not args.no_cp and "pw-dw-pw" in FORMS:
        forms["auto"] = {}
    distill_form = "auto" if "auto" in forms else "dw-pw"
    distill_budgets = {float(v) for v in args.distill_budgets.split(",") if v}
    for budget in [float(v) for v in args.budgets.split(",") if v]:
        for form, extra in forms.items():
            opts = dict(target_macs=budget, **extra)
            label = form
            if not have("budget (weight error)", budget, label):
                with Step() as st:
                    m = fxsurgeon.convert(model, example_inputs=one, separable=opts)
                add("budget (weight error)", m, budget=budget, form=label, steps={"convert": vars(st)})
            distill_here = form == distill_form and budget in distill_budgets
            if have("budget + calibration", budget, label) and (
                    not distill_here or have("budget + calibration + distillation", budget, label)):
                continue
            with Step() as st:  # ranks chosen on measured output errors (allocation="data"), then refit
                m = fxsurgeon.convert(model, example_inputs=one, calibration=calib, separable=opts)
            rec = fxsurgeon.get_record(m)
            cal = rec.seconds.get("calibrate", 0.0)
            steps = {"convert": {"seconds": st.seconds - cal, "load": st.load},
                     "calibrate": {"seconds": cal, "load": st.load}}
            if not have("budget + calibration", budget, label):
                add("budget + calibration", m, budget=budget, form=label, steps=steps)
            if distill_here:
                with Step() as sd:
                    stats = recipe.distill(m, model, x_cal, epochs=args.distill_epochs, seed=args.seed,
                                           time_limit=args.distill_minutes * 60, progress=False)
                add("budget + calibration + distillation", m, budget=budget, form=label,
                    steps={**steps, "distill": vars(sd)},
                    note=f"({int(stats['steps'])} steps, {stats['steps'] * 128 / len(x_cal):.1f} epochs)")

    out.with_suffix(".json").write_text(json.dumps({"base_macs": base_macs, "rows": rows}, indent=1))
    table = markdown(rows)
    out.with_suffix(".md").write_text(table + "\n")
    print()
    print(table)
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


def markdown(rows: list[dict]) -> str:
    lines = ["| method | form | MAC budget | MACs vs original | accuracy on x[1::2] | wall time per step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        times = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in r["steps"].items()) or "-"
        budget = f"{r['budget']:.2f}" if r["budget"] else "-"
        lines.append(f"| {r['method']} {r['note']}".rstrip() + f" | {r['form']} | {budget} | "
                     f"{r['macs_fraction']:.2f} | {r['accuracy']:.2f} % | {times} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = r["method"].split(" m=")[0] + (" + calibration" if "m=" in r["method"] and "calibration" in r["method"] else "")
        key = key if r["form"] in ("dw-pw", "-") else f"{key} [{r['form']}]"
        groups.setdefault(key, []).append(r)
    markers = iter("o^sDvP*X<>")
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["macs_fraction"])
        ax.plot([r["macs_fraction"] for r in rs], [r["accuracy"] for r in rs], marker=next(markers, "o"),
                linestyle="-" if len(rs) > 1 else "none", label=key)
    ax.set_xlabel("MACs vs original (fvcore, whole model)")
    ax.set_ylabel("accuracy on x[1::2] (%)")
    ax.set_title("CIFAR-10 ResNet-20: accuracy vs MACs")
    lo = min(r["accuracy"] for r in rows)
    ax.set_ylim(max(lo - 2, 0), max(r["accuracy"] for r in rows) + 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
