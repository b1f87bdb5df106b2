"""Runtime helpers every layer shares: devices and dtypes, example inputs, guarded forwards, timing, versions.

The lowest layer of fxsurgeon with :mod:`fxsurgeon.errors` and :mod:`fxsurgeon.modes` (the only parts of the
package it imports), so tracing, calibration, latency, reports and benchmarks can all use it without importing
each other (issue 19). Helpers with different contracts keep different names: :func:`device_of` (None when the
model holds no tensor) is not :func:`data_device_of` (None on ``meta`` too) nor :func:`device_or_cpu`;
:func:`normalize_inputs` (None → ``()``) is not :func:`benchmark_inputs` (refuses an empty input); each
``*_versions`` function records what its own output has always recorded.
"""

from __future__ import annotations

import contextlib
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError
from .modes import modes as _modes
from .modes import restore_modes as _restore_modes

__all__ = [
    "DTYPES",
    "__version__",
    "batch_of",
    "batch_versions",
    "benchmark_inputs",
    "benchmark_versions",
    "check_parameters",
    "compile_options",
    "conversion_versions",
    "cudnn_benchmark_mode",
    "data_device_of",
    "device_name",
    "device_of",
    "device_or_cpu",
    "dtype_name",
    "ieee_fp32",
    "kept_state",
    "model_dtype",
    "model_name",
    "normalize_inputs",
    "parse_dtype",
    "percentile",
    "prepare_inputs",
    "report_versions",
    "resolve_device",
    "run_forward",
    "shape_diff",
    "synchronize",
    "time_calls",
    "to_device",
]

__version__ = "0.1.0"

#: dtype names accepted wherever a dtype is asked for (CLI ``--dtype``, ``benchmark(dtype=...)``, recipes)
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}

_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


