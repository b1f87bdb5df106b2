"""fxsurgeon's separable forms vs TensorLy-Torch's CP factorisation at equal MACs, on a trained CIFAR ResNet.

Run: .venv/bin/python benchmarks/peer_factorizations.py [--model resnet20|resnet32] [--targets 0.60 0.45] [--seeds 0 1 2]
                                                        [--no-peer] [--no-calibration] [--no-synthetic] [--json PATH]
                                                        [--only TEXT ...] [--merge JSON] [--latency-from JSON]

``--model`` picks the shared trained ResNet-20 (default) or ResNet-32 (original 82.84 %; its JSON goes to
``peer_factorizations_resnet32.json`` unless ``--json`` says otherwise). Every 3×3 conv but the stem is
rewritten (18 layers in the ResNet-20, 30 in the ResNet-32), at the same whole-model MAC ratio for every method:

* TensorLy-Torch ``FactorizedConv.from_conv(conv, rank=ρ, factorization="cp", implementation=...)``, for
  ``"mobilenet"`` (1×1 → depthwise k×k → CP-weight multiply → 1×1) and ``"factorized"`` (1×1 → k×1 → 1×k →
  multiply → 1×1), with one rank ratio ρ for every layer as ``rank=float`` does, the largest ρ whose model
  meets the target; seeds 0–2 (its ALS start draws random columns when R exceeds a mode's size).
* fxsurgeon ``dw-pw``, ``pw-dw-pw`` and ``auto``: ranks from the budget allocation (``target_macs=``), and
  ``pw-dw-pw`` with one uniform cost ratio per layer (ranks chosen here, like the peer's ρ), data-free;
  then ``auto`` with ``calibration=`` on x[0::2] (the blocks refit, block targets at residual sums), and
  with ``calibration="synthetic"``: no data, images made to match the BatchNorm statistics.

MACs are fvcore's (one multiply-add = one "flop"), plus every elementwise ``aten::mul`` output element (the
peer's CP-weight multiply; fxsurgeon folds those weights, so it has none). Accuracy is on x[1::2] (5,000
JPEG test images, original 81.06 %); calibration sees x[0::2] only. Conversion time is wall time of the
whole conversion, each from a cold decomposition cache; CPU latency is the median of ``fxsurgeon.benchmark``
at batch 1 and 64 on one thread (a shared machine makes timings noisy: compare within one run). The JSON
has every row, with each fxsurgeon layer's form, rank, MACs and weight error.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fxsurgeon
from fxsurgeon.forms import get_form
from fxsurgeon.forms.cp import clear_cache
from fxsurgeon.models import default_data_dir, load_cifar10_test, load_resnet20, resnet32

warnings.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------------- measuring


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """fvcore MACs plus one per element of every elementwise multiply (the peer's CP-weight scaling)."""
    from fvcore.nn import FlopCountAnalysis

    def mul(inputs, outputs):
        out = outputs[0].type()
        return math.prod(out.sizes()) if out.sizes() else 0

    fa = FlopCountAnalysis(model.eval(), x).set_op_handle("aten::mul", mul).set_op_handle("aten::mul_", mul)
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    return int(fa.total())


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)]).double()


def latency_ms(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    # one intra-op thread: on a shared machine, thread hand-offs make multi-threaded timings swing by 2-5x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = fxsurgeon.benchmark(model, x[:1], device="cpu", batch_sizes=[1, 64], warmup=5, iters=30)
    finally:
        torch.set_num_threads(threads)
    return {f"b{b}": res.row(b).latency_ms_median for b in (1, 64)}


def spatial_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 3 and m.groups == 1]


def positions(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    seen: dict[str, tuple[int, int]] = {}

    def hook(name: str):
        def record(mod, args, out) -> None:
            seen.setdefault(name, (args[0].shape[2] * args[0].shape[3], out.shape[2] * out.shape[3]))
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in spatial_convs(model)]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return seen


