"""The ``fxsurgeon`` command.

:func:`build_parser` assembles the subcommands, one module each in this package (``convert``, ``batch``,
``recipes``, ``report``, ``bench``), each added with one ``add_..._command(sub)`` line; their shared options
and model loading live in ``common``. Exit codes: 0 success, 1 a check failed (thresholds, models that failed in
a batch), 2 usage or input errors, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

import torch

from ..errors import SurgeryError
from .batch import add_batch_command, parse_bytes, parse_count
from .common import (  # noqa: F401  (HUB_HOST, MODEL_FILE_SUFFIXES, hub_reachable, load_model: still importable)
    HUB_HOST,
    MODEL_FILE_SUFFIXES,
    hub_reachable,
    load_model,
)
from .convert import add_convert_command
from .recipes import add_recipes_command

__all__ = ["build_parser", "main", "parse_bytes", "parse_count"]


def build_parser() -> argparse.ArgumentParser:
    from ..runtime import __version__
    from .common import Parser, verbosity_parent

    parser = Parser(prog="fxsurgeon", parents=[verbosity_parent()],
                    description="fxsurgeon: convert PyTorch models with torch.fx passes (separable convs, conv "
                                "heads, concat fusion) that keep the trained weights, then report and benchmark.",
                    epilog="exit codes: 0 success, 1 a check failed (thresholds, failed models in a batch), "
                           "2 usage or input error, 130 interrupted. `fxsurgeon COMMAND --help` for each command.")
    parser.set_defaults(quiet=False, verbose=False)
    parser.add_argument("--version", action="version", version=f"fxsurgeon {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    add_convert_command(sub)
    add_batch_command(sub)
    from .report import add_report_command

    add_report_command(sub)
    from .bench import add_bench_command

    add_bench_command(sub)
    add_recipes_command(sub)
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
