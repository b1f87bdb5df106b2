"""``fxsurgeon bench``: convert a model, then time the original and the converted side by side.

MODEL is a timm name or ``package.module:factory``, converted with ``--recipe`` (``convert()``'s defaults
without one) on a random input, or a converted model saved by fxsurgeon (its original is rebuilt from the
record, or given with ``--original``). Both models are timed in the same process and configuration,
interleaved: alternating rounds of original and converted calls, so that a change of load hits both. The
table shows each batch size's median and p90 latency, throughput, peak memory and the speed-up (original /
converted latency) with its spread over the rounds; noisy timings are warned about. Exit codes: 0 done,
2 usage or input errors.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import SurgeryError

__all__ = ["add_bench_command", "parse_batch_sizes", "run_bench"]


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,64"`` → ``[1, 64]``; anything but positive integers is an argparse error.

    >>> parse_batch_sizes("1, 64")
    [1, 64]
    """
    try:
        sizes = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of batch sizes (1,64)") from None
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be positive integers, e.g. 1,64")
    return sizes


def add_bench_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``fxsurgeon`` parser's subparsers."""
    from .common import add_model_options, add_recipe_options, positive, verbosity_parent

    p = subparsers.add_parser(
        "bench", help="time the original and the converted model side by side (CUDA or CPU)",
        description=" ".join(__doc__.split("\n\n")[1].replace("`", "").split()),
        epilog="exit codes: 0 done, 2 usage or input error", parents=[verbosity_parent()],
    )
    p.add_argument("model", help="timm name, package.module:factory, or a converted model saved by fxsurgeon")
    add_recipe_options(p)
    p.add_argument("--original", metavar="MODEL",
                   help="for a saved converted MODEL: the original to time against (default: rebuilt from the "
                        "saved record; timing does not depend on the weights)")
    add_model_options(p, device_default="cuda when available, else cpu")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16: the models are cast to it")
    p.add_argument("--channels-last", action="store_true", help="run models and inputs in channels_last")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile both models first (optionally a mode, e.g. max-autotune)")
    p.add_argument("--runtime", choices=("eager", "onnxruntime"), default="eager",
                   help="eager PyTorch (default; with --compile, torch.compile) or onnxruntime on the CPU "
                        "(both models exported to ONNX; --threads sets its intra-op threads)")
    p.add_argument("--threads", type=positive(int), default=None,
                   help="CPU threads (torch.set_num_threads, or onnxruntime's intra-op threads)")
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=[1], metavar="B1,B2",
                   help="comma-separated batch sizes (default 1)")
    p.add_argument("--warmup", type=positive(int), default=10, help="untimed calls per batch size (default 10)")
    p.add_argument("--iters", type=positive(int), default=50,
                   help="timed calls per model and batch size, split over the rounds (default 50)")
    p.add_argument("--rounds", type=positive(int), default=5,
                   help="alternating rounds of original and converted calls (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave cuDNN's algorithm search off (it is on by default, as in deployment)")
    p.add_argument("--out", action="append", default=[], metavar="FILE",
                   help="write the comparison: .md (Markdown) or .json; repeatable")
    p.set_defaults(func=run_bench)
    return p


