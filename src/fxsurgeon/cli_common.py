"""What the ``fxsurgeon`` subcommands share, so that the same flag means the same thing everywhere.

- :func:`add_model_options`: ``--weights``, ``--pretrained``, ``--device``, ``--input-size`` for every
  subcommand that builds a model;
- :func:`add_recipe_options` / :func:`recipe_from_args`: ``--recipe NAME|FILE`` (a shipped recipe by name, or
  a YAML file) and ``--set pass.option=value``, validated by :func:`fxsurgeon.recipes.validate_recipe`, the
  code path recipe files take;
- :func:`weights_kind`: what the weights of a model built from the command line are (``random`` is stamped on
  every output made from them);
- :class:`Parser`: argparse with one-line usage errors (exit 2) and help text free of reST markup;
- :func:`progress`: a tqdm bar on stderr, off with ``--quiet`` or when stderr is not a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from .errors import SurgeryError

__all__ = [
    "Parser",
    "activity",
    "add_model_options",
    "add_recipe_options",
    "device_of",
    "parse_set",
    "positive_int",
    "progress",
    "recipe_from_args",
    "weights_kind",
]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``fxsurgeon convert: error: ... (see fxsurgeon convert --help)``, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An int ≥ 1; ``"-5"`` and ``"x"`` are one-line argparse errors.

    >>> positive_int("32")
    32
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be ≥ 1")
    return value


def add_model_options(p: argparse.ArgumentParser, *, role: str = "MODEL", device_default: str = "cpu") -> None:
    """``--weights``, ``--pretrained``, ``--device``, ``--input-size`` and ``--trust-factory``, worded the same in every subcommand."""
    p.add_argument("--weights", metavar="FILE",
                   help=f"a state dict or checkpoint to load into {role} (.safetensors, .pt, .pth); "
                        "'module.' prefixes (DataParallel/DDP) and {'state_dict': ...} wrappers are handled")
    p.add_argument("--pretrained", action="store_true",
                   help=f"timm pretrained weights for {role} (from the Hugging Face hub or its local cache)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help=f"cpu, cuda or cuda:N (default: {device_default})")
    p.add_argument("--input-size", type=positive_int, nargs=3, metavar=("C", "H", "W"),
                   help="example input size (default: the model's pretrained_cfg, else 3 224 224)")
    p.add_argument("--trust-factory", action="append", default=[], metavar="PATTERN",
                   help="a model factory a saved .safetensors file may name beyond timm, fxsurgeon.models and "
                        "torchvision: 'package.module:function' or 'package.module:*' (repeatable)")


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    """``--recipe NAME|FILE`` and repeatable ``--set pass.option=value``."""
    p.add_argument("--recipe", metavar="NAME|FILE",
                   help="a shipped recipe by name (see `fxsurgeon recipes`) or a recipe YAML file "
                        "(default: convert()'s defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PASS.OPTION=VALUE",
                   help="set one recipe entry, e.g. separable.multiplier=2 or conv_head=true (YAML values; "
                        "repeatable; applied after --recipe and checked like a recipe file)")


_YAML11_BOOLS = {"yes", "no", "y", "n", "on", "off"}


def parse_set(text: str) -> dict[str, Any]:
    """``"separable.multiplier=2"`` → ``{"separable": {"multiplier": 2}}``, validated like a recipe file.

    The value is read as YAML (``true``, ``2``, ``0.5``, ``full``, ``[3, 5]``); a key without a dot is a
    top-level recipe key (``conv_head=true``, ``tolerance=1e-3``).

    >>> parse_set("separable.multiplier=2"), parse_set("conv_head=true")
    ({'separable': {'multiplier': 2}}, {'conv_head': True})
    """
    import yaml

    from .recipes import validate_recipe

    key, eq, raw = str(text).partition("=")
    key = key.strip()
    if not eq or not key or key.startswith(".") or key.endswith("."):
        raise SurgeryError(f"--set {text!r}: expected PASS.OPTION=VALUE (e.g. separable.multiplier=2) "
                           "or KEY=VALUE (e.g. conv_head=true)")
    try:
        if raw.strip().lower() in _YAML11_BOOLS:
            value: Any = raw.strip()  # YAML 1.1 reads yes/no/on/off as bools: only true/false are, here
        else:
            value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise SurgeryError(f"--set {text!r}: the value is not valid YAML: {exc}") from exc
    name, dot, option = key.partition(".")
    data: dict[str, Any] = {name: {option: value}} if dot else {name: value}
    return validate_recipe(data, source=f"--set {text!r}")


def recipe_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """convert() keywords from ``--recipe`` (shipped name or file) then every ``--set``, each validated."""
    from .recipe_files import resolve_recipe
    from .recipes import load_recipe

    recipe: dict[str, Any] = load_recipe(resolve_recipe(args.recipe)) if getattr(args, "recipe", None) else {}
    for text in getattr(args, "overrides", None) or []:
        for key, value in parse_set(text).items():
            if isinstance(value, dict):
                before = recipe.get(key)
                # an option set on a pass turns it on, with the recipe's other options for it kept
                recipe[key] = {**(before if isinstance(before, dict) else {}), **value}
            else:
                recipe[key] = value
    return recipe


def weights_kind(args: argparse.Namespace, spec: str | None = None) -> str:
    """``"pretrained"``, ``"checkpoint"`` (--weights, or a saved model file) or ``"random"``."""
    if getattr(args, "pretrained", False):
        return "pretrained"
    if getattr(args, "weights", None):
        return "checkpoint"
    if spec is not None and os.path.isfile(spec):
        return "checkpoint"
    return "random"


def device_of(args: argparse.Namespace, default: str = "cpu"):
    """The ``--device`` as a checked ``torch.device`` (a missing GPU is a one-line error before any work)."""
    from .bench import resolve_device

    return resolve_device(getattr(args, "device", None) or default)


def show_progress(args: argparse.Namespace | None = None) -> bool:
    """Progress bars only for a person watching: not with ``--quiet``, not when stderr is a pipe or file."""
    if args is not None and getattr(args, "quiet", False):
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


@contextlib.contextmanager
def progress(total: int | None, desc: str, *, enabled: bool, unit: str = "it") -> Iterator[Any]:
    """A tqdm bar on stderr (``bar.update(n)``), or a do-nothing stand-in when ``enabled`` is False."""
    if not enabled:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def activity(desc: str, *, enabled: bool, interval: float = 0.5) -> Iterator[None]:
    """An elapsed-time line on stderr while a long step whose length is unknown runs (conversion with budget
    allocation or calibration can take minutes): a tqdm bar without a total, ticked by a daemon thread."""
    if not enabled:
        yield
        return
    import threading

    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", file=sys.stderr, leave=False)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


def iterate(items: Iterable[Any], desc: str, *, enabled: bool, total: int | None = None) -> Iterator[Any]:
    """``items`` with a progress bar when ``enabled``."""
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
