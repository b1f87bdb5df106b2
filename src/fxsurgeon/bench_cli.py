"""``fxsurgeon bench``: convert a model, then time the original and the converted side by side.

MODEL is a timm name or ``package.module:factory``; it is converted with ``--recipe`` (``convert()``'s
defaults without one) on a random input, then both models are benchmarked in the same configuration and
the table shows each batch size's median and p90 latency, throughput, peak memory and the speed-up
(original / converted latency). Exit codes: 0 done, 2 usage or input errors.
"""

from __future__ import annotations

import argparse
from typing import Any

from .errors import SurgeryError

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
    from .cli import _positive

    p = subparsers.add_parser(
        "bench", help="time the original and the converted model side by side (CUDA or CPU)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("model", help="timm name or package.module:factory")
    p.add_argument("--recipe", help="recipe YAML for the conversion (default: convert()'s defaults)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16: the models are cast to it")
    p.add_argument("--channels-last", action="store_true", help="run models and inputs in channels_last")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile both models first (optionally a mode, e.g. max-autotune)")
    p.add_argument("--runtime", choices=("eager", "onnxruntime"), default="eager",
                   help="eager PyTorch (default; with --compile, torch.compile) or onnxruntime on the CPU "
                        "(both models exported to ONNX; --threads sets its intra-op threads)")
    p.add_argument("--threads", type=_positive(int), default=None,
                   help="CPU threads (torch.set_num_threads, or onnxruntime's intra-op threads)")
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=[1], metavar="B1,B2",
                   help="comma-separated batch sizes (default 1)")
    p.add_argument("--warmup", type=_positive(int), default=10, help="untimed calls per batch size (default 10)")
    p.add_argument("--iters", type=_positive(int), default=50, help="timed calls per batch size (default 50)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size (default: the model's pretrained_cfg, else 3 224 224)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")
    p.add_argument("--weights", help="a state dict to load into MODEL first (.safetensors / .pt)")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave cuDNN's algorithm search off (it is on by default, as in deployment)")
    p.add_argument("--out", action="append", default=[], metavar="FILE",
                   help="write the comparison: .md (Markdown) or .json; repeatable")
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import benchmark, compare, parse_dtype, resolve_device, write_result
    from .cli import _check_output, _example_input, load_model
    from .convert import convert

    for path in args.out:
        if not path.lower().endswith((".md", ".markdown", ".json")):
            raise SurgeryError(f"--out {path!r}: use a .md or .json file name")
        _check_output(path, "--out")
    dtype = parse_dtype(args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolve_device(device)  # refuse a missing GPU before any conversion work
    if args.runtime == "onnxruntime" and (device != "cpu" or args.compile or dtype not in (None, torch.float32)
                                          or args.channels_last):
        raise SurgeryError("--runtime onnxruntime runs float32 on the CPU: use it with --device cpu and without "
                           "--compile, --dtype other than fp32 or --channels-last")
    if args.threads is not None and args.runtime == "eager":
        torch.set_num_threads(args.threads)
    recipe: dict[str, Any] = {}
    if args.recipe:
        from .recipes import load_recipe

        recipe = load_recipe(args.recipe)
    model = load_model(args.model, weights=args.weights)
    if isinstance(getattr(model, "meta", None), dict) and "fxsurgeon" in model.meta:
        raise SurgeryError(f"{args.model} is already converted; bench takes the original model and a recipe")
    x = _example_input(model, args.input_size, 1, args.seed)
    converted = convert(model, example_inputs=x, **recipe)
    record = converted.meta["fxsurgeon"]
    v = record.verification
    print(f"converted {record.model}: {len(record.rewrites)} rewrites, {len(record.skipped)} skipped, "
          f"parameters {record.params_before:,} → {record.params_after:,}"
          + (f", relative L2 error {v.rel_error:.3g} on a random input" if v else ""))
    settings = dict(device=device, dtype=dtype, channels_last=args.channels_last,
                    compile=args.compile or False, batch_sizes=args.batch_sizes, warmup=args.warmup,
                    iters=args.iters, cudnn_benchmark=not args.no_cudnn_benchmark)
    if args.runtime == "onnxruntime":
        from .bench_ort import benchmark_onnxruntime

        ort = dict(batch_sizes=args.batch_sizes, warmup=args.warmup, iters=args.iters, threads=args.threads)
        original = benchmark_onnxruntime(model, x, name=record.model, **ort)
        after = benchmark_onnxruntime(converted, x, name=record.model, **ort)
    else:
        original = benchmark(model, x, name=record.model, **settings)
        del model  # the original's benchmark copy is gone; free its weights before timing the converted one
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        after = benchmark(converted, x, name=record.model, **settings)
    result = compare(original, after, conversion={
        "recipe": args.recipe, "options": {k: str(o) for k, o in record.options.items()},
        "rewrites": len(record.rewrites), "skipped": len(record.skipped),
        "params_before": record.params_before, "params_after": record.params_after,
        "rel_error": v.rel_error if v else None,
    })
    print(result.to_markdown())
    for path in args.out:
        write_result(result, path)
        print(f"written to {path}")
    return 0
