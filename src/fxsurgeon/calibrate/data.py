"""Calibration data: batches of positional inputs, running models on them, and relative output errors."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError
from ..runtime import device_of, to_device

__all__ = [
    "StopForward", "as_batches", "check_batches", "forward_batch", "output_error", "rel_error_of_outputs",
    "sample_count", "synthetic_calibration",
]


def as_batches(calibration: Any) -> list[tuple]:
    """Calibration data → a list of batches, each a tuple of positional inputs.

    A tensor is one batch; otherwise an iterable whose items are tensors or tuples/lists of positional
    inputs (a ``DataLoader`` yielding ``(images, labels)`` must be mapped to the images first).

    >>> [b[0].shape for b in as_batches(torch.zeros(4, 3))]
    [torch.Size([4, 3])]
    """
    if calibration is None:
        raise SurgeryError("calibration data is None")
    if isinstance(calibration, torch.Tensor):
        return [(calibration,)]
    if isinstance(calibration, (str, bytes, dict)) or not isinstance(calibration, Iterable):
        raise SurgeryError(
            f"calibration= takes a tensor (one batch) or an iterable of batches, got {type(calibration).__name__}"
        )
    out = []
    for i, item in enumerate(calibration):
        if isinstance(item, torch.Tensor):
            out.append((item,))
        elif isinstance(item, (tuple, list)) and item:
            out.append(tuple(item))
        else:
            raise SurgeryError(
                f"calibration batch {i} is a {type(item).__name__}; each batch must be a tensor or a tuple of "
                "positional inputs"
            )
    if not out:
        raise SurgeryError("calibration data is empty")
    return out


def forward_batch(model: nn.Module, batch: tuple, what: str) -> Any:
    try:
        return model(*batch)
    except StopForward:
        raise
    except Exception as exc:
        hint = ""
        if len(batch) == 2 and isinstance(batch[1], torch.Tensor) and not batch[1].is_floating_point():
            hint = " The batch looks like (inputs, labels): pass the inputs only, e.g. (x for x, _ in loader)."
        raise SurgeryError(f"calibration: {what} failed on a calibration batch: {type(exc).__name__}: {exc}.{hint}") from exc


def output_error(model: nn.Module, reference: nn.Module, batches: Sequence[tuple]) -> float:
    """Relative L2 error ``||f(x) − g(x)|| / ||g(x)||`` of ``model`` against ``reference`` over all batches."""
    from torch.utils._pytree import tree_flatten

    dev = device_of(model)
    d2 = r2 = 0.0
    with torch.no_grad():
        for b in batches:
            b = to_device(b, dev)
            out, _ = tree_flatten(forward_batch(model, b, "the converted model"))
            ref, _ = tree_flatten(forward_batch(reference, b, "the original model"))
            for o, r in zip(out, ref):
                if isinstance(r, torch.Tensor) and r.is_floating_point():
                    d2 += float((o.double() - r.double()).pow(2).sum())
                    r2 += float(r.double().pow(2).sum())
    return math.sqrt(d2 / r2) if r2 > 0 else (0.0 if d2 == 0 else math.inf)


class StopForward(Exception):
    """Raised by a hook once everything needed from this forward is captured: the rest is not run."""


def sample_count(batches: Sequence[tuple]) -> int:
    return sum(int(b[0].shape[0]) if isinstance(b[0], torch.Tensor) and b[0].dim() else 1 for b in batches)


def rel_error_of_outputs(outputs: Sequence[Any], references: Sequence[Any]) -> float:
    """Relative L2 error over all floating-point output tensors of all batches."""
    from torch.utils._pytree import tree_flatten

    d2 = r2 = 0.0
    for o_b, r_b in zip(outputs, references):
        out, _ = tree_flatten(o_b)
        ref, _ = tree_flatten(r_b)
        for o, r in zip(out, ref):
            if isinstance(r, torch.Tensor) and r.is_floating_point():
                d2 += float((o.double() - r.double()).pow(2).sum())
                r2 += float(r.double().pow(2).sum())
    return math.sqrt(d2 / r2) if r2 > 0 else (0.0 if d2 == 0 else math.inf)


def check_batches(batches: list[tuple]) -> None:
    for i, batch in enumerate(batches):
        for j, x in enumerate(batch):
            if not isinstance(x, torch.Tensor):
                continue
            if x.dim() == 0 or x.shape[0] == 0:
                raise SurgeryError(f"calibration batch {i} input {j} has shape {list(x.shape)}: no rows. Every "
                                   "batch needs at least one sample along its first dimension.")
            if x.is_floating_point() and not bool(x.isfinite().all()):
                raise SurgeryError(f"calibration batch {i} input {j} has {int((~x.isfinite()).sum())} NaN/Inf "
                                   "value(s): the refit solves least squares on the activations, which needs "
                                   "finite data. Drop or clean that batch.")


def synthetic_calibration(gm: nn.Module, what: Any, inputs: tuple) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """``calibration="synthetic"``: BatchNorm-matched images shaped like the example input (and a summary);
    a :class:`~fxsurgeon.synthetic.SyntheticData` already made is used as it is (``reused: True``)."""
    from ..synthetic import SyntheticData, synthesize

    if isinstance(what, SyntheticData):
        data, reused = what, True
    else:
        if what != "synthetic":
            raise SurgeryError(f"calibration= takes input batches or 'synthetic', got the string {what!r}")
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() < 2:
            raise SurgeryError("calibration='synthetic' needs example_inputs: one batched input tensor (its shape "
                               "without the batch dimension is the shape of the images made)")
        data, reused = synthesize(gm, tuple(inputs[0].shape[1:])), False
    summary = {"images": int(data.images.shape[0]), "steps": data.steps, "batchnorms": data.batchnorms,
               "loss_start": data.loss_start, "loss_end": data.loss_end, "seconds": data.seconds,
               "reused": reused}
    return data.batches(), summary
