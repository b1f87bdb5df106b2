"""Write a converted model in the format its file name asks for: what ``fxsurgeon convert --out`` uses.

==================  ===========================================================================================
``.safetensors``    :func:`fxsurgeon.save`: weights plus the recipe to rebuild it; no pickled code
``.pt`` / ``.pth``  ``torch.save`` of the module (pickled fx code: load only files you trust)
``.onnx``           ``torch.onnx.export`` (the torch.export-based exporter, TorchScript's as fallback), then
                    checked in onnxruntime against the model when onnxruntime is installed
``.pt2``            ``torch.export.export`` + ``torch.export.save``: an ExportedProgram (``torch.export.load``)
==================  ===========================================================================================

The ONNX and ``.pt2`` files take inputs of the example's shape (batch size included).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError

__all__ = ["FORMATS", "format_of", "write_model"]

#: file formats by name, with the suffixes that select them
FORMATS = {"safetensors": (".safetensors",), "pt": (".pt", ".pth"), "onnx": (".onnx",), "pt2": (".pt2",)}


def format_of(path: str, explicit: str | None = None) -> str:
    """The format to write ``path`` in: ``explicit`` if given, else the one its suffix names.

    >>> format_of("small.onnx"), format_of("small.bin", "pt")
    ('onnx', 'pt')
    """
    if explicit is not None:
        if explicit not in FORMATS:
            raise SurgeryError(f"unknown model format {explicit!r}; use one of {', '.join(FORMATS)}")
        return explicit
    suffix = Path(path).suffix.lower()
    for name, suffixes in FORMATS.items():
        if suffix in suffixes:
            return name
    known = ", ".join(s for group in FORMATS.values() for s in group)
    raise SurgeryError(f"--out {path!r}: unknown model file type {suffix or '(none)'!r}; use one of {known}, "
                       "or give the format explicitly")


def _atomic(path: str, write) -> None:
    from .io import atomic_write

    # whole or not at all, with the permissions open() would give (the umask); the suffix keeps the format
    atomic_write(path, write, suffix=Path(path).suffix)


def write_model(model: nn.Module, path: str, example: torch.Tensor, *, fmt: str | None = None,
                source: Any = None) -> dict[str, Any]:
    """Write ``model`` to ``path``; returns what was written (``{"format": ..., "check": ...}``).

    Args:
        model: the converted model.
        path: the file; its suffix picks the format unless ``fmt`` is given.
        example: an input of the shape the exported model will take (ONNX, ``.pt2``).
        fmt: ``"safetensors"``, ``"pt"``, ``"onnx"`` or ``"pt2"``.
        source: for ``.safetensors``: where the original model comes from (see :func:`fxsurgeon.save`).

    Raises:
        SurgeryError: an unknown format, or an exporter that cannot handle the model (its first line).
    """
    fmt = format_of(path, fmt)
    info: dict[str, Any] = {"format": fmt, "path": str(path)}
    if fmt == "safetensors":
        from .io import save

        save(model, path, **({"source": source} if source is not None else {}))
    elif fmt == "pt":
        _atomic(path, lambda tmp: torch.save(model, tmp))
    elif fmt == "pt2":
        program = _exported(model, example)
        _atomic(path, lambda tmp: torch.export.save(program, tmp))
    else:
        info.update(_write_onnx(model, path, example))
    return info


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _exported(model: nn.Module, example: torch.Tensor):
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, (example,))
    except Exception as exc:
        raise SurgeryError(f"torch.export cannot export this model: {_first_line(exc)}; save it as .safetensors "
                           "or .pt instead") from exc


def _write_onnx(model: nn.Module, path: str, example: torch.Tensor) -> dict[str, Any]:
    errors = []
    for dynamo in (True, False):  # the torch.export-based exporter; TorchScript's when it fails
        def write(tmp: str, dynamo: bool = dynamo) -> None:
            # the exporters narrate every step on stdout and warn about constant folding: keep that out of
            # the command's output (locally: no global warning filter)
            with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), tmp, dynamo=dynamo, input_names=["input"],
                                  output_names=["output"], **({"verbose": False} if dynamo else {}))

        try:
            _atomic(path, write)
        except Exception as exc:
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {_first_line(exc)}")
            continue
        return {"exporter": "torch.onnx (dynamo)" if dynamo else "torch.onnx (torchscript)",
                "check": check_onnx(model, path, example)}
    raise SurgeryError(f"ONNX export failed: {'; '.join(errors)}")


def check_onnx(model: nn.Module, path: str, example: torch.Tensor) -> dict[str, Any] | None:
    """Run the ONNX file in onnxruntime on ``example`` and compare with ``model``; None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example.detach().cpu().numpy()}
    got = torch.from_numpy(session.run(None, feed)[0])
    with torch.no_grad():
        want = model(example)
    want = want[0] if isinstance(want, (tuple, list)) else want
    want = want.detach().cpu().float()
    err = float((got.float() - want).abs().max()) if got.shape == want.shape else float("inf")
    scale = float(want.abs().max()) or 1.0
    return {"runtime": f"onnxruntime {ort.__version__}", "max_abs_error": err, "max_abs_output": scale}
