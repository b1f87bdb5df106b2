"""Coverage sweep over timm: convert and verify every architecture with ≤ 200M parameters, in chunks.

Run (resumable: rerunning continues where it stopped; each chunk takes a few minutes):

    python benchmarks/timm_sweep.py --out benchmarks/results/timm_sweep.jsonl \
        --summary benchmarks/results/timm_sweep.md

then print the README coverage table from what is recorded:

    python benchmarks/timm_sweep.py --out benchmarks/results/timm_sweep.jsonl --table

Every model of ``timm.list_models()`` (``pretrained=False``) runs through ``fxsurgeon.batch.run_batch`` in its
own process with the exact recipe (recipes/exact.yaml: every pass in a function-preserving mode), on a
64×64 input where the model runs at that size (its own input size otherwise), and is verified against the
original: relative L2 error ≤ 1e-4. Models over ``--max-params`` are recorded as skipped (counted on the meta
device, never built). The models are ordered by stride so that the first chunks are an even sample of the
whole list (``--stride 8``: models 0, 8, 16, … first): a sweep cut short still covers every family.
``--every N`` runs only every N-th model of that order.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from fxsurgeon.batch import ResultsFile, error_cause, latest_results, run_batch, summary_markdown
from fxsurgeon.cli import parse_bytes, parse_count
from fxsurgeon.recipes import load_recipe

REPO = Path(__file__).resolve().parents[1]


def sweep_order(models: list[str], stride: int) -> list[str]:
    """Models 0, s, 2s, …, then 1, 1+s, …: any prefix is an even sample of the (alphabetical) list."""
    return [m for k in range(stride) for m in models[k::stride]]


def family(name: str) -> str:
    """timm family of a model name: the part before the first digit or underscore (``resnet50d`` → ``resnet``)."""
    head = name.split("_")[0]
    out = ""
    for ch in head:
        if ch.isdigit():
            break
        out += ch
    return out or head


def coverage_table(results: list[dict], total_models: int, max_params: int | None) -> str:
    """The README table: counts by status, coverage of the traceable models, every failure with its cause."""
    latest = list(latest_results(results).values())
    st = Counter(r["status"] for r in latest)
    attempted = [r for r in latest if r["status"] != "skipped"]
    ok = [r for r in attempted if r["status"] == "ok" and r.get("verified")]
    failed = [r for r in attempted if r["status"] in ("error", "timeout")]
    untraceable = [r for r in failed if (r.get("cause") or "").startswith("trace:")]
    traceable = len(attempted) - len(untraceable)
    lines = []
    lim = f"≤ {max_params / 1e6:g}M parameters" if max_params else "any size"
    lines.append("| | models |")
    lines.append("|---|---:|")
    lines.append(f"| timm architectures (`timm.list_models()`) | {total_models:,} |")
    lines.append(f"| recorded by this sweep | {len(latest):,} |")
    lines.append(f"| skipped: {lim.replace('≤', 'over')} | {st.get('skipped', 0):,} |")
    lines.append(f"| attempted ({lim}) | {len(attempted):,} |")
    lines.append(f"| traced by torch.fx | {traceable:,} |")
    lines.append(f"| **converted and verified** (exact recipe, rel. L2 error ≤ 1e-4) | **{len(ok):,}** |")
    share = f"{len(ok) / traceable:.1%}" if traceable else "–"
    lines.append(f"| coverage of the traceable ones | **{share}** |")
    f64 = [r["model"] for r in ok if r.get("verified_dtype") == "float64"]
    if f64:
        lines.append(f"| of those, verified in float64 (float32 rounding chaotic at random init) | {len(f64)}: "
                     + ", ".join(sorted(f64)) + " |")
    lines.append(f"| errors / timeouts | {st.get('error', 0)} / {st.get('timeout', 0)} |")
    rewrites = Counter()
    for r in ok:
        for name, c in (r.get("passes") or {}).items():
            rewrites[name] += c.get("rewrites", 0)
    for name, n in rewrites.items():
        with_rw = sum(1 for r in ok if (r.get("passes") or {}).get(name, {}).get("rewrites"))
        lines.append(f"| `{name}`: models with ≥ 1 rewrite (rewrites in all) | {with_rw:,} ({n:,}) |")
    errs = sorted(r["rel_error"] for r in ok if r.get("rel_error") is not None)
    if errs:
        lines.append(f"| relative L2 error: median / worst | {errs[len(errs) // 2]:.1e} / {errs[-1]:.1e} |")
    secs = sorted(r.get("seconds") or 0 for r in latest)
    if secs:
        lines.append(f"| seconds per model: median / worst | {secs[len(secs) // 2]:.1f} / {secs[-1]:.0f} |")
    if failed:
        lines.append("")
        lines.append("| model | status | cause |")
        lines.append("|---|---|---|")
        for r in sorted(failed, key=lambda r: (r.get("cause") or "", r["model"])):
            cause = (r.get("cause") or error_cause(r)).replace("|", "\\|")
            lines.append(f"| {r['model']} | {r['status']} | {cause} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/timm_sweep.jsonl"))
    ap.add_argument("--summary", help="Markdown summary, rewritten after every chunk")
    ap.add_argument("--recipe", default=str(REPO / "recipes/exact.yaml"))
    ap.add_argument("--filter", default="*", help="timm.list_models pattern (default: every model)")
    ap.add_argument("--max-params", type=parse_count, default=parse_count("200M"))
    ap.add_argument("--stride", type=int, default=8, help="order models 0, s, 2s, … so a prefix is an even sample")
    ap.add_argument("--every", type=int, default=1, help="run only every N-th model of that order")
    ap.add_argument("--limit", type=int, help="only the first N models of that order (with --stride 8 and "
                                              "--limit 172: every 8th model of timm.list_models())")
    ap.add_argument("--chunk-size", type=int, default=20)
    ap.add_argument("--max-chunks", type=int, help="stop after this many chunks (resume later)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--max-memory", type=parse_bytes, default=parse_bytes("14G"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--retry-failed", action="store_true", help="convert again models recorded as failed")
    ap.add_argument("--macs", action="store_true", help="also count MACs before/after with fvcore (slower)")
    ap.add_argument("--table", action="store_true", help="print the README coverage table and exit")
    args = ap.parse_args(argv)

    import timm

    models = sweep_order(timm.list_models(args.filter), args.stride)[:: args.every][: args.limit]
    if args.table:
        results, _ = ResultsFile(args.out).read()
        wanted = set(models)
        print(coverage_table([r for r in results if r["model"] in wanted], len(timm.list_models()),
                             args.max_params))
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(args.recipe)
    chunks = [models[i: i + args.chunk_size] for i in range(0, len(models), args.chunk_size)]
    t0 = time.time()
    ran = 0
    for i, chunk in enumerate(chunks):
        if args.max_chunks is not None and ran >= args.max_chunks:
            break
        res = run_batch(chunk, out=args.out, recipe=recipe, recipe_name=Path(args.recipe).name,
                        workers=args.workers, timeout=args.timeout, max_params=args.max_params,
                        image_size=args.image_size, max_memory=args.max_memory, count_macs=args.macs,
                        retry_failed=args.retry_failed,
                        progress=sys.stderr.isatty())
        if not res.ran:
            continue
        ran += 1
        results, _ = ResultsFile(args.out).read()
        latest = latest_results(r for r in results if r["model"] in set(models))
        by = Counter(r["status"] for r in latest.values())
        print(f"[{time.time() - t0:7.0f} s] chunk {i + 1}/{len(chunks)}: {len(latest)}/{len(models)} recorded, "
              + ", ".join(f"{k} {v}" for k, v in sorted(by.items())), flush=True)
        for r in res.ran:
            if r["status"] in ("error", "timeout"):
                print(f"    {r['model']}: {r['status']}: {r.get('cause')}", flush=True)
        if args.summary:
            text = summary_markdown(list(latest.values()), title="fxsurgeon coverage sweep over timm",
                                    recipe=Path(args.recipe).name)
            Path(args.summary).write_text(text + "\n", encoding="utf-8")
    families = defaultdict(Counter)
    results, _ = ResultsFile(args.out).read()
    for r in latest_results(results).values():
        families[family(r["model"])][r["status"]] += 1
    print(json.dumps({"families": len(families)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