def load_model(name: str) -> nn.Module:
    """The shared trained ResNet-20 or ResNet-32 (``module.`` prefix stripped, strict load), in eval mode."""
    if name == "resnet20":
        return load_resnet20()
    ckpt = torch.load(default_data_dir() / "resnet32-d509ac18.th", map_location="cpu", weights_only=True)
    model = resnet32()
    model.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}, strict=True)
    return model.eval()


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


# ------------------------------------------------------------------------------------------------ the peer


def peer_model(base: nn.Module, ratio: float, implementation: str, decompose: bool) -> nn.Module:
    from tltorch import FactorizedConv

    model = copy.deepcopy(base)
    for name, conv in spatial_convs(model):
        _set(model, name, FactorizedConv.from_conv(conv, rank=ratio, factorization="cp",
                                                   implementation=implementation, decompose_weights=decompose))
    return model.eval()


def peer_ratio(base: nn.Module, x: torch.Tensor, target: float, implementation: str, total: int) -> float:
    """The largest uniform rank ratio ρ whose model stays within ``target`` of the original's MACs."""
    lo, hi = 0.01, 1.5
    for _ in range(18):
        mid = (lo + hi) / 2
        if macs(peer_model(base, mid, implementation, decompose=False), x) <= target * total:
            lo = mid
        else:
            hi = mid
    return lo


