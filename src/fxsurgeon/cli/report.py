"""``fxsurgeon report``: the savings report from the command line, and the CI gate on its thresholds.

MODEL is a timm name or ``package.module:factory`` (converted here, with ``--recipe`` if given), or a model
fxsurgeon already converted and saved: a ``.pt`` / ``.pth`` file from ``torch.save`` of the GraphModule, or a
file written by ``fxsurgeon.save``. Exit codes: 0 report written and every threshold met, 1 a threshold
missed (one line per miss on stderr), 2 usage or input errors.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError

__all__ = ["add_report_command", "is_saved_model", "load_saved", "parse_fraction", "rebuilt_original", "run_report"]

_PICKLE_SUFFIXES = (".pt", ".pth")


def parse_fraction(text: str) -> float:
    """A savings threshold: ``"30%"`` or ``"0.3"`` → 0.3. A bare number above 1 is refused as ambiguous.

    >>> parse_fraction("30%"), parse_fraction("0.25"), parse_fraction("-5%")
    (0.3, 0.25, -0.05)
    """
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage (30%) or a fraction (0.3)") from None
    if not s.endswith("%") and abs(value) > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is ambiguous: write {s}% or a fraction such as 0.3")
    if value != value or value > 1:  # NaN, or more than 100% savings, can never be met
        raise argparse.ArgumentTypeError(f"{text!r}: savings cannot exceed 100%")
    return round(value, 12)


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the error bound must be ≥ 0")
    return value


def add_report_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``report`` on the ``fxsurgeon`` parser's subparsers."""
    from .common import add_model_options, add_recipe_options, verbosity_parent

    p = subparsers.add_parser(
        "report", help="parameters, MACs and fidelity of a conversion; gate CI on thresholds",
        description="Parameters, MACs per sample and output fidelity of a conversion, as a table, Markdown, "
                    "JSON or CSV, and a CI gate on thresholds. MODEL is converted here (with --recipe), or is a "
                    "converted model saved by fxsurgeon. MACs are fvcore's count: one multiply-add = 1 MAC. "
                    "Fidelity measured with random weights says nothing about a trained model: every output "
                    "says so, and --max-rel-error on random weights needs --allow-random.",
        epilog="exit codes: 0 ok, 1 a threshold missed, 2 usage or input error", parents=[verbosity_parent()])
    p.add_argument("model", help="timm name, package.module:factory, or a converted model saved by fxsurgeon")
    add_recipe_options(p)
    p.add_argument("--original", metavar="MODEL",
                   help="for a saved converted MODEL: the original (timm name, package.module:factory or a "
                        "torch.save'd .pt/.pth) to measure fidelity against, with its trained weights "
                        "(--weights or --pretrained); without it the conversion record's verification is "
                        "reported and MACs come from the rebuilt original architecture")
    add_model_options(p, role="the original model")
    p.add_argument("--allow-random", action="store_true",
                   help="measure fidelity on random weights anyway (stamped RANDOM WEIGHTS in every output)")
    p.add_argument("--batch-size", type=int, default=1, help="batch of the fidelity inputs (MACs are per sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random example input")
    p.add_argument("--format", choices=("md", "json", "table", "csv"), default=None,
                   help="output format (default: from --out's suffix .md/.json/.csv/.txt, else table)")
    p.add_argument("--out", metavar="FILE", help="write the report here instead of stdout")
    p.add_argument("--depth", type=int, default=1, help="depth of the per-module breakdown (default 1)")
    p.add_argument("--plot", action="append", metavar="FILE", default=[],
                   help="also write the per-stage chart (.png, .svg or .pdf); repeat for several")
    p.add_argument("--min-mac-savings", type=parse_fraction, metavar="PCT", help="e.g. 30%% or 0.3")
    p.add_argument("--min-param-savings", type=parse_fraction, metavar="PCT", help="e.g. 30%% or 0.3")
    p.add_argument("--max-rel-error", type=_nonneg_float, metavar="X",
                   help="relative L2 output error, e.g. 1e-3 (needs trained weights, or --allow-random)")
    p.set_defaults(func=run_report)
    return p