# ------------------------------------------------------------------------------------------ dtypes, devices


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` → ``torch.bfloat16``; None stays None.

    >>> parse_dtype("bf16"), parse_dtype(torch.float16), parse_dtype(None)
    (torch.bfloat16, torch.float16, None)
    """
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and not value.is_floating_point:
            raise SurgeryError(f"dtype must be a floating-point dtype, got {value}")
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise SurgeryError(f"unknown dtype {value!r}; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """Short label: ``torch.bfloat16`` → ``"bf16"``."""
    return _SHORT.get(dtype, str(dtype).replace("torch.", ""))


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the first floating-point parameter or buffer, else torch's default dtype."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def device_of(model: nn.Module) -> torch.device | None:
    """The device of the first parameter or buffer (``meta`` included); None for a model with neither."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


def data_device_of(model: nn.Module) -> torch.device | None:
    """Like :func:`device_of`, but None also when the first tensor is on ``meta`` (it holds no data to run)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device if t.device.type != "meta" else None
    return None


def device_or_cpu(model: nn.Module) -> torch.device:
    """The device of the first parameter or buffer; CPU for a model with neither."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def to_device(inputs: tuple, device: torch.device | None) -> tuple:
    """Tensors of ``inputs`` moved to ``device``; unchanged when ``device`` is None or ``meta``."""
    if device is None or device.type == "meta":
        return inputs
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """The device to run on: ``device`` if given (``"cuda"`` → the current CUDA device), else the model's.

    Raises:
        SurgeryError: CUDA was asked for on a machine where ``torch.cuda.is_available()`` is False.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None:
        dev = device_or_cpu(model) if model is not None else torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise SurgeryError(f"unknown device {device!r}: {exc}") from exc
    if dev.type == "meta":
        raise SurgeryError("cannot time a model on the meta device: it has no data; pass device='cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SurgeryError(
                f"device {str(device or dev)!r} asked for, but torch.cuda.is_available() is False on this machine "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use device='cpu'"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise SurgeryError(f"device {dev} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def device_name(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` for a CUDA device, the processor's name (or ``"cpu"``) otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return platform.processor() or platform.machine() or "cpu"
    return str(device)


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (a no-op on CPU, where ops run synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        sync = getattr(backend, "synchronize", None)
        if sync is not None:
            sync()


# ------------------------------------------------------------------------------------------- example inputs


def normalize_inputs(example_inputs: Any) -> tuple:
    """A tensor or a sequence of tensors → a tuple; anything else is a SurgeryError saying what it got."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise SurgeryError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )


def benchmark_inputs(example_inputs: Any) -> tuple:
    """A tensor or a non-empty sequence → a tuple; None, an empty sequence or anything else is a SurgeryError.

    Stricter than :func:`normalize_inputs`: a benchmark needs something to run the model on.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise SurgeryError(
        "example_inputs must be a tensor or a non-empty tuple of positional inputs, "
        f"got {type(example_inputs).__name__}"
    )


def batch_of(inputs: tuple) -> int | None:
    """The leading dimension of the first tensor with one; None when there is none."""
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return int(x.shape[0])
    return None


def prepare_inputs(inputs: tuple, batch_size: int | None, device: torch.device, dtype: torch.dtype,
                   channels_last: bool) -> tuple:
    """Inputs at ``batch_size`` (example rows repeated cyclically), on ``device``, floats in ``dtype``."""
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            out.append(x)
            continue
        if batch_size is not None and x.dim() >= 1 and x.shape[0] != batch_size:
            if x.shape[0] == 0:
                raise SurgeryError("example_inputs have an empty batch dimension: cannot resize them")
            x = x[torch.arange(batch_size) % x.shape[0]]
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(x)
    return tuple(out)


def model_name(model: nn.Module) -> str:
    """timm architecture name when there is one, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(model).__name__


# ------------------------------------------------------------------------------------------ guarded forwards


@contextmanager
def kept_state(model: nn.Module, only: set[int] | None = None) -> Iterator[None]:
    """Run the block, then put back every buffer of ``model`` (or those whose ``id`` is in ``only``) as it was,
    and every submodule's train/eval flag: forwards fxsurgeon runs leave no trace (running statistics, counters).
    """
    flags = _modes(model)
    saved = [(b, b.detach().clone()) for b in model.buffers() if only is None or id(b) in only]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                if b.shape == v.shape and not b.is_inference():
                    b.copy_(v)
        _restore_modes(model, flags, model.training)


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Full float32 precision inside the block — TF32 off for cuDNN convs and matmuls — restored after.

    On Ampere and later GPUs cuDNN runs float32 convs in TF32 by default (10-bit mantissa), which moves
    outputs by ~1e-3 relative: enough to hide or fake a difference between two models that should compute
    the same function. Verification compares under this context; benchmarks do not use it (they measure
    what deployment runs).

    >>> with ieee_fp32():
    ...     torch.backends.cudnn.allow_tf32
    False
    """
    cudnn = torch.backends.cudnn
    with contextlib.ExitStack() as stack:
        # a TF32 state torch refuses to read (legacy and new APIs mixed) raises RuntimeError: leave it then
        with contextlib.suppress(RuntimeError):
            stack.enter_context(cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                                            deterministic=cudnn.deterministic, allow_tf32=False))
        precision = torch.get_float32_matmul_precision()
        if precision != "highest":
            torch.set_float32_matmul_precision("highest")
            stack.callback(torch.set_float32_matmul_precision, precision)
        yield


@contextmanager
def _seeded(on: bool, device: torch.device | None) -> Iterator[None]:
    if not on:
        yield
        return
    cuda = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)
        yield


def run_forward(model: nn.Module, inputs: tuple, what: str, mode: str = "eval") -> Any:
    """Forward without grad in ``mode`` (train: under a fixed seed, so two models draw the same random numbers);
    buffers and train/eval flags are put back after. A failure names what was running."""
    with kept_state(model):
        model.train(mode == "train")
        try:
            # TF32 (cuDNN's float32 default on Ampere+) moves outputs ~1e-3: compare in full float32
            with torch.no_grad(), ieee_fp32(), _seeded(mode == "train", device_of(model)):
                return model(*inputs)
        except SurgeryError:
            raise
        except Exception as exc:
            shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
            dtypes = [str(x.dtype) if isinstance(x, torch.Tensor) else "-" for x in inputs]
            raise SurgeryError(
                f"{what} failed on example_inputs of shapes {shapes}, dtypes {dtypes}: {type(exc).__name__}: "
                f"{exc}. Check that the inputs have the shape and dtype the model expects."
            ) from exc


# ------------------------------------------------------------------------------------------------- timing


