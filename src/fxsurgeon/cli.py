"""The ``fxsurgeon`` command.

Subcommands register here; each lives in the module of the feature it drives and only its argument parsing
sits in this file. Exit codes: 0 success, 1 a check failed (thresholds), 2 usage or input errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .errors import SurgeryError

__all__ = ["build_parser", "load_model", "main"]


def load_model(spec: str, *, pretrained: bool = False) -> torch.nn.Module:
    """A model from a timm name (``resnet18``) or ``package.module:factory``, in eval mode."""
    if ":" in spec:
        import importlib

        mod_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise SurgeryError(f"cannot import {spec!r}: {exc}") from exc
        model = factory()
    else:
        import timm

        if spec not in timm.list_models() and not timm.is_model(spec):
            raise SurgeryError(f"unknown timm model {spec!r} (see timm.list_models())")
        model = timm.create_model(spec, pretrained=pretrained)
    if not isinstance(model, torch.nn.Module):
        raise SurgeryError(f"{spec!r} did not produce an nn.Module but {type(model).__name__}")
    return model.eval()


def _example_input(model: torch.nn.Module, input_size: Sequence[int] | None, batch: int) -> torch.Tensor:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
    return torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0))


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    model = load_model(args.model)
    x = _example_input(model, args.input_size, args.batch_size)
    converted = convert(model, example_inputs=x)
    from .record import summary

    print(summary(converted))
    if args.out:
        torch.save(converted, args.out)
        print(f"saved to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxsurgeon", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert a model and print what changed")
    p.add_argument("model", nargs="?", default="resnet18", help="timm name or package.module:factory")
    p.add_argument("--out", help="save the converted model here (torch.save)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    p.add_argument("--batch-size", type=int, default=1)
    p.set_defaults(func=_cmd_convert)
    from .report_cli import add_report_command

    add_report_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SurgeryError as exc:
        print(f"fxsurgeon: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
