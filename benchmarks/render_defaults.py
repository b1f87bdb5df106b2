"""Render docs/benchmarks/defaults.md from the JSON the benchmarks saved, so no number is typed by hand.

Run: .venv/bin/python benchmarks/render_defaults.py [--out docs/benchmarks/defaults.md]

Reads benchmarks/results/defaults_two_models.json (data-free configs on ResNet-20 and ResNet-32),
peer_factorizations_resnet20_logits.json / peer_factorizations_resnet32.json (TensorLy-Torch's seeds, with
logit errors) and synthetic_speed.json (synthetic calibration: images, steps, seconds, errors), whichever
exist, and writes one Markdown page.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} %"


def defaults_section(data: dict) -> list[str]:
    rows = data["rows"]
    models = [m for m in ("resnet20", "resnet32") if any(r["model"] == m for r in rows)]
    targets = sorted({r["target"] for r in rows if r["target"] is not None}, reverse=True)
    out = ["## Data-free configs on both models", "",
           "Each config converts the model from its weights alone (no data, no synthetic images), every 3×3 conv but "
           "the stem, at a whole-model MAC target (`separable=dict(target_macs=t, ...)`), and is compared with the "
           "original on the 5,000 images of `x[1::2]`: logit error (relative L2 of all logits), top-1 agreement with "
           "the original, accuracy. `separable=dict(target_macs=t)` with nothing else set is the `defaults` row "
           "(`fxsurgeon.budget.allocation.BUDGET_DEFAULTS`, the same options as `auto, bias corr.`; see "
           "[the defaults page](../accuracy-defaults.md)). A dash: not measured.", ""]
    for m in models:
        orig = next((r for r in rows if r["model"] == m and r["config"] == "original"), None)
        out.append(f"### {m}" + (f" (original: {orig['accuracy']:.2f} %)" if orig else ""))
        out.append("")
        out.append("| config | options | " + " | ".join(
            f"{t:.2f}× logit error | agreement | accuracy" for t in targets) + " |")
        out.append("|---|---|" + "---|---|---|" * len(targets))
        configs = []
        for r in rows:
            if r["model"] == m and r["config"] != "original" and r["config"] not in configs:
                configs.append(r["config"])
        for c in configs:
            cells = []
            opts = ""
            for t in targets:
                r = next((r for r in rows if (r["model"], r["config"], r["target"]) == (m, c, t)), None)
                if r is None:
                    cells += ["—"] * 3
                    continue
                opts = ", ".join(f"{k}={v!r}" for k, v in r["options"].items() if k != "target_macs") or "—"
                cells += [f"{r['logit_error']:.3f}", f"{r['agreement']:.1f} %", _pct(r["accuracy"])]
            out.append(f"| {c} | `{opts}` | " + " | ".join(cells) + " |")
        out.append("")
    out += ["### Mean over every measured (model, target)", "",
            "| config | mean logit error | mean agreement | mean accuracy | cells |", "|---|---|---|---|---|"]
    for s in data["summary"]:
        out.append(f"| {s['config']} | {s['mean_logit_error']:.4f} | {s['mean_agreement']:.2f} % | "
                   f"{s['mean_accuracy']:.2f} % | {s['cells']}{'' if s['complete'] else ' (incomplete)'} |")
    out.append("")
    return out


def peer_section(name: str, data: dict) -> list[str]:
    out = [f"### TensorLy-Torch on {name}", "",
           "`FactorizedConv.from_conv(conv, rank=ρ, factorization=\"cp\", implementation=...)` on every 3×3 conv "
           "but the stem, ρ the largest uniform ratio meeting the MAC target (fvcore MACs plus the peer's CP-weight "
           "multiply), seeds 0–2 (`benchmarks/peer_factorizations.py --model ... --no-fxsurgeon --no-latency`).", "",
           "| method | target | MACs | logit error | agreement | accuracy |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        le = r.get("logit_error")
        ag = r.get("agreement")
        out.append(f"| {r['method']} | {r['target'] if r['target'] is not None else '—'} | {r['mac_ratio']:.3f}× | "
                   f"{'—' if le is None else f'{le:.3f}'} | {'—' if ag is None else f'{ag:.1f} %'} | "
                   f"{_pct(r['accuracy'])} |")
    out.append("")
    return out


def synthetic_section(data: dict) -> list[str]:
    out = ["## Synthetic calibration: images, steps and time", "",
           "`fxsurgeon.synthesize` (images matched to the BatchNorm statistics), then `convert(..., calibration=data)` "
           "with the default separable options at each target. `start` is the images' seeded start (`smooth`: "
           "noise drawn at half resolution and upsampled, the default; `noise`: plain N(0, 1)). Seconds are wall "
           "time on the shared 2-core machine at the threads shown, with the load average when the row started: "
           "rows at 1 thread or a load above 2 ran beside other work and only their errors compare.", "",
           "| model | images | steps | lr | start | threads | target | synthesis (s) | conversion + calibration (s) "
           "| load | logit error | agreement | accuracy |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        start = (r.get("effective") or {}).get("init", "noise")
        out.append(f"| {r.get('model', 'resnet20')} | {r['count']} | {r['steps']} | {r['lr']} | {start} | "
                   f"{r.get('threads', '?')} | {r['target']:.2f} | "
                   f"{r['synth_s']:.0f} | {r['convert_s']:.0f} | {r.get('load_average') or float('nan'):.1f} | "
                   f"{r['logit_error']:.3f} | {r['agreement']:.1f} % | {_pct(r['accuracy'])} |")
    out.append("")
    return out


def render() -> str:
    out = ["# Benchmark: data-free defaults on two trained models", "",
           "Generated by `benchmarks/render_defaults.py` from the JSON under `benchmarks/results/`; the numbers "
           "come from `benchmarks/defaults_two_models.py` and `benchmarks/peer_factorizations.py`. Accuracy is on "
           "`x[1::2]` of the shared CIFAR-10 test set (5,000 JPEG images); with 4–10 % of images disagreeing, two "
           "models differ by about ±0.3 points by chance, so the logit error decides.", ""]
    data = _load("defaults_two_models.json")
    if data:
        out += defaults_section(data)
    peers = [("ResNet-20", _load("peer_factorizations_resnet20_logits.json")),
             ("ResNet-32", _load("peer_factorizations_resnet32.json"))]
    if any(d for _, d in peers):
        out += ["## The peer", ""]
        for name, d in peers:
            if d:
                out += peer_section(name, d)
    syn = _load("synthetic_speed.json")
    if syn:
        out += synthetic_section(syn)
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs/benchmarks/defaults.md"))
    args = ap.parse_args()
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