#: report formats by --out suffix
_SUFFIX_FORMATS = {".md": "md", ".markdown": "md", ".json": "json", ".csv": "csv", ".txt": "table"}


def _format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    if not args.out:
        return "table"
    suffix = Path(args.out).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise SurgeryError(f"--out {args.out}: cannot tell the format from {suffix or 'no suffix'!r}; give --format "
                           f"(md, json, table, csv) or use {', '.join(_SUFFIX_FORMATS)}")
    return _SUFFIX_FORMATS[suffix]


def is_saved_model(spec: str) -> bool:
    """Whether ``spec`` names a saved (converted) model file rather than an architecture."""
    path = Path(spec)
    return path.suffix.lower() in (*_PICKLE_SUFFIXES, ".safetensors") or path.is_file()


def load_saved(spec: str, trust: list[str] | None = None) -> nn.Module:
    """A converted model from a torch.save'd ``.pt`` / ``.pth`` file or a file written by ``fxsurgeon.save``."""
    path = Path(spec)
    if not path.is_file():
        raise SurgeryError(f"no such file: {spec}")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        try:
            # a pickled GraphModule carries the code fx generated: only load files you trust
            model = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise SurgeryError(f"cannot load {spec} with torch.load: {type(exc).__name__}: {exc}") from exc
    else:
        from .. import io as fxio

        if not hasattr(fxio, "load"):
            raise SurgeryError(f"{spec}: not a .pt/.pth file, and this fxsurgeon cannot read other formats")
        model = fxio.load(path, trust_factories=trust or [])
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"{spec} holds a {type(model).__name__}, not a model (save the whole model, not a state_dict)")
    return model.eval()


def _record(model: nn.Module):
    from ..record import get_record

    try:
        return get_record(model)
    except SurgeryError:
        return None


def rebuilt_original(converted: nn.Module, spec: str, trust: list[str] | None = None) -> nn.Module:
    """The original architecture of a saved converted model, from its record (weights random: MACs only)."""
    rec = _record(converted)
    if rec is None:
        raise SurgeryError(f"{spec} carries no fxsurgeon record: pass --original to say what it was converted from")
    source = getattr(rec, "source", None)
    if source:
        from ..rebuild import build_original

        return build_original(source, trust_factories=trust or []).eval()
    import timm

    if timm.is_model(rec.model):
        return timm.create_model(rec.model, pretrained=False).eval()
    raise SurgeryError(f"{spec} was converted from {rec.model!r}, which fxsurgeon cannot rebuild: pass --original")


