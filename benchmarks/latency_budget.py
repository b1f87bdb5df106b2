"""Latency budgets end to end: asked ratio vs measured ratio, MACs, accuracy and conversion time.

Run (from the repository root; each row converts once and times the models for a while — minutes per row
on a CPU):

    .venv/bin/python benchmarks/latency_budget.py --models resnet18,resnet20 --threads 1 --batch-sizes 1
    .venv/bin/python benchmarks/latency_budget.py --device cuda --dtype bf16 --batch-sizes 1,64 \\
        --runtimes eager,compiled --models resnet50 --targets 0.7     # on a GPU
    .venv/bin/python benchmarks/latency_budget.py --dry-run ...        # print the plan, run nothing

Models: timm ``resnet18``, ``resnet50``, ``densenet121``, ``regnetx_016`` (224×224, ``pretrained=False``:
latency does not depend on the weights) and the trained CIFAR-10 ``resnet20`` of shared/data (32×32), which
is also calibrated (``x[0::2]``, ``--calibration-images`` of them) and scored on ``x[1::2]`` (5,000 images).

Each row is one conversion, ``separable=dict(target_latency=t, form=--form, latency_aware=dict(device,
dtype, batch_size, channels_last=True, compile))`` at the row's threads and batch size (with
``--budget-runtime onnxruntime``: ``runtime="onnxruntime"``, the budget timed in onnxruntime), then the converted
model is timed against the original, **interleaved** (``--rounds`` rounds alternating the two, each the
median of ``--iters`` calls, more when they last less than ``--min-seconds``; the ratio is the median of the rounds' ratios, with the smallest and largest)
in every runtime asked: ``eager`` (channels_last), ``compiled`` (``torch.compile``) and ``onnxruntime`` (CPU,
both models exported to ONNX, the row's threads). MACs are fvcore's count for one sample (one multiply-add
= one MAC) as a fraction of the original's. Conversion time is wall time, with the latency cache cold or
warm as it was (its hits and measurements are in the row); the machine's load average is recorded beside it,
since the CPU this ran on is shared.

Rows are merged into ``--out`` (JSON; default ``benchmarks/results/latency_budget.json``) after each one, so
an interrupted run keeps what it measured; ``--deadline`` (a Unix time) skips rows whose estimated time would
pass it. ``--render`` regenerates the results table in ``docs/latency.md`` from the JSON (between the
``latency_budget`` markers) without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "latency_budget.json"
DOCS = HERE.parent / "docs" / "latency.md"
MODELS = ("resnet18", "resnet50", "densenet121", "regnetx_016", "resnet20")
RUNTIMES = ("eager", "compiled", "onnxruntime")
BEGIN, END = "<!-- latency_budget:begin -->", "<!-- latency_budget:end -->"


def csv(kind):
    def parse(text: str):
        try:
            out = [kind(p.strip()) for p in str(text).split(",") if p.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
        if not out:
            raise argparse.ArgumentTypeError(f"{text!r} is empty")
        return out
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=csv(str), default=["resnet18", "resnet20"])
    p.add_argument("--targets", type=csv(float), default=[0.7, 0.5])
    p.add_argument("--threads", type=csv(int), default=[1], help="CPU threads per row (CPU only)")
    p.add_argument("--batch-sizes", type=csv(int), default=[1])
    p.add_argument("--runtimes", type=csv(str), default=["eager", "onnxruntime"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--form", default="auto")
    p.add_argument("--budget-runtime", choices=("eager", "onnxruntime"), default="eager",
                   help="where the budget times candidates and checks (latency_aware runtime); the final timing "
                        "still runs every --runtimes")
    p.add_argument("--kernel-sizes", type=csv(int), default=None,
                   help="the separable pass's kernel_sizes (default: the pass's, 1,3 under a latency target; 3 leaves "
                        "the 1×1 convs out)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the final timing")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=0.05,
                   help="each measurement of the final timing makes at least this many seconds of calls")
    p.add_argument("--calibration-images", type=int, default=1000, help="ResNet-20: images of x[0::2] to calibrate on")
    p.add_argument("--cache-dir", default=None, help="latency cache (default: fxsurgeon's)")
    p.add_argument("--repeats", type=int, default=1,
                   help="convert and time each row this many times (each with its own cold cache in a temporary "
                        "folder); the row is the run with the median accuracy (else median ratio), all runs kept "
                        "under 'repeats'")
    p.add_argument("--deadline", type=float, default=None, help="Unix time after which no row starts")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--dry-run", action="store_true", help="print the rows that would run, then stop")
    p.add_argument("--render", action="store_true", help="only regenerate the table in docs/latency.md")
    args = p.parse_args(argv)
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown model(s) {bad}; known: {', '.join(MODELS)}")
    bad = [r for r in args.runtimes if r not in RUNTIMES]
    if bad:
        p.error(f"unknown runtime(s) {bad}; known: {', '.join(RUNTIMES)}")
    if any(not 0 < t <= 1 for t in args.targets):
        p.error("targets are fractions in (0, 1]")
    if any(n < 1 for n in args.threads + args.batch_sizes) or args.rounds < 1 or args.iters < 1 or args.repeats < 1:
        p.error("threads, batch sizes, rounds, iters and repeats must be positive")
    if args.device.startswith("cuda") and "onnxruntime" in args.runtimes:
        p.error("the onnxruntime runtime here is the CPU one: drop it with --device cuda")
    if args.device == "cpu" and args.dtype != "fp32":
        p.error("CPU rows run in fp32")
    return args


def plan(args: argparse.Namespace) -> list[dict]:
    threads = args.threads if args.device == "cpu" else [None]
    return [dict(model=m, target=t, threads=n, batch=b) for m in args.models for n in threads
            for b in args.batch_sizes for t in args.targets]


def load(name: str):
    """(model, one input sample, (calibration images, eval images, eval labels) or None)."""
    if name == "resnet20":
        from fxsurgeon.models import load_cifar10_test, load_resnet20

        xc, _ = load_cifar10_test(split="calib")
        xe, ye = load_cifar10_test(split="eval")
        return load_resnet20(), xe[:1], (xc, xe, ye)
    import timm

    torch.manual_seed(0)  # the same weights every run, as trained ones would be: a warm run reuses the CP errors
    return timm.create_model(name, pretrained=False).eval(), torch.randn(1, 3, 224, 224), None


def accuracy(model, x, y, batch=500) -> float:
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(x)


def runners(original, converted, sample, runtime, batch, device, dtype, threads):
    """Callables for the two models and the input they run on, in ``runtime``."""
    from fxsurgeon.runtime import prepare_inputs

    x = prepare_inputs((sample,), batch, device, dtype, runtime != "onnxruntime")
    if runtime == "onnxruntime":
        from fxsurgeon.bench.ort import ort_runner

        return ort_runner(original, x, threads=threads), ort_runner(converted, x, threads=threads), x
    out = []
    for m in (original, converted):
        m = __import__("copy").deepcopy(m).eval().to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
        out.append(torch.compile(m) if runtime == "compiled" else m)
    return out[0], out[1], x


def run_row(args, row: dict) -> dict:
    import fxsurgeon
    from fxsurgeon.bench import device_name, parse_dtype
    from fxsurgeon.budget.latency import interleaved_ratio
    from fxsurgeon.budget.plan import model_macs

    if row["threads"]:
        torch.set_num_threads(row["threads"])
    torch._dynamo.reset()
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    model, sample, data = load(row["model"])
    lat = dict(device=args.device, dtype=args.dtype, batch_size=row["batch"], channels_last=True)
    if args.budget_runtime == "onnxruntime":
        lat.update(runtime="onnxruntime", channels_last=False)
    if "compiled" in args.runtimes and args.device.startswith("cuda"):
        lat["compile"] = True
    if args.cache_dir:
        lat["cache_dir"] = args.cache_dir
    calib = None
    if data is not None:
        calib = data[0][: args.calibration_images].split(250)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = fxsurgeon.convert(model, example_inputs=sample, conv_head=False, verify=False, calibration=calib,
                                  separable=dict(target_latency=row["target"], form=args.form, latency_aware=lat,
                                                 **({"kernel_sizes": args.kernel_sizes} if args.kernel_sizes else {})))
    seconds = time.perf_counter() - t0
    rec = fxsurgeon.get_record(small)
    alloc = rec.extras["allocation"]
    out = dict(row, device=args.device, device_name=device_name(device), dtype=args.dtype, form=args.form,
               budget_runtime=args.budget_runtime,
               kernel_sizes=list(args.kernel_sizes or alloc["defaults"]["kernel_sizes"]), torch=torch.__version__, machine=platform.machine(), cpu_threads_available=os.cpu_count(),
               convert_seconds=round(seconds, 1), load_before=[round(v, 2) for v in load0],
               load_after=[round(v, 2) for v in os.getloadavg()], status=alloc["status"],
               conversion_ratio=alloc["measured_ratio"], table=alloc["table"] | {"context": None},
               checks=len(alloc["checks"]), rewrites=len(rec.rewrites),
               forms_used=sorted({r.details["form"] for r in rec.rewrites}),
               warnings=[str(w.message)[:300] for w in caught if "target_latency" in str(w.message)])
    macs0, _ = model_macs(model, (sample,))
    macs1, _ = model_macs(small, (sample,))
    out["mac_ratio"] = round(macs1 / macs0, 4)
    if data is not None:
        _, xe, ye = data
        out["accuracy_original"] = accuracy(model, xe, ye)
        out["accuracy_converted"] = accuracy(small, xe, ye)
    out["runtimes"] = {}
    for runtime in args.runtimes:
        a, b, x = runners(model, small, sample, runtime, row["batch"], device, dtype, row["threads"])
        r = interleaved_ratio(a, b, x, device, rounds=args.rounds, warmup=args.warmup, iters=args.iters,
                              min_seconds=args.min_seconds)
        out["runtimes"][runtime] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        print(f"  {runtime}: ratio {r['ratio']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] "
              f"({r['original_ms']:.2f} → {r['converted_ms']:.2f} ms)", flush=True)
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def run_repeats(args: argparse.Namespace, row: dict) -> dict:
    """The row ``--repeats`` times, each from a cold cache: one conversion is one draw of the machine's noise."""
    import tempfile

    runs = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="fxsurgeon-latency-repeat-") as cache:
            runs.append(run_row(argparse.Namespace(**{**vars(args), "cache_dir": cache}), row))
        print(f"  repeat {i + 1}/{args.repeats}: MACs {runs[-1]['mac_ratio']}, accuracy "
              f"{runs[-1].get('accuracy_converted')}", flush=True)
    first = args.budget_runtime if args.budget_runtime in runs[0]["runtimes"] else next(iter(runs[0]["runtimes"]))
    by = (lambda r: r["accuracy_converted"]) if "accuracy_converted" in runs[0] else \
        (lambda r: r["runtimes"][first]["ratio"])
    median = sorted(runs, key=by)[(len(runs) - 1) // 2]
    summary = [{"accuracy": r.get("accuracy_converted"), "mac_ratio": r["mac_ratio"],
                "conversion_ratio": r["conversion_ratio"], "status": r["status"][:80],
                "convert_seconds": r["convert_seconds"],
                "ratios": {k: v["ratio"] for k, v in r["runtimes"].items()}} for r in runs]
    return {**median, "repeats": summary}


def key(row: dict) -> tuple:
    return (row["model"], row["target"], row.get("threads"), row["batch"], row.get("device", "cpu"),
            row.get("dtype", "fp32"), row.get("form", "auto"), tuple(row.get("kernel_sizes", [3])),
            row.get("budget_runtime", "eager"))


def merge(path: Path, new: dict) -> list[dict]:
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in rows if key(r) != key(new)] + [new]
    rows.sort(key=lambda r: tuple(str(v) for v in key(r)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=1))
    tmp.replace(path)
    return rows