def seeded(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------- fxsurgeon


def uniform_cp_layers(base: nn.Module, x: torch.Tensor, target: float, total: int) -> dict[str, dict]:
    """pw-dw-pw at one cost ratio c per layer (rank = ⌊c · layer MACs / MACs per rank⌋), c as large as fits."""
    form = get_form("pw-dw-pw")
    pos = positions(base, x)
    convs = spatial_convs(base)

    def plan(c: float) -> dict[str, dict]:
        out = {}
        for name, conv in convs:
            p_in, p_out = pos[name]
            per_rank = form.cost(conv, 1).macs(p_in, p_out)
            orig = conv.weight[0].numel() * conv.out_channels * p_out
            out[name] = {"form": "pw-dw-pw", "rank": max(1, int(c * orig / per_rank))}
        return out

    def model_macs(c: float) -> int:
        rest = total - sum(conv.weight.numel() * pos[n][1] for n, conv in convs)
        return rest + sum(form.cost(conv, plan(c)[n]["rank"]).macs(*pos[n]) for n, conv in convs)

    lo, hi = 0.01, 1.5
    for _ in range(30):
        mid = (lo + hi) / 2
        if model_macs(mid) <= target * total:
            lo = mid
        else:
            hi = mid
    return plan(lo)


# ---------------------------------------------------------------------------------------------------- main


def architecture(base: nn.Module, row: dict) -> nn.Module:
    """The model a row measured, rebuilt with random weights: latency depends on the shapes only."""
    if row["method"] == "original":
        return base
    if row["method"].startswith("TensorLy-Torch CP"):
        return peer_model(base, row["rank_ratio"], row["method"].split()[2].rstrip(","), decompose=False)
    layers = {n: {"form": v["form"], "rank": v["rank"]} for n, v in row["layers"].items()}
    others = [n for n, _ in spatial_convs(base) if n not in layers]
    return fxsurgeon.convert(base, separable=dict(layers=layers, exclude=others, init="random",
                                                  include_unprofitable=True), conv_head=False)


def retime(base: nn.Module, path: Path) -> None:
    """Time every row of ``path`` again, one after the other in one process (see ``--latency-from``)."""
    data = json.loads(path.read_text())
    x = load_cifar10_test(split="eval")[0][:64]
    for row in data["rows"]:
        row["cpu_latency_ms"] = latency_ms(architecture(base, row), x)
        lat = row["cpu_latency_ms"]
        print(f"{row['method']:58s} {row['target']!s:>5} b1 {lat['b1']:.2f} ms  b64 {lat['b64']:.1f} ms", flush=True)
    data["latency_note"] = "retimed in one run (--latency-from)"
    path.write_text(json.dumps(data, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["resnet20", "resnet32"], default="resnet20")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.60, 0.45])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-fxsurgeon", action="store_true", help="only the peer's rows (with --merge: add them)")
    ap.add_argument("--no-calibration", action="store_true")
    ap.add_argument("--no-synthetic", action="store_true", help="leave out the synthetic-calibration rows")
    ap.add_argument("--only", nargs="+", metavar="TEXT",
                    help="run only the fxsurgeon rows whose method contains one of these (with --merge: re-measure "
                         "them, e.g. --only calibration)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--json", help="default: benchmarks/results/peer_factorizations.json for the ResNet-20, "
                                   "peer_factorizations_resnet32.json for the ResNet-32")
    ap.add_argument("--latency-from", metavar="JSON",
                    help="only time again every row of an earlier run's JSON (on a quiet machine): each model's "
                         "architecture is rebuilt from the row (ranks per layer, or the peer's ratio) without "
                         "decomposing, and its cpu_latency_ms replaced; the file is rewritten")
    ap.add_argument("--merge", help="an earlier run's JSON: its rows come first, and rows this run measures again "
                                    "(same method and target) replace them (e.g. calibrated rows without latency)")
    args = ap.parse_args()

    if args.json is None:
        suffix = "" if args.model == "resnet20" else f"_{args.model}"
        args.json = f"benchmarks/results/peer_factorizations{suffix}.json"
    base = load_model(args.model)
    if args.latency_from:
        retime(base, Path(args.latency_from))
        return
    x_eval, y_eval = load_cifar10_test(split="eval")
    x_cal, _ = load_cifar10_test(split="calib")
    probe = x_eval[:1]
    total = macs(base, probe)
    rows: list[dict] = []
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)

    earlier = json.loads(Path(args.merge).read_text())["rows"] if args.merge else []

    def save() -> None:
        fresh = {(r["method"], r["target"]) for r in rows}
        merged = [r for r in earlier if (r["method"], r["target"]) not in fresh] + rows
        order = {t: i for i, t in enumerate([None, *args.targets])}
        merged.sort(key=lambda r: order.get(r["target"], len(order)))  # stable: each target's rows together
        path.write_text(json.dumps({"model": args.model, "torch": torch.__version__,
                                    "threads": torch.get_num_threads(),
                                    "original_macs": total, "rows": merged}, indent=1))
        return merged

    ref = logits(base, x_eval)

    def record(method: str, target: float | None, model: nn.Module, seconds: float, **extra) -> None:
        out = logits(model, x_eval)
        row = {"method": method, "target": target, "mac_ratio": macs(model, probe) / total,
               "accuracy": 100.0 * float((out.argmax(1) == y_eval).double().mean()),
               "logit_error": float((out - ref).norm() / ref.norm()),
               "agreement": 100.0 * float((out.argmax(1) == ref.argmax(1)).double().mean()),
               "convert_s": seconds, **extra}
        if not args.no_latency:
            row["cpu_latency_ms"] = latency_ms(model, x_eval)
        rows.append(row)
        save()  # after every row: a long run that dies keeps what it measured
        lat = row.get("cpu_latency_ms", {})
        print(f"{method:58s} target {target if target is not None else '-':>5} MACs {row['mac_ratio']:.4f} "
              f"acc {row['accuracy']:6.2f} %  convert {seconds:6.1f} s  "
              f"latency b1 {lat.get('b1', float('nan')):.2f} ms b64 {lat.get('b64', float('nan')):.1f} ms",
              flush=True)

    record("original", None, base, 0.0)
    for target in args.targets:
        fx_runs = [] if args.no_fxsurgeon else [
            ("fxsurgeon dw-pw, target_macs", dict(form="dw-pw", target_macs=target), None),
            ("fxsurgeon pw-dw-pw, uniform cost ratio", dict(form="pw-dw-pw", layers=uniform_cp_layers(
                base, probe, target, total)), None),
            ("fxsurgeon pw-dw-pw, target_macs", dict(form="pw-dw-pw", target_macs=target), None),
            ("fxsurgeon auto, target_macs", dict(form="auto", target_macs=target), None),
            ("fxsurgeon auto, target_macs, weighting=bn", dict(form="auto", target_macs=target, weighting="bn"),
             None),
        ]
        if not args.no_calibration and not args.no_fxsurgeon:
            fx_runs += [
                # ranks chosen on the layers' output errors measured on x[0::2] (allocation="data", the
                # default with calibration data), then the layers refit
                ("fxsurgeon dw-pw, target_macs + calibration", dict(form="dw-pw", target_macs=target), x_cal),
                ("fxsurgeon auto, target_macs + calibration", dict(form="auto", target_macs=target), x_cal),
                ("fxsurgeon auto, target_macs + calibration (ranks on weight error)",
                 dict(form="auto", target_macs=target, allocation="weight"), x_cal),
                ("fxsurgeon auto, target_macs + calibration (ranks sensitivity-weighted)",
                 dict(form="auto", target_macs=target, allocation="sensitivity"), x_cal),
            ]
        if not args.no_fxsurgeon and not args.no_synthetic:
            # no data: calibration on images made to match the BatchNorm statistics (calibration="synthetic"),
            # their making included in the conversion time
            fx_runs.append(("fxsurgeon auto, target_macs + synthetic calibration (no data)",
                            dict(form="auto", target_macs=target), "synthetic"))
        if args.only:
            fx_runs = [r for r in fx_runs if any(t in r[0] for t in args.only)]
        for method, opts, cal in fx_runs:
            clear_cache()  # time every conversion from scratch (rows share layers and decompositions)
            t = time.perf_counter()
            kw = {"calibration": cal} if cal is not None else {}
            model = fxsurgeon.convert(base, separable=opts, conv_head=False, example_inputs=probe, **kw)
            seconds = time.perf_counter() - t
            rec = fxsurgeon.get_record(model)
            layers = {r.target: {"form": r.details.get("form"), "rank": r.details.get("rank"),
                                 "relative_error": r.details.get("relative_error"),
                                 "macs_after": r.details.get("macs_after")}
                      for r in rec.rewrites if r.pass_name == "separable"}
            extra = {"layers": layers, "pass_seconds": dict(rec.seconds)}
            if method == "fxsurgeon auto, target_macs":  # the defaults: converted twice, compared bit for bit
                clear_cache()
                again = fxsurgeon.convert(base, separable=opts, conv_head=False, example_inputs=probe)
                a, b = model.state_dict(), again.state_dict()
                extra["bit_identical_rerun"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            record(method, target, model, seconds, **extra)
        if args.no_peer:
            continue
        for impl in ("mobilenet", "factorized"):
            ratio = peer_ratio(base, probe, target, impl, total)
            for seed in args.seeds:
                seeded(seed)
                t = time.perf_counter()
                model = peer_model(base, ratio, impl, decompose=True)
                seconds = time.perf_counter() - t
                record(f"TensorLy-Torch CP {impl}, seed {seed}", target, model, seconds, rank_ratio=ratio)

    merged = save()
    print(f"\nwrote {path}")
    print("\n| method | target | MACs (fvcore + mul) | accuracy x[1::2] | convert (s) | CPU latency b1 / b64 (ms) |")
    print("|---|---|---|---|---|---|")
    for r in merged:
        lat = r.get("cpu_latency_ms", {})
        print(f"| {r['method']} | {r['target'] if r['target'] is not None else '—'} | {r['mac_ratio']:.3f}× | "
              f"{r['accuracy']:.2f} % | {r['convert_s']:.1f} | {lat.get('b1', float('nan')):.2f} / "
              f"{lat.get('b64', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