def _input_size(args: argparse.Namespace, *models: nn.Module) -> tuple[int, ...]:
    if args.input_size:
        return tuple(args.input_size)
    for m in models:
        rec = _record(m)
        if rec is not None and rec.verification is not None and len(rec.verification.input_shapes) == 1:
            return tuple(rec.verification.input_shapes[0][1:])
    for m in models:
        cfg = getattr(m, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return tuple(cfg["input_size"])
    return (3, 224, 224)


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse bad output paths before any work starts."""
    from ..report.plot import FORMATS

    for path in [args.out, *args.plot]:
        if not path:
            continue
        parent = Path(path).resolve().parent
        if Path(path).is_dir():
            raise SurgeryError(f"cannot write {path}: it is a folder; give a file name")
        if not parent.is_dir():
            raise SurgeryError(f"cannot write {path}: folder {str(Path(path).parent)!r} does not exist")
        try:  # a real write: permission bits say little to root or on read-only mounts
            fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", dir=parent)
            os.close(fd)
            os.unlink(tmp)
        except OSError as exc:
            raise SurgeryError(f"cannot write {path}: {exc.strerror or exc}") from exc
    for path in args.plot:
        if Path(path).suffix.lower() not in FORMATS:
            raise SurgeryError(f"--plot {path}: unknown format {Path(path).suffix!r}; use one of {FORMATS}")
    if args.depth < 0 or args.batch_size < 1 or (args.input_size and min(args.input_size) < 1):
        raise SurgeryError("--depth must be ≥ 0, --batch-size and --input-size ≥ 1")


def _write(path: str, text: str) -> None:
    """Write atomically: a failed run never leaves a half-written report where the old one was."""
    from ..io import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))  # honours the umask


def _original_spec(args: argparse.Namespace) -> nn.Module:
    from .common import load_model

    if is_saved_model(args.original):
        if args.weights or args.pretrained:
            raise SurgeryError(f"--original {args.original} is a saved model with its weights: --weights and "
                               "--pretrained do not apply to it")
        return load_saved(args.original, args.trust_factory)
    return load_model(args.original, pretrained=args.pretrained, weights=args.weights,
                      trust_factories=args.trust_factory)


def _random_gate(args: argparse.Namespace, weights: str) -> None:
    """Fidelity gates on random weights pass for free (zero-initialised branches): a usage error."""
    if weights == "random" and args.max_rel_error is not None and not args.allow_random:
        raise SurgeryError("--max-rel-error on random weights gates nothing (fresh residual branches can give 0 "
                           "error for free): give the original's trained weights (--weights FILE or --pretrained), "
                           "or --allow-random to run the gate anyway")


def run_report(args: argparse.Namespace) -> int:
    """The ``report`` subcommand: build or load, count, render, gate."""
    from ..convert import convert
    from ..report.savings import savings
    from .common import activity, device_of, load_model, recipe_from_args, show_progress, weights_kind

    _check_outputs(args)
    fmt = _format(args)
    device = device_of(args)
    saved = is_saved_model(args.model)
    if saved:
        if args.recipe or args.overrides:
            raise SurgeryError("--recipe applies to an original MODEL (so does --set); this one is already converted")
        if args.original is None and (args.weights or args.pretrained):
            raise SurgeryError("--weights and --pretrained are the original's: give --original MODEL with them "
                               "(the saved converted model carries its own weights)")
        measured = args.original is not None
        if measured:
            weights = weights_kind(args, args.original)
            if weights == "random" and not args.allow_random:
                raise SurgeryError(
                    f"--original {args.original} without weights would be compared as a freshly randomised "
                    "model: give its trained weights (--weights FILE or --pretrained), leave --original out "
                    "to report the conversion record's own verification, or --allow-random")
            _random_gate(args, weights)
        converted = load_saved(args.model, args.trust_factory)
        if measured:
            original = _original_spec(args)
        else:
            original = rebuilt_original(converted, args.model, args.trust_factory)
            rec = _record(converted)
            # the record's verification was measured with the weights the conversion had
            weights = (rec.extras.get("weights") if rec is not None else None) or "unknown"
            _random_gate(args, weights)
        size = _input_size(args, converted, original)
    else:
        if args.original:
            raise SurgeryError("--original applies to a saved converted MODEL; MODEL itself is the original here")
        weights = weights_kind(args, args.model)
        _random_gate(args, weights)
        kwargs = recipe_from_args(args)
        original = load_model(args.model, pretrained=args.pretrained, weights=args.weights,
                              trust_factories=args.trust_factory)
        measured = True
        size = _input_size(args, original)
    original = original.to(device)
    x = torch.randn(args.batch_size, *size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    if not saved:
        with activity(f"converting {args.model}", enabled=show_progress(args)):
            converted = convert(original, example_inputs=x, **kwargs)
    converted = converted.to(device)
    report = savings(original, converted, x, depth=args.depth, measure_fidelity=measured, weights=weights)
    if report.random_weights and not args.quiet and (args.out or fmt == "json"):
        print("fxsurgeon: note: RANDOM WEIGHTS: the fidelity figures say nothing about a trained model",
              file=sys.stderr)

    text = {"md": report.to_markdown, "json": report.to_json, "table": report.to_table,
            "csv": lambda: report.to_csv(header=True)}[fmt]()
    text = text if text.endswith("\n") else text + "\n"
    if args.out:
        _write(args.out, text)
    else:
        sys.stdout.write(text)
    for path in args.plot:
        report.plot(path)

    fails = report.check(min_mac_savings=args.min_mac_savings, min_param_savings=args.min_param_savings,
                         max_rel_error=args.max_rel_error)
    for line in fails:
        print(f"fxsurgeon: threshold missed: {line}", file=sys.stderr)
    return 1 if fails else 0
