"""Long fuzzing run of convert() and save/load on random small conv nets (see fxsurgeon.fuzz).

Run:

    .venv/bin/python benchmarks/fuzz.py --examples 3000            # ~5 min on one core
    .venv/bin/python benchmarks/fuzz.py --examples 200 --start 5000 # another slice of seeds

Each seed draws one net spec (``fxsurgeon.fuzz.generate_spec`` from ``random.Random(seed)``) and checks:
the exact recipe (every pass in its exact setting, random dtype float32/float64, train mode and frozen
parameters) reproduces the outputs; a random approximate recipe gives finite outputs of the right shape and
a record, or a SurgeryError that is not a self-reported bug; the caller's model is unchanged; every
``--round-trip-every``-th seed also goes through fxsurgeon.save → fxsurgeon.load with identical outputs.

Prints counts, how often each pass rewrote something, refusals grouped by reason, and every distinct failure
with its smallest failing seed and spec (rebuild it with ``FuzzNet(spec)``); ``--json`` writes it all.
Exit code 1 when any property failed.
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

from fxsurgeon.fuzz import RandomDraw, approximate_options, check_approximate, check_exact, generate_spec


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--max-ops", type=int, default=10)
    parser.add_argument("--round-trip-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny convs: 1 is fastest)")
    parser.add_argument("--json", help="write the full results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # padding='same' copies, torch.ao deprecations: not findings

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