def _models(args: argparse.Namespace, device):
    """(original, converted, record) from MODEL + recipe, or from a saved converted MODEL."""
    from ..convert import convert
    from ..record import find_record
    from .common import activity, example_input, load_model, recipe_from_args, show_progress
    from .report import is_saved_model, load_saved, rebuilt_original

    if is_saved_model(args.model):
        converted = load_saved(args.model, args.trust_factory)
        record = find_record(converted)
        if record is not None:
            if args.original is None and (args.weights or args.pretrained):
                raise SurgeryError("--weights and --pretrained are the original's: give --original MODEL with "
                                   "them (the saved converted model carries its own weights)")
            if args.recipe or args.overrides:
                raise SurgeryError(f"{args.model} is already converted: --recipe and --set do not apply")
            if args.original:
                original = load_model(args.original, pretrained=args.pretrained, weights=args.weights,
                                      trust_factories=args.trust_factory)
            else:
                original = rebuilt_original(converted, args.model, args.trust_factory)
            x = example_input(original, _size(args, record), 1, args.seed)
            return original.to(device), converted.to(device), record, x
        model = converted  # a torch.save'd original: convert it here like a named model
    else:
        if args.original:
            raise SurgeryError("--original applies to a saved converted MODEL; MODEL itself is the original here")
        model = load_model(args.model, pretrained=args.pretrained, weights=args.weights,
                           trust_factories=args.trust_factory)
    recipe = recipe_from_args(args)
    x = example_input(model, args.input_size, 1, args.seed)
    with activity(f"converting {args.model}", enabled=show_progress(args)):
        converted = convert(model, example_inputs=x, **recipe)
    return model.to(device), converted.to(device), converted.meta["fxsurgeon"], x


def _size(args: argparse.Namespace, record):
    if args.input_size:
        return args.input_size
    v = record.verification
    if v is not None and len(v.input_shapes) == 1:
        return v.input_shapes[0][1:]
    return None


def run_bench(args: argparse.Namespace) -> int:
    import sys

    import torch

    from ..bench.eager import benchmark_pair, parse_dtype, resolve_device
    from ..bench.results import write_result
    from .common import check_output, progress, show_progress

    for path in args.out:
        if not path.lower().endswith((".md", ".markdown", ".json")):
            raise SurgeryError(f"--out {path!r}: use a .md or .json file name")
        check_output(path, "--out")
    dtype = parse_dtype(args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolve_device(device)  # refuse a missing GPU before any conversion work
    if args.runtime == "onnxruntime" and (device != "cpu" or args.compile or dtype not in (None, torch.float32)
                                          or args.channels_last):
        raise SurgeryError("--runtime onnxruntime runs float32 on the CPU: use it with --device cpu and without "
                           "--compile, --dtype other than fp32 or --channels-last")
    if args.threads is not None and args.runtime == "eager":
        torch.set_num_threads(args.threads)
    model, converted, record, x = _models(args, "cpu")
    v = record.verification
    print(f"converted {record.model}: {len(record.rewrites)} rewrites, {len(record.skipped)} skipped, "
          f"parameters {record.params_before:,} → {record.params_after:,}"
          + (f", relative L2 error {v.rel_error:.3g} on a random input" if v else ""))
    settings = dict(device=device, dtype=dtype, channels_last=args.channels_last,
                    compile=args.compile or False, batch_sizes=args.batch_sizes, warmup=args.warmup,
                    iters=args.iters, cudnn_benchmark=not args.no_cudnn_benchmark)
    conversion = {
        "recipe": args.recipe, "set": list(args.overrides),
        "options": {k: str(o) for k, o in record.options.items()},
        "rewrites": len(record.rewrites), "skipped": len(record.skipped),
        "params_before": record.params_before, "params_after": record.params_after,
        "rel_error": v.rel_error if v else None,
    }
    total = args.rounds * len(args.batch_sizes)
    with progress(total, "timing (interleaved rounds)", enabled=show_progress(args), unit="round") as bar:
        if args.runtime == "onnxruntime":
            from ..bench.ort import benchmark_onnxruntime_pair

            result = benchmark_onnxruntime_pair(
                model, converted, x, rounds=args.rounds, batch_sizes=args.batch_sizes, warmup=args.warmup,
                iters=args.iters, threads=args.threads, name=record.model, conversion=conversion,
                progress=bar.update)
        else:
            result = benchmark_pair(model, converted, x, rounds=args.rounds, name=record.model, progress=bar.update,
                                    conversion=conversion, **settings)
    print(result.to_markdown())
    for w in result.warnings:
        print(f"fxsurgeon: warning: {w}", file=sys.stderr)
    for path in args.out:
        write_result(result, path)
        print(f"written to {path}")
    return 0
