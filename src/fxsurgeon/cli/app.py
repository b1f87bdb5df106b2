"""The ``fxsurgeon`` command.

Subcommands register here; each lives in the module of the feature it drives and only its argument parsing
sits in this file (or in a ``*_cli`` module next to the feature, added with one ``add_..._command(sub)``
line in :func:`build_parser`). Exit codes: 0 success, 1 a check failed (thresholds, models that failed in
a batch), 2 usage or input errors, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import SurgeryError
from .common import (  # noqa: F401  (HUB_HOST, MODEL_FILE_SUFFIXES, hub_reachable: still importable from cli)
    HUB_HOST,
    MODEL_FILE_SUFFIXES,
    check_output,
    example_input,
    hub_reachable,
    load_model,
    positive,
    verbosity_parent,
)

__all__ = ["build_parser", "load_model", "main", "parse_bytes", "parse_count"]


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


def _save_model(converted: torch.nn.Module, path: str, spec: str, example: torch.Tensor,
                fmt: str | None = None) -> dict[str, Any]:
    """Write the converted model in the format ``fmt`` or ``path``'s suffix names (see :mod:`fxsurgeon.export`)."""
    from ..export import write_model

    source = spec if (":" in spec or not os.path.isfile(spec)) else None
    return write_model(converted, path, example, fmt=fmt, source=source)


def _write_text(path: str, text: str) -> None:
    from ..io import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text if text.endswith("\n") else text + "\n",
                                                        encoding="utf-8"))