@contextlib.contextmanager
def cudnn_benchmark_mode(enabled: bool | None) -> Iterator[None]:
    """Set ``torch.backends.cudnn.benchmark`` inside the block and restore it after (None: leave it)."""
    if enabled is None:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def time_calls(fn: Callable[[], Any], device: torch.device, *, warmup: int, iters: int) -> list[float]:
    """Call ``fn()`` ``warmup`` times untimed, then ``iters`` times timed; the seconds of each timed call.

    On CUDA each call is bracketed by two CUDA events recorded on the current stream of ``device`` and the
    end event is synchronised before the next call, so a time is the call's whole latency on the GPU,
    launch gaps included, not the time to enqueue its kernels. Elsewhere ``time.perf_counter`` brackets the
    call and the device is synchronised before the clock is read.

    >>> times = time_calls(lambda: sum(range(1000)), torch.device("cpu"), warmup=1, iters=3)
    >>> len(times), all(t > 0 for t in times)
    (3, True)
    """
    if iters < 1 or warmup < 0:
        raise SurgeryError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    if device.type == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            for _ in range(iters):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                fn()
                end.record(stream)
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000.0)  # elapsed_time is in milliseconds
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between order statistics (numpy's default).

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 90)
    (2.5, 3.7)
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo), 12)


def compile_options(compile: bool | str | dict[str, Any] | None) -> dict[str, Any] | None:
    """``compile=`` as ``torch.compile`` keyword arguments: None for off, ``{}`` for defaults; a wrong type is refused."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {}
    if isinstance(compile, str):
        return {"mode": None if compile == "default" else compile}
    if isinstance(compile, dict):
        return dict(compile)
    raise SurgeryError(f"compile= takes True/False, a torch.compile mode name or a dict of its options, got {compile!r}")


# ----------------------------------------------------------------------------------------------- versions


def conversion_versions() -> dict[str, str]:
    """Versions recorded on a conversion and in saved files: fxsurgeon, torch and timm (imported if installed)."""
    out = {"fxsurgeon": __version__, "torch": torch.__version__}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:
        pass
    return out


def report_versions() -> dict[str, str]:
    """Versions in a savings report: fxsurgeon, torch, and fvcore and timm when installed (``"unknown"`` when they
    carry no version)."""
    out = {"fxsurgeon": __version__, "torch": torch.__version__}
    for mod in ("fvcore", "timm"):
        with contextlib.suppress(ImportError):
            out[mod] = getattr(__import__(mod), "__version__", "unknown")
    return out


def benchmark_versions(device: torch.device) -> dict[str, str]:
    """Versions in a benchmark result: torch, timm only when already imported, fxsurgeon, and CUDA and cuDNN on a
    CUDA device."""
    out = {"torch": torch.__version__}
    timm = sys.modules.get("timm")  # only when in use: importing it just for its version costs seconds
    if timm is not None:
        out["timm"] = str(getattr(timm, "__version__", "?"))
    out["fxsurgeon"] = __version__
    if device.type == "cuda":
        out["cuda"] = str(torch.version.cuda)
        if torch.backends.cudnn.is_available():
            out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def batch_versions() -> dict[str, str]:
    """Versions stamped on batch results: fxsurgeon, torch and timm, each as already loaded or importable."""
    out = {}
    for name in ("fxsurgeon", "torch", "timm"):
        mod = sys.modules.get(name)
        if mod is None:
            with contextlib.suppress(ImportError):
                mod = __import__(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def check_parameters(model: nn.Module) -> None:
    """Uninitialised (lazy) and non-finite weights: refused up front, naming the tensor, before any pass sees them."""
    from torch.nn.parameter import is_lazy

    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if is_lazy(t):
                raise SurgeryError(
                    f"{kind} '{name}' of {type(owner).__name__} is uninitialised (a lazy module): run one forward "
                    "of the model (or build it with explicit in_features / in_channels) before converting"
                )
            if t.is_floating_point() and t.device.type != "meta" and t.numel():
                bad = int((~t.detach().isfinite()).sum())
                if bad:
                    raise SurgeryError(
                        f"{kind} '{name}' of {type(owner).__name__} has {bad} NaN/Inf value(s) out of {t.numel()}: "
                        "fxsurgeon's rewrites need finite weights. Fix or re-initialise that tensor first."
                    )


def shape_diff(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """Two ``name → shape`` maps (tensors or shapes) compared: names only in ``a``, names only in ``b``, and names
    in both whose shapes differ, each sorted.

    >>> shape_diff({"w": (2, 3), "b": (2,)}, {"w": [3, 2], "x": (1,)})
    (['b'], ['x'], ['w'])
    """
    def shape(v: Any) -> tuple[int, ...]:
        return tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)

    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    differ = sorted(k for k in set(a) & set(b) if shape(a[k]) != shape(b[k]))
    return only_a, only_b, differ
