"""``fxsurgeon batch``: convert many timm models, each in its own process, into a resumable results file and a
Markdown summary.
"""

from __future__ import annotations

import argparse
import re

from ..errors import SurgeryError
from .common import positive, verbosity_parent

__all__ = ["add_batch_command", "parse_bytes", "parse_count"]


def parse_count(text: str) -> int:
    """``"200M"`` → 200_000_000; K/M/B(or G)/T are powers of 1000.

    >>> parse_count("200M"), parse_count("1.5B"), parse_count("5000")
    (200000000, 1500000000, 5000)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 200M or 1.5B")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def parse_bytes(text: str) -> int:
    """``"8G"`` → 8 GiB in bytes; K/M/G/T are powers of 1024.

    >>> parse_bytes("8G"), parse_bytes("512M")
    (8589934592, 536870912)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 8G or 512M")
    scale = 1024 ** " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * scale)


def _cmd_batch(args: argparse.Namespace) -> int:
    from ..batch import Job, expand_models, run_batch
    from .common import recipe_from_args

    recipe = recipe_from_args(args)
    models = expand_models(args.patterns, args.exclude)
    if args.list:
        print("\n".join(models))
        return 0
    if not args.out:
        raise SurgeryError("batch needs --out results.jsonl")
    job = Job("", recipe=recipe, recipe_name=args.recipe, timeout=args.timeout, max_params=args.max_params,
              input_size=tuple(args.input_size) if args.input_size else None, image_size=args.image_size,
              batch_size=args.batch_size, seed=args.seed, threads=args.threads, max_memory=args.max_memory,
              count_macs=not args.no_macs, perturb_init=not args.no_perturb_init)
    outcome = run_batch(
        models, out=args.out, job=job, summary=args.summary, workers=args.workers, force=args.force,
        retry_failed=args.retry_failed, dask_scheduler=args.dask_scheduler,
        progress=not args.no_progress and not args.quiet,
    )
    results = outcome.results
    print(f"fxsurgeon batch: {len(outcome.ran)} run ({len(models) - len(outcome.ran)} already in {args.out}); "
          f"of {len(models)} models: {sum(r['status'] == 'ok' for r in results)} ok, "
          f"{sum(r['status'] == 'skipped' for r in results)} skipped, {len(outcome.failed)} failed"
          + (f"; summary in {args.summary}" if args.summary else ""))
    return 1 if outcome.failed else 0


def add_batch_command(sub) -> None:
    from .common import add_recipe_options, positive_int

    p = sub.add_parser(
        "batch", help="convert many timm models, each in its own process",
        description="Convert every model matching the patterns (timm.list_models), each in its own process, "
                    "appending one JSON line per model to --out. Rerunning skips models already there. "
                    "Exit 1 when a model failed or timed out, 2 on usage errors.", parents=[verbosity_parent()],
    )
    p.add_argument("patterns", nargs="+", metavar="PATTERN",
                   help="timm.list_models pattern (resnet*), model name, package.module:factory or a file")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="leave these out (repeatable)")
    add_recipe_options(p)
    p.add_argument("--out", help="results, one JSON line per model (appended; required)")
    p.add_argument("--summary", help="write a Markdown summary here")
    p.add_argument("--max-params", type=parse_count, metavar="N", help="skip larger models, e.g. 200M")
    p.add_argument("--workers", type=positive(int), default=1, help="models at a time (default 1)")
    p.add_argument("--timeout", type=positive(float), default=600.0, metavar="S",
                   help="seconds per model before its processes are killed (default 600)")
    p.add_argument("--input-size", type=positive_int, nargs=3, metavar=("C", "H", "W"),
                   help="one input size for all (default: --image-size when the model runs at it, else its own)")
    p.add_argument("--image-size", type=positive(int), default=64, help="small input tried first (default 64)")
    p.add_argument("--batch-size", type=positive(int), default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive(int), help="torch threads per model (default: CPUs / workers)")
    p.add_argument("--max-memory", type=parse_bytes, metavar="SIZE",
                   help="address-space limit per model process, e.g. 12G (torch and timm alone map about 4G): "
                        "a model over it fails alone")
    p.add_argument("--no-macs", action="store_true", help="do not count MACs (faster)")
    p.add_argument("--no-perturb-init", action="store_true",
                   help="keep timm's constant initial values (zero-initialised norms silence residual branches, "
                        "hiding them from verification; by default they get random values first)")
    p.add_argument("--force", action="store_true", help="convert again models already in --out")
    p.add_argument("--retry-failed", action="store_true", help="convert again models that failed or timed out")
    p.add_argument("--dask-scheduler", metavar="ADDRESS", help="run on a Dask cluster (pip install fxsurgeon[distributed])")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--quiet implies it)")
    p.add_argument("--list", action="store_true", help="print the models the patterns select and exit")
    p.set_defaults(func=_cmd_batch)
