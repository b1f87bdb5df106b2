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
- :func:`load_model`, :func:`example_input`, :func:`check_output`, :func:`positive`, :func:`verbosity_parent`:
  building the model a command names, its example input, refusing an unwritable output early, argparse types
  and the ``--quiet`` / ``--verbose`` parent parser. They live here rather than in :mod:`fxsurgeon.cli` so that
  :mod:`fxsurgeon.batch`, :mod:`fxsurgeon.cli.report` and :mod:`fxsurgeon.cli.bench` never import the command
  module that imports them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import SurgeryError
from ..runtime import shape_diff

__all__ = [
    "HUB_HOST",
    "MIN_FREE_BYTES",
    "MODEL_FILE_SUFFIXES",
    "Parser",
    "activity",
    "add_model_options",
    "add_recipe_options",
    "check_output",
    "device_of",
    "example_input",
    "hub_reachable",
    "load_model",
    "parse_set",
    "positive",
    "positive_int",
    "progress",
    "recipe_from_args",
    "verbosity_parent",
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

    from ..recipes import validate_recipe

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
    from ..recipe_files import resolve_recipe
    from ..recipes import load_recipe

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
    from ..bench.eager import resolve_device

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


# ------------------------------------------------------------------- shared by the fxsurgeon command and its sub-CLIs
# (they live here, not in cli.py, so batch, report_cli and bench_cli need not import the command that imports them)

#: suffixes taken as saved models: a pickled nn.Module (torch.save) or an fxsurgeon.save file
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".pkl", ".safetensors")

#: where timm's pretrained weights come from; probed before a download is tried
HUB_HOST = "huggingface.co"

#: free space below which a batch refuses to start and an --out file is refused: a result line is small, but a
#: full disk tears lines
MIN_FREE_BYTES = 16 * 2**20


def load_model(spec: str, *, pretrained: bool = False, weights: str | None = None, device: str | None = None,
               trust_factories: Sequence[str] | None = None,
               **kwargs: Any) -> torch.nn.Module:
    """A model in eval mode from a timm name, ``package.module:factory`` or a saved model file.

    Args:
        spec: ``resnet18`` (any ``timm.list_models()`` name, pretrained tags too), ``package.module:factory``
            (called with ``kwargs``), or a file: ``.safetensors`` written by ``fxsurgeon.save``, or a
            ``torch.save``-d ``nn.Module`` (``.pt`` / ``.pth``; unpickling runs code: trusted files only).
        pretrained: timm pretrained weights (from the Hugging Face hub, or its local cache when offline).
        weights: a state dict file loaded strictly (see :func:`fxsurgeon.checkpoints.read_state_dict`:
            ``module.`` prefixes and ``{"state_dict": ...}`` wrappers are handled). For a converted model
            saved by fxsurgeon, a checkpoint of the original architecture is mapped onto it
            (:func:`fxsurgeon.load_original_state_dict`).
        device: where to put the model (default: where it was built, the CPU).
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
        from ..sources import TRUST_ALL, resolve_factory

        factory = resolve_factory(spec, TRUST_ALL)  # the user named it on the command line: trusted
        if pretrained:
            raise SurgeryError(f"--pretrained applies to timm models; {spec!r} is a factory: give --weights FILE")
        try:
            model = factory(**kwargs)
        except Exception as exc:
            raise SurgeryError(f"the factory {spec!r} failed: {_first_line(exc)}; it must build the model "
                               "with no arguments (wrap it in a function that passes them)") from exc
    else:
        import timm

        if not timm.is_model(spec):
            import difflib

            close = difflib.get_close_matches(spec, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
            raise SurgeryError(
                f"{spec!r} is not a timm model, a file or 'package.module:factory'{hint}"
            )
        model = _create_timm(spec, pretrained, kwargs)
    if not isinstance(model, torch.nn.Module):
        raise SurgeryError(f"{spec!r} did not produce an nn.Module but {type(model).__name__}")
    if weights:
        _load_weights(model, weights)
    if device is not None:
        from ..bench.eager import resolve_device

        model = model.to(resolve_device(device))
    return model.eval()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """Whether ``host`` answers on port 443 within ``timeout`` seconds (DNS included, which ignores socket
    timeouts: it runs in a daemon thread that is abandoned when slow)."""
    import socket
    import threading

    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def _create_timm(name: str, pretrained: bool, kwargs: dict[str, Any]) -> torch.nn.Module:
    import timm

    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or not hub_reachable()
    with contextlib.ExitStack() as stack:
        if offline:
            # without the network the hub client retries for about a minute before failing: go straight to
            # its local cache instead (for this call only, then restored)
            from unittest import mock

            with contextlib.suppress(ImportError):
                import huggingface_hub.constants as hf_constants

                stack.enter_context(mock.patch.object(hf_constants, "HF_HUB_OFFLINE", True))
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:
            where = (f"{HUB_HOST} is unreachable and they are not in the local cache" if offline
                     else _first_line(exc))
            raise SurgeryError(f"--pretrained: cannot get the weights of {name!r}: {where}. Give a local state "
                               "dict with --weights FILE, or run once with network access to fill the cache") from exc


def _load_saved(path: str, trust_factories: Sequence[str] | None = None) -> torch.nn.Module:
    if not os.path.isfile(path):
        raise SurgeryError(f"model file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from ..io import load

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
    from ..checkpoints import load_original_state_dict, read_state_dict
    from ..record import find_record

    state = read_state_dict(path)
    have = model.state_dict()
    for key, value in have.items():
        # checkpoints from PyTorch < 0.4.1 have no BatchNorm step counters: bookkeeping, not weights
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing, unexpected, wrong = shape_diff(have, state)
    fits = not (missing or unexpected or wrong)
    if find_record(model) is not None and not fits:
        load_original_state_dict(model, state)  # a converted model given a checkpoint of its original
        return
    if not fits:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: file {list(state[k].shape)}, model "
                         f"{list(have[k].shape)})")
        raise SurgeryError(f"weights {path!r} do not fit the model: tensors " + ", ".join(parts))
    model.load_state_dict(state, strict=True)


def positive(kind):
    """An argparse ``type=`` that parses with ``kind`` (int, float) and refuses values <= 0."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            article = "an" if kind.__name__[0] in "aeiou" else "a"
            raise argparse.ArgumentTypeError(f"{text!r} is not {article} {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse


def check_output(path: str | None, what: str) -> None:
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
    if shutil.disk_usage(parent).free < MIN_FREE_BYTES:
        raise SurgeryError(f"cannot write {what} {path!r}: the disk is nearly full")


def example_input(model: torch.nn.Module, input_size: Sequence[int] | None, batch: int, seed: int = 0,
                  device: Any = None) -> torch.Tensor:
    """A seeded random batch at ``input_size`` (default: the timm config's, else 3×224×224), on ``device``."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed))
    return x if device is None else x.to(device)


def verbosity_parent() -> argparse.ArgumentParser:
    """--quiet / --verbose, accepted before or after the subcommand (SUPPRESS: the top level's value stays)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="print results and errors only: no notes, no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="more detail: every rewrite, and the traceback of an error")
    return p
