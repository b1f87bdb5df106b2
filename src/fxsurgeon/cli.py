"""The ``fxsurgeon`` command.

Subcommands register here; each lives in the module of the feature it drives and only its argument parsing
sits in this file (or in a ``*_cli`` module next to the feature, added with one ``add_..._command(sub)``
line in :func:`build_parser`). Exit codes: 0 success, 1 a check failed (thresholds, models that failed in
a batch), 2 usage or input errors, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import SurgeryError

__all__ = ["add_trust_factory_argument", "build_parser", "load_model", "main", "parse_bytes", "parse_count"]

#: suffixes taken as saved models: a pickled nn.Module (torch.save) or an fxsurgeon.save file
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".pkl", ".safetensors")


def add_trust_factory_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-factory PATTERN`` (repeatable): factories a saved ``.safetensors`` file may name."""
    parser.add_argument("--trust-factory", action="append", default=[], metavar="PATTERN",
                        help="a model factory a saved .safetensors file may name beyond timm, fxsurgeon.models and "
                             "torchvision: 'package.module:function' or 'package.module:*' (repeatable)")


def load_model(spec: str, *, pretrained: bool = False, weights: str | None = None,
               trust_factories: Sequence[str] | None = None, **kwargs: Any) -> torch.nn.Module:
    """A model in eval mode from a timm name, ``package.module:factory`` or a saved model file.

    Args:
        spec: ``resnet18`` (any ``timm.list_models()`` name, pretrained tags too), ``package.module:factory``
            (called with ``kwargs``), or a file: ``.safetensors`` written by ``fxsurgeon.save``, or a
            ``torch.save``-d ``nn.Module`` (``.pt`` / ``.pth``; unpickling runs code: trusted files only).
        pretrained: timm pretrained weights (needs the hub).
        weights: a state dict (``.safetensors``, or ``.pt`` / ``.pth`` holding tensors) loaded strictly.
        trust_factories: factories a saved ``.safetensors`` file may name (see :func:`fxsurgeon.load`).
        **kwargs: passed to ``timm.create_model`` or the factory (e.g. ``img_size=64``).

    >>> model = load_model("fxsurgeon.models:resnet20")
    >>> type(model).__name__, model.training
    ('CifarResNet', False)
    """
    if os.path.isfile(spec) or spec.endswith(MODEL_FILE_SUFFIXES):
        if kwargs or pretrained:
            raise SurgeryError(f"{spec} is a saved model: --pretrained and build options do not apply to it")
        model = _load_saved(spec, trust_factories)
    elif ":" in spec:
        import importlib

        mod_name, _, attr = spec.partition(":")
        try:
            factory: Any = importlib.import_module(mod_name)
            for part in attr.split("."):
                factory = getattr(factory, part)
        except (ImportError, AttributeError) as exc:
            raise SurgeryError(f"cannot import {spec!r}: {type(exc).__name__}: {exc}") from exc
        model = factory(**kwargs)
    else:
        import timm

        if not timm.is_model(spec):
            import difflib

            close = difflib.get_close_matches(spec, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
            raise SurgeryError(
                f"{spec!r} is not a timm model, a file or 'package.module:factory'{hint}"
            )
        model = timm.create_model(spec, pretrained=pretrained, **kwargs)
    if not isinstance(model, torch.nn.Module):
        raise SurgeryError(f"{spec!r} did not produce an nn.Module but {type(model).__name__}")
    if weights:
        _load_weights(model, weights)
    return model.eval()


def _load_saved(path: str, trust_factories: Sequence[str] | None = None) -> torch.nn.Module:
    if not os.path.isfile(path):
        raise SurgeryError(f"model file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from .io import load

        return load(path, trust_factories=list(trust_factories or []))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SurgeryError(f"cannot load model file {path!r} with torch.load: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict):
        raise SurgeryError(
            f"{path!r} holds a state dict, not a model: give the architecture as MODEL and this file as --weights"
        )
    if not isinstance(obj, torch.nn.Module):
        raise SurgeryError(f"{path!r} holds a {type(obj).__name__}, not an nn.Module")
    return obj


def _load_weights(model: torch.nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise SurgeryError(f"weights file {path!r} does not exist")
    try:  # a file that is no checkpoint (e.g. /etc/passwd) is a bad input, not a crash
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
    except Exception as exc:
        raise SurgeryError(f"--weights {path!r} is not a readable checkpoint (.safetensors, or .pt/.pth holding "
                           f"tensors): {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise SurgeryError(f"--weights {path!r} holds a {type(state).__name__}, not a state dict of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SurgeryError(f"weights {path!r} do not fit the model: {exc}") from exc


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


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse


def _check_output(path: str | None, what: str) -> None:
    """Refuse an output we could not write before any work starts; nothing is created here."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise SurgeryError(f"{what} {path!r} is a directory; give a file name")
    parent = p.resolve().parent
    if not parent.is_dir():
        raise SurgeryError(f"cannot write {what} {path!r}: folder {str(p.parent)!r} does not exist")
    try:  # a real write, not os.access: root passes access checks on read-only file systems
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise SurgeryError(f"cannot write {what} {path!r}: {exc.strerror or exc}") from exc
    from .batch import MIN_FREE_BYTES

    if shutil.disk_usage(parent).free < MIN_FREE_BYTES:
        raise SurgeryError(f"cannot write {what} {path!r}: the disk is nearly full")


def _example_input(model: torch.nn.Module, input_size: Sequence[int] | None, batch: int, seed: int = 0) -> torch.Tensor:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
    return torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed))


def _save_model(converted: torch.nn.Module, path: str, spec: str) -> None:
    """``.safetensors`` → ``fxsurgeon.save`` (weights + recipe, no pickle); else ``torch.save`` of the module."""
    target = Path(path)
    if target.suffix == ".safetensors":
        from .io import save

        source = spec if (":" in spec or not os.path.isfile(spec)) else None
        save(converted, path, **({"source": source} if source else {}))
        return
    from .io import atomic_write

    atomic_write(target, lambda tmp: torch.save(converted, tmp))  # whole or not at all; honours the umask


def _write_text(path: str, text: str) -> None:
    from .io import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text if text.endswith("\n") else text + "\n",
                                                        encoding="utf-8"))


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert
    from .record import get_record, summary

    _check_output(args.out, "--out")
    _check_output(args.report, "--report")
    recipe: dict[str, Any] = {}
    if args.recipe:
        from .recipes import load_recipe

        recipe = load_recipe(args.recipe)
    torch.manual_seed(args.seed)  # random-init models come out the same on every run
    model = load_model(args.model, pretrained=args.pretrained, weights=args.weights,
                       trust_factories=args.trust_factory)
    x = _example_input(model, args.input_size, args.batch_size, args.seed)
    if args.synthetic_calibration:
        recipe = {**recipe, "calibration": "synthetic"}
    converted = convert(model, example_inputs=x, **recipe)
    print(summary(converted))
    extras = get_record(converted).extras
    synthetic = extras.get("synthetic_calibration")
    if synthetic:
        calib = extras.get("calibration") or {}
        print(f"  calibration: {synthetic['images']} synthetic images ({synthetic['seconds']:.0f} s), output error "
              f"on them {calib.get('output_error_before', float('nan')):.4g} → "
              f"{calib.get('output_error_after', float('nan')):.4g}")
    from .report import savings

    # the full report only when asked for; the savings line needs the two MAC counts alone
    report = savings(model, converted, x) if args.report else None
    if not args.no_savings:
        try:
            counted = report or savings(model, converted, x, measure_fidelity=False, torch_cross_check=False)
        except SurgeryError as exc:
            print(f"  savings: not counted ({exc})")
        else:
            print(f"  savings: parameters {_change(counted.params_before, counted.params_after)}, MACs "
                  f"{_change(counted.macs_before, counted.macs_after)} (fvcore: one multiply-add = 1 MAC)")
    _warn_silenced(model, args)
    if report is not None:
        text = report.to_json() if args.report.endswith(".json") else report.to_markdown()
        _write_text(args.report, text)
        print(f"report written to {args.report}")
    if args.out:
        _save_model(converted, args.out, args.model)
        print(f"converted model saved to {args.out}")
    return 0


def _change(before: int, after: int) -> str:
    rel = f" ({after / before - 1:+.1%})" if before else ""
    return f"{before:,} → {after:,}{rel}"


def _warn_silenced(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """Say when the verification above is blind to part of the model (fresh timm weights zero some branches)."""
    if args.pretrained or args.weights:
        return
    from .batch import silencing_params

    names = silencing_params(model)
    if names:
        print(f"  note: {len(names)} scaling parameters of this model are zero (e.g. {names[0]}): fresh "
              "weights silence the branches behind them, so the error above cannot show what happens there. "
              "Use --pretrained or --weights for a meaningful error (`fxsurgeon batch` randomises them).")


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert one model and print what changed",
        description="Convert one model with a recipe, print every rewrite and skip, verify it against the "
                    "original on a random input, and optionally save it and a savings report.",
    )
    p.add_argument("model", nargs="?", default="resnet18",
                   help="timm name, package.module:factory, or a saved model file (default: resnet18)")
    p.add_argument("--recipe", help="recipe YAML (see recipes/); default: convert()'s defaults")
    p.add_argument("--out", help="save the converted model: .safetensors (fxsurgeon.save) or .pt (torch.save)")
    p.add_argument("--report", help="write the savings report here (.md, or .json)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="example input size (default: the model's pretrained_cfg, else 3 224 224)")
    p.add_argument("--batch-size", type=_positive(int), default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and example input")
    p.add_argument("--pretrained", action="store_true", help="timm pretrained weights (downloads them)")
    p.add_argument("--weights", help="a state dict to load into MODEL first (.safetensors / .pt)")
    add_trust_factory_argument(p)
    p.add_argument("--no-savings", action="store_true", help="do not count MACs for the savings line")
    p.add_argument("--synthetic-calibration", action="store_true",
                   help="calibrate without data: on images made to match the model's BatchNorm statistics "
                        "(convert(calibration='synthetic'); meaningful with trained --weights or --pretrained)")
    p.set_defaults(func=_cmd_convert)


def _cmd_batch(args: argparse.Namespace) -> int:
    from .batch import expand_models, run_batch

    recipe: dict[str, Any] = {}
    if args.recipe:
        from .recipes import load_recipe

        recipe = load_recipe(args.recipe)
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
        force=args.force,
        retry_failed=args.retry_failed, dask_scheduler=args.dask_scheduler, progress=not args.no_progress,
    )
    results = outcome.results
    print(f"fxsurgeon batch: {len(outcome.ran)} run ({len(models) - len(outcome.ran)} already in {args.out}); "
          f"of {len(models)} models: {sum(r['status'] == 'ok' for r in results)} ok, "
          f"{sum(r['status'] == 'skipped' for r in results)} skipped, {len(outcome.failed)} failed"
          + (f"; summary in {args.summary}" if args.summary else ""))
    return 1 if outcome.failed else 0


def _add_batch(sub) -> None:
    p = sub.add_parser(
        "batch", help="convert many timm models, each in its own process",
        description="Convert every model matching the patterns (timm.list_models), each in its own process, "
                    "appending one JSON line per model to --out. Rerunning skips models already there. "
                    "Exit 1 when a model failed or timed out, 2 on usage errors.",
    )
    p.add_argument("patterns", nargs="+", metavar="PATTERN",
                   help="timm.list_models pattern (resnet*), model name, package.module:factory or a file")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="leave these out (repeatable)")
    p.add_argument("--recipe", help="recipe YAML applied to every model")
    p.add_argument("--out", help="results, one JSON line per model (appended; required)")
    p.add_argument("--summary", help="write a Markdown summary here")
    p.add_argument("--max-params", type=parse_count, metavar="N", help="skip larger models, e.g. 200M")
    p.add_argument("--workers", type=_positive(int), default=1, help="models at a time (default 1)")
    p.add_argument("--timeout", type=_positive(float), default=600.0, metavar="S",
                   help="seconds per model before its processes are killed (default 600)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="one input size for all (default: --image-size when the model runs at it, else its own)")
    p.add_argument("--image-size", type=_positive(int), default=64, help="small input tried first (default 64)")
    p.add_argument("--batch-size", type=_positive(int), default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive(int), help="torch threads per model (default: CPUs / workers)")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="print the models the patterns select and exit")
    p.set_defaults(func=_cmd_batch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxsurgeon", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_batch(sub)
    from .report_cli import add_report_command

    add_report_command(sub)
    from .bench_cli import add_bench_command

    add_bench_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SurgeryError as exc:
        print(f"fxsurgeon: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxsurgeon: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