def table(rows: list[dict]) -> str:
    """The Markdown results table, generated from the JSON rows."""
    lines = ["| model | form | device | threads | batch | asked | measured eager (min–max) | onnxruntime | compiled | "
             "MACs | accuracy | convert s (cache hits/timed; load) | conversion's own check |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, rt):
        v = r["runtimes"].get(rt)
        return f"{v['ratio']:.3f} ({v['ratio_min']:.3f}–{v['ratio_max']:.3f})" if v else "–"

    for r in rows:
        form = r.get("form", "auto") + ("" if r.get("kernel_sizes", [3]) == [3] else
                                        f" ({'+'.join(f'{k}×{k}' for k in r['kernel_sizes'])})")
        if r.get("budget_runtime", "eager") != "eager":
            form += f", timed in {r['budget_runtime']}"
        acc = (f"{r['accuracy_converted']:.2f} % (orig. {r['accuracy_original']:.2f} %)"
               if "accuracy_converted" in r else "–")
        t = r["table"]
        ratio = f" ({r['conversion_ratio']:.3f}×)" if r.get("conversion_ratio") is not None else ""
        status = ("met" if r["status"] == "met" else r["status"].split(":")[0][:60]) + ratio
        lines.append(
            f"| {r['model']} | {form} | {r['device_name']} ({r['dtype']}) | {r.get('threads') or '–'} | {r['batch']} | "
            f"{r['target']} | {cell(r, 'eager')} | {cell(r, 'onnxruntime')} | {cell(r, 'compiled')} | "
            f"{r['mac_ratio']:.3f} | {acc} | {r['convert_seconds']:.0f} ({t['hits']}/{t['measured']}; "
            f"{r['load_before'][0]:.1f}) | {status} |")
    return "\n".join(lines)


def render(rows: list[dict], docs: Path = DOCS) -> None:
    text = docs.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{docs} has no {BEGIN} … {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    docs.write_text(f"{head}{BEGIN}\n{table(rows)}\n{END}{tail}")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.render:
        render(json.loads(out.read_text())["rows"])
        print(f"table in {DOCS} regenerated from {out}")
        return 0
    rows = plan(args)
    for r in rows:
        print("plan:", json.dumps(r), flush=True)
    if args.dry_run:
        return 0
    spent: list[float] = []
    failed = 0
    for r in rows:
        if args.deadline is not None and spent:
            guess = max(spent)
            if time.time() + guess > args.deadline:
                print(f"latency_budget: SKIP {r} (about {guess:.0f}s, past the deadline)", flush=True)
                continue
        print(f"row {r}", flush=True)
        t = time.perf_counter()
        try:
            res = run_repeats(args, r) if args.repeats > 1 else run_row(args, r)
        except Exception as exc:  # one row's failure must not lose the others
            failed += 1
            print(f"latency_budget: ERROR {r}: {type(exc).__name__}: {exc}", flush=True)
            continue
        spent.append(time.perf_counter() - t)
        merge(out, res)
        print(f"  status {res['status']}; MACs {res['mac_ratio']}; convert {res['convert_seconds']} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
