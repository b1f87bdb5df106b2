"""Export a module to ONNX and run it in an onnxruntime CPU session: where many CPU users deploy.

Shared by the onnxruntime benchmarks (:mod:`fxsurgeon.bench.ort`) and latency budgets timed in onnxruntime
(``latency_aware=dict(runtime="onnxruntime")``, :mod:`fxsurgeon.budget.latency_budget`). onnxruntime is an
optional dependency (``pip install fxsurgeon[onnx]``); asking for it without the package is a
:class:`~fxsurgeon.errors.SurgeryError` that says so.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError
from .runtime import model_name

__all__ = ["EXPORTERS", "export_onnx", "onnxruntime_module", "ort_runner"]

#: ``"dynamo"``: ``torch.onnx.export(dynamo=True)`` first (what users export with today), the TorchScript
#: exporter when it fails; ``"torchscript"``: the other order: about 100× faster on a single layer (5 ms
#: against 0.5 s), for timing hundreds of candidate layers. Both give the same operators for plain convs.
EXPORTERS = ("dynamo", "torchscript")


def onnxruntime_module() -> Any:
    """The ``onnxruntime`` package, or a :class:`SurgeryError` saying how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise SurgeryError("the onnxruntime runtime needs the onnxruntime package: pip install onnxruntime") from exc
    return onnxruntime


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporters' progress prints (they write to stdout); errors still raise."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _dynamo(m: nn.Module, xs: tuple) -> bytes:
    return torch.onnx.export(m, xs, dynamo=True, verbose=False).model_proto.SerializeToString()


def _torchscript(m: nn.Module, xs: tuple) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(m, xs, buf, dynamo=False)
    return buf.getvalue()


def export_onnx(model: nn.Module, inputs: tuple, *, exporter: str = "dynamo") -> bytes:
    """The model (a float32 CPU copy in eval mode) as ONNX bytes, for inputs of exactly these shapes.

    Shapes are static (one export per batch size): models that compute with their input's size — a
    functional pool over ``x.size(3)``, a ``view(x.size(0), -1)`` — do not always export with a symbolic
    batch. ``exporter`` says which exporter is tried first (:data:`EXPORTERS`); the other is tried when it fails.

    >>> blob = export_onnx(nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),))
    >>> len(blob) > 0
    True
    """
    if exporter not in EXPORTERS:
        raise SurgeryError(f"onnxruntime: exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    m = copy.deepcopy(model).eval().to(device="cpu", dtype=torch.float32)
    xs = tuple(x.detach().to("cpu", torch.float32) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
               for x in inputs)
    order = [("dynamo exporter", _dynamo), ("TorchScript exporter", _torchscript)]
    if exporter == "torchscript":
        order.reverse()
    errors = []
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        for name, run in order:
            try:
                return run(m, xs)
            except Exception as exc:  # an exporter does not take every graph: try the other one
                first = str(exc).splitlines()[0] if str(exc) else ""
                errors.append(f"{name}: {type(exc).__name__}: {first}")
    raise SurgeryError(f"exporting {model_name(model)} to ONNX failed: {'; '.join(e[:300] for e in errors)}")


def ort_runner(model: nn.Module, inputs: tuple, *, threads: int | None = None,
               exporter: str = "dynamo") -> Callable[..., Any]:
    """A callable running ``model`` in an onnxruntime CPU session: ``run(*tensors) -> list of numpy arrays``,
    for inputs shaped like ``inputs`` (exported with static shapes, :func:`export_onnx`).

    ``threads``: intra-op threads (default: torch's current number), one inter-op thread, sequential
    execution, every graph optimisation on.

    >>> run = ort_runner(nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),), threads=1, exporter="torchscript")
    >>> run(torch.randn(1, 3, 8, 8))[0].shape
    (1, 4, 6, 6)
    """
    ort = onnxruntime_module()
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise SurgeryError(f"onnxruntime: threads must be a positive int, got {threads!r}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(export_onnx(model, inputs, exporter=exporter), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*xs: Any) -> Any:
        feed = {n: (x.detach().cpu().contiguous().numpy() if isinstance(x, torch.Tensor) else x)
                for n, x in zip(names, xs)}
        return session.run(None, feed)

    run.session = session  # type: ignore[attr-defined]
    return run
