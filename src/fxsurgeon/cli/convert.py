"""``fxsurgeon convert``: convert one model (timm name, factory or saved file), print the record, optionally
write the converted model (``--out``: .safetensors, .onnx, .pt2, .pt) and a savings report.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import SurgeryError
from .common import check_output, example_input, load_model, positive, verbosity_parent

__all__ = ["add_convert_command", "note"]


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
        note(args, "calibrating on synthetic images matched to the BatchNorm statistics (about 20 s for a CIFAR model on 2 CPU threads, minutes at 224×224) ...")
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


def add_convert_command(sub) -> None:
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
