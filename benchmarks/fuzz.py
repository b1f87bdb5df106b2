"""Long fuzzing run of convert() and save/load on random small conv nets (see fxsurgeon.testing.fuzz).

Run:

    .venv/bin/python benchmarks/fuzz.py --examples 3000            # ~5 min on one core
    .venv/bin/python benchmarks/fuzz.py --examples 200 --start 5000 # another slice of seeds

Each seed draws one net spec (``fxsurgeon.testing.fuzz.generate_spec`` from ``random.Random(seed)``) and checks:
the exact recipe (every pass in its exact setting, random dtype float32/float64, train mode and frozen
parameters) reproduces the outputs; a random approximate recipe gives finite outputs of the right shape and
a record, or a SurgeryError that is not a self-reported bug; the caller's model is unchanged; every
``--round-trip-every``-th seed also goes through fxsurgeon.save → fxsurgeon.load with identical outputs.

Prints counts, how often each pass rewrote something, refusals grouped by reason, and every distinct failure
with its smallest failing seed and spec (rebuild it with ``FuzzNet(spec)``); ``--json`` writes it all.
Exit code 1 when any property failed.

Saved-file mode (``fxsurgeon.testing.load_fuzz``): mutate real saved conversions (ResNet-20, two FuzzNets,
timm's test_resnet) — factory names, tracing names, kwargs, example shapes, format_version, JSON nesting,
any JSON value, tensors in the header, tied keys, the raw text — and load each with ``fxsurgeon.load``:

    .venv/bin/python benchmarks/fuzz.py --saved-files 5000 --saved-json benchmarks/results/load_fuzz.json

Properties: every file loads or is refused with a SurgeryError (no other exception), no canary factory ran
(the canary folder stays empty), and the peak RSS (``resource.getrusage``) stays bounded: it is reported
after building the base files and at the end. Exit code 1 when any property failed. On a busy machine, run
seed ranges in parallel and merge their summaries:

    .venv/bin/python benchmarks/fuzz.py --saved-files 1667 --start 0 --saved-json /tmp/a.json   # and 1667, 3334
    .venv/bin/python benchmarks/fuzz.py --merge-saved /tmp/a.json /tmp/b.json /tmp/c.json \
        --saved-json benchmarks/results/load_fuzz.json
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys
import time
import traceback
import warnings

import torch

from fxsurgeon.testing.fuzz import (
    RandomDraw,
    approximate_options,
    check_approximate,
    check_exact,
    generate_spec,
)


def _key(exc: BaseException) -> str:
    """Group failures by type and message with figures blanked out."""
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: " + re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", msg)[:160]


def run_one(seed: int, max_ops: int, round_trip: bool) -> list[tuple[str, str, dict]]:
    """Results of one seed: [(check, outcome, info)] with outcome 'ok', 'refused' or 'FAIL'."""
    d = RandomDraw(random.Random(seed))
    spec = generate_spec(d, max_ops=max_ops)
    dtype = torch.float64 if d.bool(0.3) else torch.float32
    train, freeze = d.bool(0.3), d.bool(0.2)
    options = approximate_options(d)
    out = []
    for check in ("exact", "approximate"):
        try:
            if check == "exact":
                info = check_exact(spec, seed=seed, dtype=dtype, train=train, freeze=freeze, round_trip=round_trip)
            else:
                info = check_approximate(spec, options, seed=seed, train=train, round_trip=round_trip)
            out.append((check, "refused" if "refused" in info else "ok", info))
        except Exception as exc:  # every exception is a finding here: the properties say none may escape
            out.append((check, "FAIL", {"key": _key(exc), "spec": spec, "options": options if check != "exact" else
                                        None, "dtype": str(dtype), "train": train, "freeze": freeze,
                                        "traceback": traceback.format_exc(limit=6)}))
    return out


def run_saved_files(n: int, start: int, json_path: str | None) -> int:
    """The saved-file fuzzer: ``n`` mutated files from seed ``start``; returns the exit code."""
    import contextlib
    import io
    import resource
    import tempfile
    from pathlib import Path

    from fxsurgeon.testing.load_fuzz import LoadFuzzer, make_base_files

    def rss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    outcomes: collections.Counter = collections.Counter()
    mutations: collections.Counter = collections.Counter()
    refusals: collections.Counter = collections.Counter()
    crashes: dict[str, dict] = {}
    multiline = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        bases = make_base_files(work)
        fuzzer = LoadFuzzer(bases, work)
        rss_setup = rss_mib()
        t1 = time.perf_counter()
        worst = {"seconds": 0.0}
        for i, seed in enumerate(range(start, start + n)):
            if i and i % 500 == 0:
                print(f"  … {i} files, {sum(outcomes.values()) - outcomes['refused'] - outcomes['loaded']} "
                      f"crashes, peak RSS {rss_mib():.0f} MiB, {time.perf_counter() - t1:.0f} s", file=sys.stderr,
                      flush=True)
            t = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # torch's ShapeProp prints tracebacks it re-raises
                res = fuzzer.run_one(random.Random(seed), work / "mutated.safetensors")
            dt = time.perf_counter() - t
            if dt > worst["seconds"]:
                worst = {"seconds": dt, "seed": seed, "mutations": res["mutations"], "outcome": res["outcome"]}
            outcomes[res["outcome"]] += 1
            for m in res["mutations"]:
                mutations[m.split(":")[0]] += 1
            if res["outcome"] == "refused":
                refusals[_key(Exception(res["message"]))] += 1
                multiline += res["multiline"]
            elif res["outcome"] == "CRASH":
                crashes.setdefault(res["error"][:120], {"seed": seed, **res, "count": 0})["count"] += 1
        canaries = fuzzer.canaries()
        seconds = time.perf_counter() - t1
    rss_end = rss_mib()
    summary = {
        "files": n, "start": start, "bases": [b.name for b in bases], "seconds": round(seconds, 1),
        "setup_seconds": round(t1 - t0, 1), "ms_per_file": round(seconds / max(n, 1) * 1000, 1),
        "outcomes": dict(outcomes), "crashes": sum(c["count"] for c in crashes.values()),
        "canaries_triggered": canaries, "peak_rss_mib_after_setup": round(rss_setup), "peak_rss_mib_end":
        round(rss_end), "peak_rss_growth_mib": round(rss_end - rss_setup), "slowest_file": worst,
        "multiline_refusals": multiline, "mutations": dict(mutations),
        "top_refusals": dict(refusals.most_common(25)), "crash_examples": list(crashes.values())[:20],
        "torch_threads": torch.get_num_threads(),
    }
    print(f"fuzzed {n} mutated saved files (seeds {start}..{start + n - 1}) in {seconds:.0f} s "
          f"({summary['ms_per_file']} ms per file) from {len(bases)} base files")
    print(f"  outcomes: {dict(outcomes)}; crashes (non-SurgeryError): {summary['crashes']}; canaries: {canaries}")
    print(f"  peak RSS {rss_setup:.0f} MiB after setup, {rss_end:.0f} MiB at the end "
          f"(+{rss_end - rss_setup:.0f} MiB); slowest file {worst['seconds']:.2f} s")
    for key, c in crashes.items():
        print(f"  CRASH {c['count']}× seed {c['seed']}: {key}\n    {c['mutations']}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(json_path, "w") as fh:
            json.dump(summary, fh, indent=1, default=str)
            fh.write("\n")
    return 1 if crashes or canaries else 0


def merge_saved(paths: list[str], json_path: str | None) -> int:
    """One summary from the summaries of several seed ranges (counts added, peaks and slowest file maximal)."""
    from pathlib import Path

    parts = [json.loads(Path(p).read_text()) for p in paths]
    total: dict = {"files": sum(p["files"] for p in parts), "shards": [
        {k: p[k] for k in ("start", "files", "seconds", "ms_per_file", "peak_rss_mib_end")} for p in parts]}
    for key in ("outcomes", "mutations", "top_refusals"):
        c: collections.Counter = collections.Counter()
        for p in parts:
            c.update(p[key])
        total[key] = dict(c.most_common(25) if key == "top_refusals" else c)
    for key in ("crashes", "multiline_refusals"):
        total[key] = sum(p[key] for p in parts)
    total["canaries_triggered"] = sorted({c for p in parts for c in p["canaries_triggered"]})
    for key in ("peak_rss_mib_after_setup", "peak_rss_mib_end", "peak_rss_growth_mib"):
        total[key] = max(p[key] for p in parts)
    total["slowest_file"] = max((p["slowest_file"] for p in parts), key=lambda w: w["seconds"])
    total["crash_examples"] = [c for p in parts for c in p["crash_examples"]][:20]
    total["bases"] = parts[0]["bases"]
    total["seeds"] = f"{min(p['start'] for p in parts)}..{max(p['start'] + p['files'] for p in parts) - 1}"
    print(f"merged {len(parts)} runs: {total['files']} files, outcomes {total['outcomes']}, crashes "
          f"{total['crashes']}, canaries {total['canaries_triggered']}, peak RSS ≤ {total['peak_rss_mib_end']} MiB "
          f"per process (+{total['peak_rss_growth_mib']} MiB after setup)")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(total, fh, indent=1, default=str)
            fh.write("\n")
    return 1 if total["crashes"] or total["canaries_triggered"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--max-ops", type=int, default=10)
    parser.add_argument("--round-trip-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny convs: 1 is fastest)")
    parser.add_argument("--json", help="write the full results here")
    parser.add_argument("--saved-files", type=int, default=0, metavar="N",
                        help="instead: fuzz fxsurgeon.load with N mutated saved files (seeds from --start)")
    parser.add_argument("--saved-json", help="write the saved-file fuzzer's summary here")
    parser.add_argument("--merge-saved", nargs="+", metavar="JSON", help="instead: merge saved-file summaries")
    args = parser.parse_args(argv)
    if args.merge_saved:
        return merge_saved(args.merge_saved, args.saved_json)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # padding='same' copies, torch.ao deprecations: not findings
    if args.saved_files:
        return run_saved_files(args.saved_files, args.start, args.saved_json)

    counts: collections.Counter = collections.Counter()
    passes: collections.Counter = collections.Counter()
    refusals: collections.Counter = collections.Counter()
    failures: dict[str, dict] = {}
    failure_counts: collections.Counter = collections.Counter()
    rewrites = 0
    t0 = time.perf_counter()
    for i, seed in enumerate(range(args.start, args.start + args.examples)):
        if i and i % 250 == 0:
            print(f"  … {i} nets, {sum(failure_counts.values())} failures, {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
        round_trip = args.round_trip_every > 0 and seed % args.round_trip_every == 0
        for check, outcome, info in run_one(seed, args.max_ops, round_trip):
            counts[f"{check} {outcome}"] += 1
            counts["round trips"] += round_trip and outcome == "ok"
            if outcome == "ok":
                passes.update(f"{check}: {p}" for p in info["passes"])
                rewrites += info["rewrites"]
            elif outcome == "refused":
                refusals[_key(Exception(info["refused"]))] += 1
            else:
                failure_counts[info["key"]] += 1
                # keep the failing example with the fewest ops: the easiest to read
                best = failures.get(info["key"])
                if best is None or len(info["spec"]["ops"]) < len(best["spec"]["ops"]):
                    failures[info["key"]] = dict(info, seed=seed, check=check)
    seconds = time.perf_counter() - t0

    n = args.examples
    print(f"fuzzed {n} random nets (seeds {args.start}..{args.start + n - 1}, ≤{args.max_ops} ops) in "
          f"{seconds:.0f} s ({seconds / n * 1000:.0f} ms per net, {args.threads} thread(s))")
    for k in sorted(counts):
        print(f"  {k}: {counts[k]}")
    print(f"  rewrites made: {rewrites}")
    print("  nets where each pass rewrote something:")
    for k, v in sorted(passes.items()):
        print(f"    {k}: {v}")
    if refusals:
        print("  SurgeryError refusals (allowed), by reason:")
        for k, v in refusals.most_common():
            print(f"    {v}× {k}")
    if failures:
        print(f"  FAILURES ({sum(failure_counts.values())}, {len(failures)} distinct):")
        for key, f in failures.items():
            print(f"    {failure_counts[key]}× [{f['check']}] {key}\n      smallest: seed {f['seed']}, spec "
                  f"{json.dumps(f['spec'])}\n      options {f['options']}, {f['dtype']}, train={f['train']}")
    else:
        print("  no property failed")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"examples": n, "start": args.start, "seconds": seconds, "counts": counts,
                       "passes": passes, "refusals": refusals, "failures": failures,
                       "failure_counts": failure_counts}, fh, indent=1, default=str)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