def note(args: argparse.Namespace, text: str) -> None:
    """An informational line on stderr; silent with ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..convert import convert
    from ..record import get_record
    from .common import activity, device_of, recipe_from_args, show_progress, weights_kind

    check_output(args.out, "--out")
    check_output(args.report, "--report")
    if args.out:
        from ..export import format_of

        format_of(args.out, args.out_format)  # an unknown file type is refused before any work
    recipe = recipe_from_args(args)
    device = device_of(args)
    as_json = args.format == "json"
    say = (lambda text: print(text, file=sys.stderr)) if as_json else print
    torch.manual_seed(args.seed)  # random-init models come out the same on every run
    model = load_model(args.model, pretrained=args.pretrained, weights=args.weights, device=str(device),
                       trust_factories=args.trust_factory)
    weights = weights_kind(args, args.model)
    x = example_input(model, args.input_size, args.batch_size, args.seed, device)
    if args.synthetic_calibration:
        recipe = {**recipe, "calibration": "synthetic"}
        note(args, "calibrating on synthetic images matched to the BatchNorm statistics (about a minute on CPU) ...")
    # the source lets `report` and `bench` rebuild the original of a saved file, and load() replay it
    source = args.model if (":" in args.model or not os.path.isfile(args.model)) else None
    with activity(f"converting {args.model}", enabled=show_progress(args)):
        converted = convert(model, example_inputs=x, **({"source": source} if source else {}), **recipe)
    record = get_record(converted)
    record.extras["weights"] = weights  # saved with the model: `fxsurgeon report` stamps random weights too
    if not as_json:
        if args.quiet:
            print(_one_line(record))
        else:
            print(record.summary(max_lines=10**9 if args.verbose else 40))
    extras = record.extras
    synthetic = extras.get("synthetic_calibration")
    if synthetic and not as_json:
        calib = extras.get("calibration") or {}
        print(f"  calibration: {synthetic['images']} synthetic images ({synthetic['seconds']:.0f} s), output error "
              f"on them {calib.get('output_error_before', float('nan')):.4g} → "
              f"{calib.get('output_error_after', float('nan')):.4g}")
    from ..report.savings import savings

    # the full report only when asked for; the savings line needs the two MAC counts alone
    report = savings(model, converted, x, weights=weights) if args.report else None
    counted = None
    if not args.no_savings:
        try:
            counted = report or savings(model, converted, x, measure_fidelity=False, torch_cross_check=False,
                                        weights=weights)
        except SurgeryError as exc:
            say(f"  savings: not counted ({exc})")
        else:
            if not as_json and not args.quiet:
                print(f"  savings: parameters {_change(counted.params_before, counted.params_after)}, MACs per "
                      f"sample {_change(counted.macs_before, counted.macs_after)} (fvcore: one multiply-add = 1 MAC)")
    if weights == "random" and not args.quiet:
        say("  weights: RANDOM (no --weights or --pretrained): the error above says nothing about a trained model")
        _warn_silenced(model, args, say)
    if report is not None:
        text = report.to_json() if args.report.endswith(".json") else report.to_markdown()
        _write_text(args.report, text)
        say(f"report written to {args.report}")
    written = None
    if args.out:
        written = _save_model(converted, args.out, args.model, x, args.out_format)
        say(f"converted model saved to {args.out} ({_written_text(written)})")
    if as_json:
        import json

        from ..report.savings import finite_or_none

        data = {"weights": weights, "record": record.to_dict(), "out": written, "report": args.report,
                "savings": None if counted is None else {
                    "params_before": counted.params_before, "params_after": counted.params_after,
                    "macs_per_sample_before": counted.macs_before, "macs_per_sample_after": counted.macs_after}}
        print(json.dumps(finite_or_none(data), indent=2, default=str, allow_nan=False))
    return 0


def _one_line(record) -> str:
    v = record.verification
    err = "" if v is None else f", relative L2 error {v.rel_error:.3g}"
    return (f"{record.model}: {len(record.rewrites)} rewrites, {len(record.skipped)} skipped, parameters "
            f"{_change(record.params_before, record.params_after)}{err}")


def _written_text(info: dict[str, Any]) -> str:
    out = info["format"]
    if info.get("exporter"):
        out += f", {info['exporter']}"
    check = info.get("check")
    if check:
        out += f"; checked in {check['runtime']}: max abs difference {check['max_abs_error']:.3g}"
    return out


def _change(before: int, after: int) -> str:
    rel = f" ({after / before - 1:+.1%})" if before else ""
    return f"{before:,} → {after:,}{rel}"


def _warn_silenced(model: torch.nn.Module, args: argparse.Namespace, say=print) -> None:
    """Say when the verification above is blind to part of the model (fresh timm weights zero some branches)."""
    if args.pretrained or args.weights:
        return
    from ..batch import silencing_params

    names = silencing_params(model)
    if names:
        say(f"  note: {len(names)} scaling parameters of this model are zero (e.g. {names[0]}): fresh "
            "weights silence the branches behind them, so the error above cannot show what happens there. "
            "Use --pretrained or --weights for a meaningful error (`fxsurgeon batch` randomises them).")


def _add_convert(sub) -> None:
    from .common import add_model_options, add_recipe_options

    p = sub.add_parser(
        "convert", help="convert one model and print what changed",
        description="Convert one model with a recipe, print every rewrite and skip, verify it against the "
                    "original on a random input, and optionally save it and a savings report.",
        epilog="exit codes: 0 done, 2 usage or input error", parents=[verbosity_parent()],
    )
    p.add_argument("model", nargs="?", default="resnet18",
                   help="timm name, package.module:factory, or a saved model file (default: resnet18)")
    add_recipe_options(p)
    p.add_argument("--out", metavar="FILE",
                   help="save the converted model; the suffix picks the format: .safetensors (fxsurgeon.save: "
                        "weights + recipe), .pt/.pth (torch.save), .onnx (ONNX, checked in onnxruntime), "
                        ".pt2 (torch.export ExportedProgram)")
    p.add_argument("--out-format", choices=("safetensors", "pt", "onnx", "pt2"),
                   help="format of --out whatever its suffix")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="what goes to stdout: the readable summary (default) or one JSON document")
    p.add_argument("--report", metavar="FILE", help="write the savings report here (.md, or .json)")
    add_model_options(p)
    p.add_argument("--batch-size", type=positive(int), default=1,
                   help="batch of the example input (verification; MACs are per sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and example input")
    p.add_argument("--no-savings", action="store_true", help="do not count MACs for the savings line")
    p.add_argument("--synthetic-calibration", action="store_true",
                   help="calibrate without data: on images made to match the model's BatchNorm statistics "
                        "(convert(calibration='synthetic'); meaningful with trained --weights or --pretrained)")
    p.set_defaults(func=_cmd_convert)


def _cmd_batch(args: argparse.Namespace) -> int:
    from ..batch import expand_models, run_batch
    from .common import recipe_from_args

    recipe = recipe_from_args(args)
    models = expand_models(args.patterns, args.exclude)
    if args.list:
        print("\n".join(models))
        return 0
    if not args.out:
        raise SurgeryError("batch needs --out results.jsonl")
    outcome = run_batch(
        models, out=args.out, recipe=recipe, recipe_name=args.recipe, summary=args.summary,
        workers=args.workers, timeout=args.timeout, max_params=args.max_params, input_size=args.input_size,
        image_size=args.image_size, batch_size=args.batch_size, seed=args.seed, threads=args.threads,
        max_memory=args.max_memory, count_macs=not args.no_macs, perturb_init=not args.no_perturb_init,
        force=args.force, retry_failed=args.retry_failed, dask_scheduler=args.dask_scheduler,
        progress=not args.no_progress and not args.quiet,
    )
    results = outcome.results
    print(f"fxsurgeon batch: {len(outcome.ran)} run ({len(models) - len(outcome.ran)} already in {args.out}); "
          f"of {len(models)} models: {sum(r['status'] == 'ok' for r in results)} ok, "
          f"{sum(r['status'] == 'skipped' for r in results)} skipped, {len(outcome.failed)} failed"
          + (f"; summary in {args.summary}" if args.summary else ""))
    return 1 if outcome.failed else 0


def _add_batch(sub) -> None:
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


def _cmd_recipes(args: argparse.Namespace) -> int:
    from ..recipe_files import describe_recipe, list_recipes, resolve_recipe

    if args.name:
        path = resolve_recipe(args.name)
        sys.stdout.write(path.read_text(encoding="utf-8"))
        return 0
    names = list_recipes()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {describe_recipe(name)}")
    if not args.quiet:
        print("\nuse one with --recipe NAME; `fxsurgeon recipes NAME` prints it (copy it to make your own)")
    return 0


def _add_recipes(sub) -> None:
    p = sub.add_parser("recipes", help="list the shipped recipes, or print one",
                       description="List the recipes shipped with fxsurgeon (usable as --recipe NAME), or print "
                                   "one to copy and edit.", parents=[verbosity_parent()])
    p.add_argument("name", nargs="?", help="print this recipe's YAML")
    p.set_defaults(func=_cmd_recipes)


def build_parser() -> argparse.ArgumentParser:
    from ..runtime import __version__
    from .common import Parser

    parser = Parser(prog="fxsurgeon", parents=[verbosity_parent()],
                    description="fxsurgeon: convert PyTorch models with torch.fx passes (separable convs, conv "
                                "heads, concat fusion) that keep the trained weights, then report and benchmark.",
                    epilog="exit codes: 0 success, 1 a check failed (thresholds, failed models in a batch), "
                           "2 usage or input error, 130 interrupted. `fxsurgeon COMMAND --help` for each command.")
    parser.set_defaults(quiet=False, verbose=False)
    parser.add_argument("--version", action="version", version=f"fxsurgeon {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    _add_convert(sub)
    _add_batch(sub)
    from .report import add_report_command

    add_report_command(sub)
    from .bench import add_bench_command

    add_bench_command(sub)
    _add_recipes(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fxsurgeon`` command; returns the exit code (0 ok, 1 a check failed, 2 usage/input, 130 ^C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe (`| head`) shows here, inside the handler below
        return code
    except SurgeryError as exc:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"fxsurgeon: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxsurgeon: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`fxsurgeon ... | head`): stop quietly; stdout goes to /dev/null so the
        # interpreter's final flush does not raise again
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command ended by a closed pipe

