"""Data-aware calibration: refit converted layers on real activations so the model keeps what it learned.

A data-free rewrite (e.g. a separable conv from a truncated SVD) is the best approximation of the *weight*;
what matters is the layer's *output* on the data the model sees, and the error that earlier approximations
pass down. :func:`calibrate` walks the rewritten layers in network order and refits each by regularised
least squares

    W = argmin ||Z W − Y||² + λ ||W − W₀||²,   λ = ridge · tr(ZᵀZ) / d

where Z are the layer's inputs *in the converted model so far* (so each refit also corrects the error that
reaches it from the layers before) and Y the outputs of the original layer *in the original model*. The
shrinkage is towards the data-free weights W₀, so with little data the refit stays near them. Only
sufficient statistics are kept (Gram matrices; on a seeded subset of the images where a layer would see
millions of positions), so memory does not grow with the amount of data.

* A :class:`~fxsurgeon.modules.SeparableConv2d` (either form) is refit from the im2col statistics of its
  input: the last pointwise weights, the depthwise filters and (pointwise → depthwise → pointwise) the first
  1×1 conv alternate, each step an exact least-squares solve on the same statistics
  (:class:`_SeparableAccumulator`).
* Block targets (``targets="block"``, the default): a layer whose output joins a residual sum, directly or
  through a BatchNorm (a ResNet block's last conv), is refit so the *sum* matches the original's,
  ``Y* = Y + (S − S')/a`` with S, S' the other operand in the original and converted models and a the
  BatchNorm's scale: it cancels the error the shortcut carries from the layers before, which layer targets
  leave in place.
* ReLU-aware targets (``relu=True``, the default): a layer whose output (or sum) reaches a ReLU through at
  most a BatchNorm need only match the original *after* the ReLU. Where the original's ReLU input v is ≤ 0,
  any output whose ReLU input ``u = v + a·(ŷ − y)`` is ≤ 0 will do; the target there becomes the current
  output projected onto that set, and the layer is refit to it a few times (alternating minimisation of
  ``Σ_{v>0} (ŷ − y)² + Σ_{v≤0} max(0, u/a)²``, from the plain fit). About half the positions of a ResNet's
  convs are zeroed by their ReLU; the capacity they no longer claim goes to the rest.
* Any other rewrite refits its last linear layer: the replacement itself when it is a groups=1 conv or a
  Linear, else its last child. A rewrite of a graph site rather than a module (a channel-reducing concat
  fusion) refits the consumers it narrowed (``details["consumers"]`` or ``details["sites"][i]["consumers"]``)
  against the same-named layers of the original; ``details["refit"] = [{"layer": ..., "reference": ...}]``
  says it explicitly. Exact rewrites are left alone.

Then the statistics of BatchNorm layers downstream of the rewrites are re-estimated exactly, in network
order, and kept when that lowers the model's output error on the calibration data (``bn="auto"``). GraphModules
run node by node over all batches at once (each node once per batch, :class:`_Stepper`); other models, or
data too large to hold, re-run the network up to each layer batch by batch.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .convert import _device_of, _eval_modes, _to_device
from .errors import SurgeryError

__all__ = [
    "CalibrationReport",
    "LayerRefit",
    "RefitSpec",
    "annotate_record",
    "as_batches",
    "calibrate",
    "measure_choices",
    "output_error",
    "output_sensitivity",
    "reestimate_batchnorm",
    "refit_specs",
    "ridge_cg",
    "ridge_refit",
    "rows_cap",
]

#: default ridge: λ as a fraction of the mean eigenvalue of ZᵀZ. Small enough to leave a well-determined
#: fit alone, large enough to keep an under-determined one (few samples, dead channels) near W₀.
DEFAULT_RIDGE = 1e-3


# ---------------------------------------------------------------------------------------------------------
# pure maths


def ridge_refit(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve ``argmin_W ||Z W − Y||² + λ||W − W₀||²`` from ``gram = ZᵀZ`` (d×d) and ``cross = ZᵀY`` (d×c).

    ``λ = ridge · tr(ZᵀZ) / d``; ``ridge=0`` is plain least squares (pseudo-inverse when singular).

    >>> z = torch.randn(100, 3, dtype=torch.float64); w = torch.randn(3, 2, dtype=torch.float64)
    >>> torch.allclose(ridge_refit(z.T @ z, z.T @ (z @ w), torch.zeros(3, 2, dtype=torch.float64), 0.0), w)
    True
    """
    d = gram.shape[0]
    lam = ridge * float(torch.diagonal(gram).sum()) / max(d, 1)
    a = gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device)
    b = cross + lam * w0
    if lam > 0:
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(b, chol)
    return torch.linalg.lstsq(a, b, driver="gelsd" if a.device.type == "cpu" else None).solution


def ridge_cg(
    gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float, *, start: torch.Tensor | None = None,
    iterations: int = 60, tol: float = 1e-6,
) -> torch.Tensor:
    """:func:`ridge_refit` for one right-hand side by Jacobi-preconditioned conjugate gradients.

    For systems too large to factorise each time; ``start`` warm-starts it.

    >>> a = torch.randn(50, 8, dtype=torch.float64); x = torch.randn(8, dtype=torch.float64)
    >>> g, c = a.T @ a, a.T @ (a @ x)
    >>> torch.allclose(ridge_cg(g, c, torch.zeros(8, dtype=torch.float64), 0.0, iterations=50), x)
    True
    """
    return _cg(lambda v: gram @ v, torch.diagonal(gram), cross, w0, ridge, start=start, iterations=iterations,
               tol=tol)


def _cg(
    matvec: Any, diag: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float, *,
    start: torch.Tensor | None = None, iterations: int = 60, tol: float = 1e-6,
) -> torch.Tensor:
    """Solve ``(A + λI) x = cross + λ w0`` given ``v ↦ A v`` and ``diag(A)``; λ = ridge · tr(A) / n."""
    n = diag.shape[0]
    lam = ridge * float(diag.sum()) / max(n, 1)
    b = cross + lam * w0
    d = diag + lam
    inv = torch.where(d > 0, 1.0 / d, torch.ones_like(d))
    x = (start if start is not None else w0).clone()
    r = b - (matvec(x) + lam * x)
    z = inv * r
    p = z.clone()
    rz = float(r @ z)
    stop = tol * float(b.norm())
    for _ in range(iterations):
        if float(r.norm()) <= stop:
            break
        ap = matvec(p) + lam * p
        pap = float(p @ ap)
        if pap <= 0:
            break
        alpha = rz / pap
        x += alpha * p
        r -= alpha * ap
        z = inv * r
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def residual(gram: torch.Tensor, cross: torch.Tensor, yy: float, w: torch.Tensor) -> float:
    """``||Z W − Y||²`` from the sufficient statistics (clamped at 0 against rounding)."""
    return max(yy - 2.0 * float((w * cross).sum()) + float((w * (gram @ w)).sum()), 0.0)


# ---------------------------------------------------------------------------------------------------------
# data


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


def _forward(model: nn.Module, batch: tuple, what: str) -> Any:
    try:
        return model(*batch)
    except _Stop:
        raise
    except Exception as exc:
        hint = ""
        if len(batch) == 2 and isinstance(batch[1], torch.Tensor) and not batch[1].is_floating_point():
            hint = " The batch looks like (inputs, labels): pass the inputs only, e.g. (x for x, _ in loader)."
        raise SurgeryError(f"calibration: {what} failed on a calibration batch: {type(exc).__name__}: {exc}.{hint}") from exc


def output_error(model: nn.Module, reference: nn.Module, batches: Sequence[tuple]) -> float:
    """Relative L2 error ``||f(x) − g(x)|| / ||g(x)||`` of ``model`` against ``reference`` over all batches."""
    from torch.utils._pytree import tree_flatten

    dev = _device_of(model)
    d2 = r2 = 0.0
    with torch.no_grad():
        for b in batches:
            b = _to_device(b, dev)
            out, _ = tree_flatten(_forward(model, b, "the converted model"))
            ref, _ = tree_flatten(_forward(reference, b, "the original model"))
            for o, r in zip(out, ref):
                if isinstance(r, torch.Tensor) and r.is_floating_point():
                    d2 += float((o.double() - r.double()).pow(2).sum())
                    r2 += float(r.double().pow(2).sum())
    return math.sqrt(d2 / r2) if r2 > 0 else (0.0 if d2 == 0 else math.inf)


# ---------------------------------------------------------------------------------------------------------
# what to refit


@dataclass(frozen=True)
class RefitSpec:
    """Refit ``layer`` (in the converted model) so its output matches ``reference``'s (in the original).

    Attributes:
        target: the rewrite this belongs to (its record target).
        layer: qualified name in the converted model of a groups=1 ``Conv2d`` or a ``Linear`` (``kind``
            ``"linear"``), or of a :class:`~fxsurgeon.modules.SeparableConv2d` (``kind="separable"``: its
            depthwise and last pointwise weights are refit together).
        reference: qualified name of the module in the original model whose output ``layer`` reproduces.
        kind: ``"linear"`` or ``"separable"``.
    """

    target: str
    layer: str
    reference: str
    kind: str = "linear"


@dataclass
class LayerRefit:
    """What calibration did to one layer (errors are relative L2 on the calibration data).

    ``relu_relaxed`` (ReLU-aware targets): the share of output positions the original's ReLU zeroes; the
    errors are then measured as the ReLU sees them. None: the layer had plain targets.
    """

    target: str
    layer: str
    reference: str
    error_before: float | None = None
    error_after: float | None = None
    samples: int = 0
    refit: bool = False
    reason: str = ""
    target_kind: str = "layer"
    relu_relaxed: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CalibrationReport:
    """The calibration's effect, kept at ``record.extras["calibration"]``.

    Attributes:
        layers: one :class:`LayerRefit` per refit (or skipped) layer, in network order.
        output_error_before / output_error_after: relative L2 error of the model's outputs against the
            original on the calibration data, before and after calibration.
        batchnorm: what happened to BatchNorm statistics (``{"modules": n, "kept": bool, ...}``).
        batches / samples / seconds: how much data, and how long.
    """

    layers: list[LayerRefit] = field(default_factory=list)
    output_error_before: float | None = None
    output_error_after: float | None = None
    batchnorm: dict[str, Any] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0
    seconds: float = 0.0
    mode: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [x.to_dict() for x in self.layers]
        return d


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Explicit (ph, pw) zero padding of a conv, or None when unfold cannot express it."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):  # "same": symmetric only for an even total
            if d * (k - 1) % 2:
                return None
            pads.append(d * (k - 1) // 2)
        return (pads[0], pads[1])
    return (int(conv.padding[0]), int(conv.padding[1]))


def _is_refittable(mod: nn.Module) -> bool:
    """A layer linear in its weights whose inputs can be laid out as rows: Linear, or a groups=1 Conv2d."""
    if isinstance(mod, nn.Linear):
        return type(mod).forward is nn.Linear.forward
    if not isinstance(mod, nn.Conv2d) or mod.groups != 1 or type(mod).forward is not nn.Conv2d.forward:
        return False
    if type(mod)._conv_forward is not nn.Conv2d._conv_forward:
        return False
    pad = _conv_padding(mod)
    return pad is not None and (mod.padding_mode == "zeros" or pad == (0, 0))


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def refit_specs(converted: nn.Module, reference: nn.Module, rewrites: Iterable[Any]) -> tuple[list[RefitSpec], list[LayerRefit]]:
    """Which layer of each rewrite to refit against which original module; the others with the reason.

    A rewrite may say it explicitly with ``details["refit"] = [{"layer": ..., "reference": ...}, ...]``;
    otherwise its target must name a module in both models, and the converted one must be a refittable
    linear layer or end with one (its last child, as :class:`~fxsurgeon.modules.SeparableConv2d` does).
    """
    specs: list[RefitSpec] = []
    skipped: list[LayerRefit] = []
    seen: set[str] = set()
    for rw in rewrites:
        target = rw.target
        details = rw.details if isinstance(getattr(rw, "details", None), dict) else {}
        explicit = details.get("refit")
        consumers = list(details.get("consumers") or []) + [
            c for site in details.get("sites") or [] if isinstance(site, dict) for c in site.get("consumers") or []
        ]
        pairs: list[tuple[str, str]] = []
        if getattr(rw, "exact", False):
            skipped.append(LayerRefit(target, "", target, reason="exact rewrite: nothing to refit"))
            continue
        if explicit:
            pairs = [(str(p["layer"]), str(p["reference"])) for p in explicit]
        elif not _has_module(converted, target) and consumers:
            # a rewrite of a graph site (e.g. a channel-reducing concat fusion): the layers it narrowed must
            # reproduce what the same-named layers computed in the original
            pairs = [(c, c) for c in dict.fromkeys(consumers)]
        else:
            if not _has_module(converted, target) or not _has_module(reference, target):
                skipped.append(LayerRefit(target, "", target, reason="no module of that name in both models"))
                continue
            mod = converted.get_submodule(target)
            if separable_refittable(mod) and _has_module(reference, target):
                specs.append(RefitSpec(target, target, target, kind="separable"))
                seen.add(target)
                continue
            if _is_refittable(mod):
                pairs = [(target, target)]
            elif isinstance(mod, nn.Sequential) and len(mod) and _is_refittable(mod[-1]):
                last = list(mod._modules)[-1]
                pairs = [(f"{target}.{last}", target)]
            else:
                skipped.append(LayerRefit(target, "", target, reason=f"{type(mod).__name__} does not end with a "
                                          "conv or Linear to refit"))
                continue
        for layer, ref in pairs:
            if layer in seen:
                continue
            seen.add(layer)
            if not _has_module(converted, layer) or not _is_refittable(converted.get_submodule(layer)):
                skipped.append(LayerRefit(target, layer, ref, reason="not a plain groups=1 conv or Linear in the "
                                          "converted model"))
            elif not _has_module(reference, ref):
                skipped.append(LayerRefit(target, layer, ref, reason="reference module not in the original model"))
            else:
                specs.append(RefitSpec(target, layer, ref))
    return specs, skipped


# ---------------------------------------------------------------------------------------------------------
# least-squares statistics of one layer


def _rows(t: torch.Tensor, linear: bool) -> torch.Tensor:
    """Activations → (samples, features): channels last for a conv's output, last axis for a Linear."""
    t = t.detach()
    if not linear:
        t = t.movedim(1, -1)
    return t.reshape(-1, t.shape[-1])


def _input_rows(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """A layer's input → (samples, weight columns): im2col patches for a k×k conv (the weight's layout)."""
    if isinstance(layer, nn.Linear):
        return _rows(x, True)
    if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and _conv_padding(layer) == (0, 0):
        return _rows(x, False)
    cols = torch.nn.functional.unfold(x.detach(), layer.kernel_size, dilation=layer.dilation,
                                      padding=_conv_padding(layer), stride=layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


#: rows × columns handled at once when accumulating (bounds the memory of unfolded k×k inputs)
_ADD_MAX_ELEMENTS = 2**25


def rows_cap(columns: int) -> int:
    """Sample positions (rows) a least-squares fit with ``columns`` unknowns per output keeps at most.

    Accumulating a Gram matrix costs rows × columns²; an early, high-resolution layer sees millions of
    positions, far more than pin the fit down. So at most 2¹⁸ rows, fewer for wide layers (about 2³⁶
    multiply-adds per layer), but never fewer than 32 per unknown; a seeded uniform subset of the images
    is kept.

    >>> rows_cap(145), rows_cap(577), rows_cap(4096)
    (262144, 206408, 131072)
    """
    return max(32 * columns, min(2**18, 2**36 // max(columns, 1) ** 2))


class _Sampler:
    """Keeps a seeded uniform random subset of the samples (images), sized so the rows fit :func:`rows_cap`.

    The fraction is decided on the first batch from its rows per sample and the total number of samples.
    Whole samples are dropped before any unfolding, so a high-resolution layer costs no more than a small
    one.
    """

    def __init__(self, samples: int | None, columns: int) -> None:
        self.samples = samples
        self.columns = columns
        self.fraction: float | None = None if samples else 1.0
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rows_per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 2 or y.shape[0] != x.shape[0]:
            return x, y
        if self.fraction is None:
            self.fraction = min(1.0, rows_cap(self.columns) / max(rows_per_sample * self.samples, 1.0))
        if self.fraction >= 1.0:
            return x, y
        k = max(1, round(x.shape[0] * self.fraction))
        idx = torch.randperm(x.shape[0], generator=self.gen)[:k].to(x.device)
        return x[idx], y[idx]


class _Statistics:
    """ZᵀZ, ZᵀY and ||Y||² of one refit, fed batch by batch (rows of Z: the unknowns' inputs, plus a constant
    column when there is a bias), and what the refit reports."""

    def __init__(self, spec: RefitSpec, has_bias: bool, d: int, c: int, device: torch.device,
                 samples: int | None) -> None:
        self.spec = spec
        self.has_bias = has_bias
        self.gram = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.cross = torch.zeros(d, c, dtype=torch.float64, device=device)
        self.yy = 0.0
        self.n = 0
        self.sample = _Sampler(samples, d)
        self.info = LayerRefit(spec.target, spec.layer, spec.reference)
        self.gram_given = False

    def reuse_gram(self, other: _Statistics) -> None:
        """Take ``other``'s ZᵀZ (the same inputs, seeded subset and layer): only ZᵀY and ||Y||² are gathered."""
        self.gram, self.gram_given = other.gram, True

    def _accumulate(self, z: torch.Tensor, t: torch.Tensor) -> bool:
        if self.has_bias:
            z = torch.cat([z, z.new_ones(z.shape[0], 1)], 1)
        if not self.gram_given:
            self.gram += (z.T @ z).double()
        self.cross += (z.T @ t).double()
        self.yy += float(t.double().pow(2).sum())
        self.n += z.shape[0]
        return True

    def _unusable(self) -> LayerRefit | None:
        """The report as it stands when there is nothing to solve (a reason already, or a zero target)."""
        self.info.samples = self.n
        if self.info.reason:
            return self.info
        if self.yy <= 0:
            self.info.reason = "the original layer's output is zero on the calibration data"
            return self.info
        return None


class _Accumulator(_Statistics):
    """The statistics of one refit layer (a groups=1 conv or a Linear), then the refit itself."""

    def __init__(self, spec: RefitSpec, layer: nn.Module, samples: int | None = None) -> None:
        self.layer = layer
        self.linear = isinstance(layer, nn.Linear)
        has_bias = layer.bias is not None
        w = layer.weight.detach()
        w0 = w.reshape(w.shape[0], -1).T.double()  # (d, c)
        if has_bias:
            w0 = torch.cat([w0, layer.bias.detach().double().unsqueeze(0)])
        self.w0 = w0
        super().__init__(spec, has_bias, *w0.shape, w0.device, samples)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Add one call's layer input ``x`` and target ``y``; False (with the reason) when they do not fit."""
        channels = y.shape[-1] if self.linear else (y.shape[1] if y.dim() > 1 else 1)
        x, y = self.sample(x, y, y[0].numel() // max(channels, 1) if y.dim() > 1 else 1)
        return self._add(x, y)

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        # k×k convs unfold into C·k² columns per position: go through the batch in slices to bound memory
        cols = self.w0.shape[0] * (1 if self.linear else max(1, x[0].numel() // max(x.shape[1], 1)))
        step = max(1, _ADD_MAX_ELEMENTS // max(cols, 1)) if x.dim() > 1 and x.shape[0] > 1 else max(x.shape[0], 1)
        if x.dim() > 1 and x.shape[0] > step and y.shape[0] == x.shape[0]:
            return all(self._add(x[i:i + step], y[i:i + step]) for i in range(0, x.shape[0], step))
        z, t = _input_rows(x, self.layer), _rows(y, self.linear)
        if t.shape[0] != z.shape[0] or t.shape[1] != self.w0.shape[1] or z.shape[1] + self.has_bias != self.w0.shape[0]:
            self.info.reason = (f"the original's output {tuple(y.shape)} does not line up with the layer's input "
                                f"{tuple(x.shape)}")
            return False
        # float32 products per batch are accurate enough for the Gram matrix; the running sums are float64
        prec = torch.float64 if z.dtype == torch.float64 else torch.float32
        return self._accumulate(z.to(prec), t.to(prec))

    def finish(self, ridge: float) -> LayerRefit:
        """Solve, and write the weights when the error on the calibration data falls."""
        stop = self._unusable()
        if stop is not None:
            return stop
        info = self.info
        before = residual(self.gram, self.cross, self.yy, self.w0)
        w = ridge_refit(self.gram, self.cross, self.w0, ridge)
        after = residual(self.gram, self.cross, self.yy, w)
        info.error_before = math.sqrt(before / self.yy)
        if not math.isfinite(after) or after >= before or not torch.isfinite(w).all():
            info.error_after = info.error_before
            info.reason = "the refit did not lower the error; weights kept"
            return info
        info.error_after = math.sqrt(after / self.yy)
        layer = self.layer
        with torch.no_grad():
            core = w[:-1] if self.has_bias else w
            layer.weight.copy_(core.T.reshape(layer.weight.shape).to(layer.weight.dtype))
            if self.has_bias:
                layer.bias.copy_(w[-1].to(layer.bias.dtype))
        info.refit = True
        return info


#: largest im2col width (C_in·k², e.g. 128 channels at 3×3) the joint separable refit handles: its Gram
#: matrix costs rows × width² to gather. Wider blocks refit their pointwise conv only.
SEPARABLE_MAX_COLUMNS = 1152
#: most depthwise unknowns (C_dw·k²) the depthwise step solves for; above, the pointwise step only
DEPTHWISE_MAX_UNKNOWNS = 8192
#: alternations of the depthwise and pointwise least-squares steps
SEPARABLE_ITERATIONS = 4
#: relaxed-target refits after the plain one, for a layer before a ReLU (``calibrate(relu=True)``)
RELU_ROUNDS = 2
#: refit the first 1×1 conv of a pointwise → depthwise → pointwise block too (a third alternating step)
REFIT_REDUCE = True


def _plain_conv(conv: Any) -> bool:
    return (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward
            and type(conv)._conv_forward is nn.Conv2d._conv_forward)


def separable_refittable(module: nn.Module) -> bool:
    """A :class:`~fxsurgeon.modules.SeparableConv2d` whose depthwise and pointwise weights can be refit jointly.

    Its convs must be plain, the depthwise one zero-padded (so its input patches are an ``unfold``), the
    1×1 convs unstrided and bias-free before the depthwise, and the input patches narrow enough
    (:data:`SEPARABLE_MAX_COLUMNS`). Others refit only their last pointwise conv.
    """
    from .modules import SeparableConv2d

    if not isinstance(module, SeparableConv2d):
        return False
    dw, pw = module.depthwise, module.pointwise
    red = getattr(module, "reduce", None) if "reduce" in module._modules else None
    if not (_plain_conv(dw) and _plain_conv(pw) and _is_refittable(pw) and pw.kernel_size == (1, 1)):
        return False
    if dw.padding_mode != "zeros" or _conv_padding(dw) is None or dw.groups != dw.in_channels:
        return False
    if red is not None and not (_plain_conv(red) and red.kernel_size == (1, 1) and red.stride == (1, 1)
                                and _conv_padding(red) == (0, 0) and red.bias is None and red.groups == 1):
        return False
    if dw.bias is not None or pw.stride != (1, 1) or _conv_padding(pw) != (0, 0):
        return False
    c_in = red.in_channels if red is not None else dw.in_channels
    k2 = dw.kernel_size[0] * dw.kernel_size[1]
    return c_in * k2 <= SEPARABLE_MAX_COLUMNS


class _SeparableAccumulator(_Statistics):
    """Refit a SeparableConv2d's depthwise and last pointwise weights from statistics of its *input* patches.

    With P = the im2col patches of the block's input (over the depthwise conv's window, stride, padding and
    dilation), the block computes ``y = W · B(D) · T · p`` (+ bias): T the first 1×1 conv expanded over the
    window (identity for depthwise → pointwise), B(D) the block-diagonal depthwise filters, W the pointwise
    weights. ``G = Σ p pᵀ`` and ``C = Σ p yᵀ`` determine the squared error of every (D, W), so the pointwise
    step (least squares in W for fixed D) and the depthwise step (least squares in D for fixed W, whose
    normal matrix is ``(W Wᵀ) ∘ G`` in depthwise-filter coordinates) alternate on them without another pass
    over the data. Both steps shrink towards the data-free weights; the best (D, W) seen is kept.
    """

    def __init__(self, spec: RefitSpec, module: nn.Module, samples: int | None = None,
                 iterations: int | None = None) -> None:
        self.module = module
        self.iterations = SEPARABLE_ITERATIONS if iterations is None else iterations
        self.dw, self.pw = module.depthwise, module.pointwise
        self.red = module.reduce if "reduce" in module._modules else None
        has_bias = self.pw.bias is not None
        c_in = self.red.in_channels if self.red is not None else self.dw.in_channels
        self.k2 = self.dw.kernel_size[0] * self.dw.kernel_size[1]
        super().__init__(spec, has_bias, c_in * self.k2 + has_bias, self.pw.out_channels, self.dw.weight.device,
                         samples)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        x, y = self.sample(x, y, y[0].numel() // max(y.shape[1], 1) if y.dim() > 1 else 1)
        return self._add(x, y)

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        dw = self.dw
        per_sample = self.gram.shape[0] * max(1, y[0].numel() // max(y.shape[1], 1)) if y.dim() > 1 else 1
        step = max(1, _ADD_MAX_ELEMENTS // max(per_sample, 1))
        if x.shape[0] > step and y.shape[0] == x.shape[0]:
            return all(self._add(x[i:i + step], y[i:i + step]) for i in range(0, x.shape[0], step))
        prec = torch.float64 if x.dtype == torch.float64 else torch.float32
        cols = torch.nn.functional.unfold(x.detach().to(prec), dw.kernel_size, dilation=dw.dilation,
                                          padding=_conv_padding(dw), stride=dw.stride)
        z = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        t = _rows(y, False).to(prec)
        if t.shape[0] != z.shape[0] or t.shape[1] != self.cross.shape[1]:
            self.info.reason = (f"the original's output {tuple(y.shape)} does not line up with the block's input "
                                f"{tuple(x.shape)}")
            return False
        return self._accumulate(z, t)

    def finish(self, ridge: float) -> LayerRefit:
        stop = self._unusable()
        if stop is not None:
            return stop
        info = self.info
        dw, pw, k2 = self.dw, self.pw, self.k2
        dev = self.gram.device
        c_dw, c_mid = dw.out_channels, dw.in_channels
        mult = c_dw // c_mid  # filter g = c·mult + j reads channel c
        dq = c_mid * k2
        eye_k = torch.eye(k2, dtype=torch.float64, device=dev)
        gq = cq = g4 = c3 = s2 = None

        def project(t_red: torch.Tensor | None) -> None:
            """Statistics of the depthwise conv's input patches: T p (the first 1×1 conv acts on each tap alike)."""
            nonlocal gq, cq, g4, c3, s2
            if t_red is not None:
                t = torch.kron(t_red, eye_k)
                if self.has_bias:
                    t = torch.block_diag(t, torch.ones(1, 1, dtype=torch.float64, device=dev))
                gq, cq = t @ self.gram @ t.T, t @ self.cross
            else:
                gq, cq = self.gram, self.cross
            g4 = gq[:dq, :dq].reshape(c_mid, k2, c_mid, k2)
            c3 = cq[:dq].reshape(c_mid, k2, -1)
            s2 = gq[:dq, dq].reshape(c_mid, k2) if self.has_bias else None  # Σ patches, for the bias

        t0 = self.red.weight.detach().double().reshape(self.red.out_channels, -1) if self.red is not None else None
        project(t0)
        d0 = dw.weight.detach().double().reshape(c_dw, k2)
        w0 = pw.weight.detach().double().reshape(pw.out_channels, c_dw).T
        if self.has_bias:
            w0 = torch.cat([w0, pw.bias.detach().double().unsqueeze(0)])

        def z_stats(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Gram and cross statistics of the depthwise outputs (and the constant, with a bias)."""
            d3 = d.reshape(c_mid, mult, k2)
            gz = torch.einsum("cjCs,CJs->cjCJ", torch.einsum("cjt,ctCs->cjCs", d3, g4), d3).reshape(c_dw, c_dw)
            cz = torch.einsum("cjt,cto->cjo", d3, c3).reshape(c_dw, -1)
            if self.has_bias:
                sz = torch.einsum("cjt,ct->cj", d3, s2).reshape(c_dw, 1)
                gz = torch.cat([torch.cat([gz, sz], 1), torch.cat([sz.T, gq[dq:, dq:]], 1)])
                cz = torch.cat([cz, cq[dq:]])
            return gz, cz

        def pointwise_step(d: torch.Tensor) -> tuple[torch.Tensor, float]:
            gz, cz = z_stats(d)
            w = ridge_refit(gz, cz, w0, ridge)
            return w, residual(gz, cz, self.yy, w)

        def error(d: torch.Tensor, w: torch.Tensor) -> float:
            return residual(*z_stats(d), self.yy, w)

        def depthwise_step(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            # the normal matrix is (W Wᵀ)[g, g'] · G[(c(g), t), (c(g'), t')] over (filter, tap) pairs
            p3 = w[:c_dw].reshape(c_mid, mult, -1)
            target = c3 if s2 is None else c3 - s2[..., None] * w[c_dw]  # the bias is fixed here: fit y − b
            rhs = torch.einsum("cto,cjo->cjt", target, p3).reshape(-1)
            pp = torch.einsum("cjo,CJo->cjCJ", p3, p3)
            n = c_dw * k2
            if n <= 4096:  # small enough to form: factorise, or CG with fast matrix-vector products
                h = (pp[:, :, None, :, :, None] * g4[:, None, :, :, None, :]).reshape(n, n)
                if n <= 1024:
                    return ridge_refit(h, rhs[:, None], d0.reshape(-1, 1), ridge).reshape(c_dw, k2)
                return ridge_cg(h, rhs, d0.reshape(-1), ridge, start=d.reshape(-1)).reshape(c_dw, k2)
            diag = (torch.diagonal(pp.reshape(c_dw, c_dw)).reshape(c_mid, mult, 1)
                    * torch.diagonal(g4.reshape(dq, dq)).reshape(c_mid, 1, k2)).reshape(-1)

            def matvec(v: torch.Tensor) -> torch.Tensor:
                x = torch.einsum("cjCJ,CJs->cjCs", pp, v.reshape(c_mid, mult, k2))
                return torch.einsum("ctCs,cjCs->cjt", g4, x).reshape(-1)

            # large: conjugate gradients from the current filters, without forming the matrix; an inexact
            # inner step is fine (the best (D, W) is kept by its true error)
            return _cg(matvec, diag, rhs, d0.reshape(-1), ridge, start=d.reshape(-1)).reshape(c_dw, k2)

        dp = self.gram.shape[0] - self.has_bias  # input patch width, C_in·k²
        c_in = dp // k2
        if self.red is not None:  # G's (i, ·, i, ·) blocks, for the first 1×1 conv's preconditioner
            gp_blocks = torch.diagonal(self.gram[:dp, :dp].reshape(c_in, k2, c_in, k2), dim1=0, dim2=2).permute(2, 0, 1)

        def reduce_step(w: torch.Tensor, d: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            """Least squares in the first 1×1 conv's weights T (c_mid × C_in) for fixed D and W.

            The normal matrix, over (channel, input channel) pairs, is
            ``Σ_{j,j'} (W Wᵀ)[(c,j),(c',j')] Σ_{t,t'} D[(c,j),t] D[(c',j'),t'] G[(i,t),(i',t')]``; conjugate
            gradients apply it without forming it (one product with G per step).
            """
            p = w[:c_dw]
            pp = p @ p.T  # (c_dw, c_dw)
            g = self.gram[:dp, :dp]
            cross = self.cross[:dp] if not self.has_bias else self.cross[:dp] - self.gram[:dp, dp:dp + 1] * w[c_dw]
            cp = (cross @ p.T).reshape(c_in, k2, c_mid, mult)  # Σ p (W y)ᵀ, per (input channel, tap)
            d3 = d.reshape(c_mid, mult, k2)
            rhs = torch.einsum("cjt,itcj->ci", d3, cp).reshape(-1)

            def matvec(v: torch.Tensor) -> torch.Tensor:
                a = (d3[:, :, None, :] * v.reshape(c_mid, 1, c_in, 1)).reshape(c_dw, dp)  # (c,j) × (i,t)
                b = pp @ (a @ g)
                return torch.einsum("cjt,cjit->ci", d3, b.reshape(c_mid, mult, c_in, k2)).reshape(-1)

            pp_blocks = torch.diagonal(pp.reshape(c_mid, mult, c_mid, mult), dim1=0, dim2=2).permute(2, 0, 1)
            diag = torch.einsum("cjJ,cjt,itT,cJT->ci", pp_blocks, d3, gp_blocks, d3).reshape(-1)
            return _cg(matvec, diag, rhs, t0.reshape(-1), ridge, start=t.reshape(-1)).reshape(c_mid, c_in)

        before = error(d0, w0)
        best = (before, d0, w0, t0)
        joint = c_dw * k2 <= DEPTHWISE_MAX_UNKNOWNS
        d, t = d0, t0
        w, err = pointwise_step(d)
        if err < best[0]:
            best = (err, d, w, t)
        for _ in range(self.iterations if joint else 0):
            d = depthwise_step(w, d)
            if t is not None and REFIT_REDUCE:
                t = reduce_step(w, d, t)
                project(t)
            w, err = pointwise_step(d)
            if not math.isfinite(err) or not torch.isfinite(d).all() or not torch.isfinite(w).all() \
                    or (t is not None and not torch.isfinite(t).all()):
                break
            if err < best[0]:
                best = (err, d, w, t)
        after, d, w, t = best
        info.error_before = math.sqrt(before / self.yy)
        if not after < before:
            info.error_after = info.error_before
            info.reason = "the refit did not lower the error; weights kept"
            return info
        info.error_after = math.sqrt(after / self.yy)
        with torch.no_grad():
            dw.weight.copy_(d.reshape(dw.weight.shape).to(dw.weight.dtype))
            if t is not None:
                self.red.weight.copy_(t.reshape(self.red.weight.shape).to(self.red.weight.dtype))
            core = w[:-1] if self.has_bias else w
            pw.weight.copy_(core.T.reshape(pw.weight.shape).to(pw.weight.dtype))
            if self.has_bias:
                pw.bias.copy_(w[-1].to(pw.bias.dtype))
        info.refit = True
        return info


def _accumulator(spec: RefitSpec, module: nn.Module, samples: int | None = None) -> Any:
    if spec.kind == "separable":
        return _SeparableAccumulator(spec, module, samples)
    return _Accumulator(spec, module, samples)


class _BNStats:
    """Exact per-channel mean and variance of a BatchNorm's input over all the calibration data."""

    def __init__(self, bn: nn.Module) -> None:
        self.bn = bn
        self.s = self.s2 = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        x = x.detach().double()
        s, s2 = x.sum(dims), x.pow(2).sum(dims)
        self.s = s if self.s is None else self.s + s
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += x.numel() // x.shape[1]

    def finish(self) -> None:
        if self.n < 2:
            return
        mean = self.s / self.n
        var = (self.s2 / self.n - mean.pow(2)).clamp_min(0) * (self.n / (self.n - 1))  # unbiased, as PyTorch
        with torch.no_grad():
            self.bn.running_mean.copy_(mean.to(self.bn.running_mean.dtype))
            self.bn.running_var.copy_(var.to(self.bn.running_var.dtype))


# ---------------------------------------------------------------------------------------------------------
# collection


class _Stop(Exception):
    """Raised by a hook once everything needed from this forward is captured: the rest is not run."""


class _Capture:
    """A hook on one module recording its first input (pre-hook) or output per call, stopping when done."""

    def __init__(self, module: nn.Module, *, inputs: bool, stop_after: int | None) -> None:
        self.stop_after = stop_after
        self.items: list[torch.Tensor] = []
        if inputs:
            self.handle = module.register_forward_pre_hook(lambda mod, args: self._add(mod, args[0] if args else None))
        else:
            self.handle = module.register_forward_hook(lambda mod, args, out: self._add(mod, out))

    def _add(self, mod: nn.Module, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            raise SurgeryError(f"calibration: {type(mod).__name__} takes or returns {type(t).__name__}, not a tensor")
        self.items.append(t.detach())
        if self.stop_after is not None and len(self.items) >= self.stop_after:
            raise _Stop

    def remove(self) -> None:
        self.handle.remove()


def _capture(module: nn.Module, fn: Any, *, inputs: bool, stop_after: int | None) -> list[torch.Tensor]:
    """Run ``fn()`` with a capture hook on ``module``; what it saw, per call."""
    cap = _Capture(module, inputs=inputs, stop_after=stop_after)
    try:
        fn()
    except _Stop:
        pass
    finally:
        cap.remove()
    return cap.items


def _call_order(model: nn.Module, batch: tuple, names: Sequence[str]) -> list[str]:
    """``names`` sorted by when ``model`` first calls them (network order), uncalled ones last."""
    order: dict[str, int] = {}
    handles = []
    for n in names:
        def hook(mod, args, n=n):
            order.setdefault(n, len(order))
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _forward(model, batch, "the converted model")
    finally:
        for h in handles:
            h.remove()
    return sorted(names, key=lambda n: order.get(n, len(names) + 1))


class _Stepper:
    """Runs a GraphModule node by node over *all* batches at once ("frontier" execution).

    Only live values are kept (fx's last-use analysis), so memory is the widest cut of the graph times
    the amount of data, and each node runs once per batch: refitting a layer needs no re-run of the
    network before it.
    """

    def __init__(self, gm: fx.GraphModule, batches: Sequence[tuple]) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.pos = 0
        self.batch = 0
        self.interps = []
        for b in batches:
            it = fx.Interpreter(gm, garbage_collect_values=True)
            it.args_iter = iter(b)
            self.interps.append(it)
        self.outputs: list[Any] = [None] * len(batches)

    def step(self) -> fx.Node:
        node = self.nodes[self.pos]
        for i, it in enumerate(self.interps):
            self.batch = i
            try:
                val = it.run_node(node)
            except Exception as exc:
                raise SurgeryError(f"calibration: running graph node '{node.name}' failed: {type(exc).__name__}: "
                                   f"{exc}") from exc
            if node.op == "output":
                self.outputs[i] = val
            else:
                it.env[node] = val
            for dead in it.user_to_last_uses.get(node, []):
                it.env.pop(dead, None)
        self.pos += 1
        return node

    def run_to_end(self) -> list[Any]:
        while self.pos < len(self.nodes):
            self.step()
        return self.outputs

    def value(self, node: fx.Node, i: int, memo: dict[fx.Node, Any] | None = None) -> Any:
        """``node``'s value on batch ``i``: from the environment, or computed (not stored) from live values.

        A node that has not run yet only needs values that are still live: whatever it depends on was
        either computed before and is used again (by this node's chain) later, or comes after and is
        computed here.
        """
        env = self.interps[i].env
        if node in env:
            return env[node]
        memo = {} if memo is None else memo
        if node not in memo:
            if node.op in ("placeholder", "output"):
                raise SurgeryError(f"calibration: graph input '{node.name}' is no longer held")
            it = self.interps[i]
            args = fx.node.map_arg(node.args, lambda n: self.value(n, i, memo))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: self.value(n, i, memo))
            memo[node] = getattr(it, node.op)(node.target, args, kwargs)
        return memo[node]

    def call(self, node: fx.Node, i: int) -> Any:
        """Call ``node``'s module on batch ``i``'s inputs without storing the result (for hooks to see)."""
        args, kwargs = self.interps[i].fetch_args_kwargs_from_env(node)
        return self.gm.get_submodule(str(node.target))(*args, **kwargs)

    def live_bytes(self) -> int:
        from torch.utils._pytree import tree_flatten

        total = 0
        for it in self.interps:
            leaves, _ = tree_flatten(list(it.env.values()))
            total += sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
        return total


def _containing_nodes(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    """call_module nodes whose module is ``name`` or contains it (a leaf module)."""
    return [n for n in gm.graph.nodes if n.op == "call_module"
            and (str(n.target) == name or name.startswith(str(n.target) + "."))]


def _peak_bytes(gm: fx.GraphModule, batch: tuple) -> int:
    """Largest live activation memory of one batch through ``gm`` (for choosing frontier execution)."""
    st = _Stepper(gm, [batch])
    peak = 0
    while st.pos < len(st.nodes):
        st.step()
        peak = max(peak, st.live_bytes())
    return peak


_ADDS = (operator.add, operator.iadd, torch.add)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _bn_after(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    """``(BatchNorm node, its per-channel scale γ/√(σ²+ε))`` when ``node``'s only user is an eval BatchNorm."""
    nxt = _only_user(node)
    if nxt is None or nxt.op != "call_module":
        return None
    bn = gm.get_submodule(str(nxt.target))
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
        return None
    scale = (bn.running_var.detach().double() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    return nxt, scale


def _residual_join(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor | None] | None:
    """Where ``node``'s output joins a residual sum: ``(other operand of the add, per-channel scale)``.

    Matches ``node → add`` and ``node → BatchNorm (eval statistics) → add``; the scale is the BatchNorm's
    γ/√(σ²+ε) (None: no BatchNorm between). Anything else (an activation between, a second user, a sum of
    the output with itself) is not a residual join.
    """
    scale = None
    after = _bn_after(gm, node)
    if after is not None:
        node, scale = after
    nxt = _only_user(node)
    if nxt is None or nxt.op != "call_function" or nxt.target not in _ADDS or nxt.kwargs or len(nxt.args) != 2:
        return None
    a, b = nxt.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or node not in (a, b) or a is b:
        return None
    # every step has one user, so the other operand cannot depend on this layer's output
    return (b if a is node else a), scale


def _gives_output_of(gm: fx.GraphModule, node: fx.Node, layer: str) -> bool:
    """Whether ``node``'s value is ``layer``'s output: the layer itself, or a Sequential (nested) ending with it."""
    name = str(node.target)
    while name != layer:
        mod = gm.get_submodule(name)
        if type(mod).forward is not nn.Sequential.forward or not len(mod) or not layer.startswith(name + "."):
            return False
        name = f"{name}.{list(mod._modules)[-1]}"
    return True


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu_)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return node.op == "call_module" and type(gm.get_submodule(str(node.target))) is nn.ReLU


def _relu_after(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor | None] | None:
    """Where ``node``'s output reaches a ReLU: ``(the ReLU's input node, the BatchNorm scale between or None)``.

    Matches ``node → [BatchNorm] → [residual sum] → ReLU``, every step the only user of the one before (the
    sum as :func:`_residual_join` accepts it).
    """
    head, scale = node, None
    after = _bn_after(gm, node)
    if after is not None:
        head, scale = after
    nxt = _only_user(head)
    if nxt is not None and _residual_join(gm, node) is not None:
        head, nxt = nxt, _only_user(nxt)
    if nxt is None or not _is_relu(gm, nxt):
        return None
    return head, scale


def _relax_for_relu(y: torch.Tensor, pred: torch.Tensor, v: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Targets that ask only for what the ReLU after the layer passes on; and how many positions were relaxed.

    With v the original's ReLU input and a the scale between the layer and it, the converted model's ReLU
    input is ``u(ŷ) = v + a·(ŷ − y)`` (exactly, for block targets too). Where the original's ReLU outputs zero
    (v ≤ 0) any ŷ with u(ŷ) ≤ 0 gives the same result, so the target there becomes the current output
    ``pred`` projected onto that set: ``pred`` itself when already below, else the boundary ``y − v/a``.
    One step of alternating minimisation over (weights, feasible targets); channels with a = 0 keep y.
    """
    if scale is None:
        a = torch.ones((), dtype=y.dtype, device=y.device)
    else:
        a = scale.to(device=y.device, dtype=y.dtype).reshape(1, -1, *([1] * (y.dim() - 2)))
    dead = (v <= 0) & (a != 0)
    safe = torch.where(a != 0, a, torch.ones_like(a))
    below = v + a * (pred - y) <= 0  # the current output already zeroed by the ReLU
    relaxed = torch.where(dead, torch.where(below, pred, y - v / safe), y)
    return relaxed, int(dead.sum())


def _block_targets(cs: _Stepper, rs: _Stepper, c_join: tuple, r_join: tuple, ys: list[list[torch.Tensor]]) -> bool:
    """Shift the layer's targets so the residual sum after it matches the original's (in place).

    With s the other operand of the sum and a the BatchNorm scale between (1 without one), the original
    computes ``a·y + s`` and the converted model ``a·y' + s'``; the target ``y + (s − s')/a`` makes the layer
    cancel the error its shortcut carries. Channels with a = 0 keep the plain target.
    """
    c_other, scale = c_join
    r_other = r_join[0]
    inv = None if scale is None else torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    shifted = []
    for i, ys_i in enumerate(ys):
        if len(ys_i) != 1:
            return False
        y = ys_i[0]
        try:
            s_r, s_c = rs.value(r_other, i), cs.value(c_other, i)
        except SurgeryError:  # a value the walk no longer holds: keep the layer's own target
            return False
        if not (isinstance(s_r, torch.Tensor) and isinstance(s_c, torch.Tensor)) or s_r.shape != y.shape \
                or s_c.shape != y.shape:
            return False
        d = (s_r - s_c).double()
        if inv is not None:
            d = d * inv.to(d.device).reshape(1, -1, *([1] * (d.dim() - 2)))
        shifted.append([(y.double() + d).to(y.dtype)])
    ys[:] = shifted
    return True


class _ReluTargets:
    """Targets for a layer before a ReLU, relaxed around the layer's current output (:func:`_relax_for_relu`),
    and the error of that output as the ReLU sees it.

    ``r_head`` is the original's ReLU input node and ``scale`` the BatchNorm scale between layer and ReLU.
    :meth:`__call__` takes batch ``i``'s targets and the layer's current output on it, returns the relaxed
    targets and adds to the running error: a position the original's ReLU zeroes counts only by how far the
    output would pass the ReLU. A batch whose values are missing or do not line up keeps its targets and
    makes :attr:`error` None.
    """

    def __init__(self, rs: _Stepper, r_head: fx.Node, scale: torch.Tensor | None) -> None:
        self.rs, self.r_head, self.scale = rs, r_head, scale
        self.err = self.norm = 0.0
        self.dead = self.total = 0
        self.ok = True

    def __call__(self, i: int, ys: list[Any], pred: Any) -> list[Any]:
        try:
            v = self.rs.value(self.r_head, i) if len(ys) == 1 else None
        except SurgeryError:
            v = None
        y = ys[0] if len(ys) == 1 else None
        if not all(isinstance(t, torch.Tensor) and t.shape == y.shape for t in (y, v, pred)):
            self.ok = False
            return ys
        relaxed, dead = _relax_for_relu(y, pred, v, self.scale)
        self.err += float((pred - relaxed).pow(2).sum(dtype=torch.float64))
        self.norm += float(y.pow(2).sum(dtype=torch.float64))
        self.dead, self.total = self.dead + dead, self.total + y.numel()
        return [relaxed]

    @property
    def error(self) -> float | None:
        """Relative error of the outputs seen so far, as the ReLU sees it (None when a batch did not line up)."""
        if not self.ok or self.norm <= 0:
            return None
        return math.sqrt(self.err / self.norm)


def _outputs(cs: _Stepper, node: fx.Node, ys_all: list[list[Any]], relu: _ReluTargets) -> _ReluTargets:
    """Run the layer's node on every batch (current weights) through ``relu``, for its error."""
    for i, ys in enumerate(ys_all):
        relu(i, ys, cs.call(node, i))
    return relu


def _fill(acc: Any, cs: _Stepper, node: fx.Node, layer: nn.Module, ys_all: list[list[Any]],
          relu: _ReluTargets | None = None, relax: bool = False) -> Any:
    """Feed ``acc`` every batch's layer inputs (from the converted model) and targets; stops with a reason.

    With ``relu``, the node runs whole and its output goes through ``relu`` (its error is measured); with
    ``relax`` too, the relaxed targets are the ones fed.
    """
    count = None
    for i, ys in enumerate(ys_all):
        out: list[Any] = []
        xs = _capture(layer, lambda i=i, out=out: out.append(cs.call(node, i)), inputs=True,
                      stop_after=None if relu is not None else count)
        if relu is not None:
            relaxed = relu(i, ys, out[0] if out else None)
            ys = relaxed if relax else ys
        if count is None:
            count = len(xs)
        if len(xs) != len(ys) or not xs:
            acc.info.reason = (f"called {len(xs)}× in the converted model but {len(ys)}× in the "
                               "original: cannot pair inputs with targets")
            break
        if not all(isinstance(y, torch.Tensor) for y in ys) or not all(acc.add(x, y) for x, y in zip(xs, ys)):
            acc.info.reason = acc.info.reason or "the original module does not return a tensor"
            break
    return acc


def _refit_frontier(
    converted: fx.GraphModule, reference: fx.GraphModule, batches: Sequence[tuple], specs: Sequence[RefitSpec],
    ridge: float, block: bool = False, relu: bool = False,
) -> tuple[list[LayerRefit], list[Any], list[Any]]:
    """Refit ``specs`` (in network order) with one node-by-node pass over each model.

    With ``block``, a layer whose output joins a residual sum (through at most a BatchNorm) is refit to
    make the *sum* match the original's (:func:`_block_targets`), not its own output. With ``relu``, a layer
    whose output (or sum) reaches a ReLU is asked only for what the ReLU passes on (:func:`_relax_for_relu`).
    Returns the per-layer results, and the converted (refit) and reference outputs per batch.
    """
    cs, rs = _Stepper(converted, batches), _Stepper(reference, batches)
    results: list[LayerRefit] = []
    by_node: dict[fx.Node, list[RefitSpec]] = {}
    ref_last: dict[str, int] = {}
    ref_index = {n: i for i, n in enumerate(rs.nodes)}
    joins: dict[str, tuple] = {}
    relus: dict[str, tuple] = {}
    for s in specs:
        sites = _containing_nodes(converted, s.layer)
        ref_sites = _containing_nodes(reference, s.reference)
        if len(sites) != 1:
            why = "not called by the graph" if not sites else f"called from {len(sites)} graph nodes (shared)"
            results.append(LayerRefit(s.target, s.layer, s.reference, reason=why))
        elif not ref_sites:
            results.append(LayerRefit(s.target, s.layer, s.reference,
                                      reason="the original module is not called by the original's graph"))
        else:
            by_node.setdefault(sites[0], []).append(s)
            ref_last[s.layer] = max(ref_index[n] for n in ref_sites)
            whole = len(ref_sites) == 1 and _gives_output_of(converted, sites[0], s.layer)
            if block and whole:
                c_join, r_join = _residual_join(converted, sites[0]), _residual_join(reference, ref_sites[0])
                if c_join is not None and r_join is not None:
                    joins[s.layer] = (c_join, r_join)
            if relu and whole:
                c_relu, r_relu = _relu_after(converted, sites[0]), _relu_after(reference, ref_sites[0])
                if c_relu is not None and r_relu is not None:
                    relus[s.layer] = (r_relu[0], c_relu[1])  # the original's ReLU input, the running BN's scale
    targets: dict[str, list[list[torch.Tensor]]] = {}
    handles = []
    for specs_here in by_node.values():
        for s in specs_here:
            targets[s.layer] = [[] for _ in batches]

            def hook(mod, args, out, key=s.layer):
                targets[key][rs.batch].append(out.detach() if isinstance(out, torch.Tensor) else out)

            handles.append(reference.get_submodule(s.reference).register_forward_hook(hook))
    try:
        for node in cs.nodes:
            for s in by_node.get(node, []):
                while rs.pos <= ref_last[s.layer]:
                    rs.step()
                layer = converted.get_submodule(s.layer)
                block_kind = s.layer in joins and _block_targets(cs, rs, *joins[s.layer], targets[s.layer])
                ys_all = targets.pop(s.layer)
                relu_at = relus.get(s.layer)
                before = _ReluTargets(rs, *relu_at) if relu_at is not None else None
                saved = {k: v.clone() for k, v in layer.state_dict().items()} if before is not None else None
                acc = _fill(_accumulator(s, layer, _samples(batches)), cs, node, layer, ys_all, before)
                info = acc.finish(ridge)
                info.target_kind = "block" if block_kind else "layer"
                if before is not None and before.error is not None and info.error_before is not None:
                    # targets relaxed where the original's ReLU outputs zero, around the plain fit and then each
                    # refit (alternating minimisation); the inputs, so the Gram matrix, stay the same
                    for _ in range(RELU_ROUNDS):
                        nxt = _accumulator(s, layer, _samples(batches))
                        nxt.reuse_gram(acc)
                        _fill(nxt, cs, node, layer, ys_all, _ReluTargets(rs, *relu_at), relax=True).finish(ridge)
                    after = _outputs(cs, node, ys_all, _ReluTargets(rs, *relu_at)).error
                    if after is not None:
                        if after >= before.error:
                            layer.load_state_dict(saved)
                            after = before.error
                        info.error_before, info.error_after = before.error, after
                        info.relu_relaxed = before.dead / max(before.total, 1)
                        info.refit = after < before.error
                        info.reason = "" if info.refit else "the refit did not lower the error; weights kept"
                results.append(info)
            cs.step()
        ref_out = rs.run_to_end()
    finally:
        for h in handles:
            h.remove()
    return results, cs.outputs, ref_out


def _bn_frontier(converted: fx.GraphModule, batches: Sequence[tuple], names: Sequence[str]) -> tuple[int, list[Any]]:
    """Re-estimate BatchNorm statistics exactly, in network order, with one node-by-node pass."""
    cs = _Stepper(converted, batches)
    order = {n: i for i, n in enumerate(_call_order(converted, batches[0], names))} if names else {}
    by_node: dict[fx.Node, list[str]] = {}
    for n in names:
        sites = _containing_nodes(converted, n)
        if len(sites) == 1:  # a BatchNorm shared between call sites keeps its statistics
            by_node.setdefault(sites[0], []).append(n)
    done = 0
    for node in cs.nodes:
        for n in sorted(by_node.get(node, []), key=lambda n: order.get(n, 0)):
            bn = converted.get_submodule(n)
            stats = _BNStats(bn)
            count = None
            for i in range(len(batches)):
                xs = _capture(bn, lambda i=i, node=node: cs.call(node, i), inputs=True, stop_after=count)
                count = count or len(xs)
                for x in xs:
                    stats.add(x)
            stats.finish()
            done += 1
        cs.step()
    return done, cs.outputs


def _refit_streaming(
    converted: nn.Module, reference: nn.Module, batches: Sequence[tuple], spec: RefitSpec, ridge: float,
    device: torch.device | None,
) -> LayerRefit:
    """Refit one layer by running both models on every batch up to the layer (for models fx cannot step)."""
    layer = converted.get_submodule(spec.layer)
    ref_mod = reference.get_submodule(spec.reference)
    acc = _accumulator(spec, layer, _samples(batches))
    counts: tuple[int, int] | None = None
    for batch in batches:
        batch = _to_device(batch, device)
        # the first batch runs whole, to learn how often each side calls its module; later ones stop early
        ys = _capture(ref_mod, lambda b=batch: _forward(reference, b, "the original model"), inputs=False,
                      stop_after=counts[0] if counts else None)
        xs = _capture(layer, lambda b=batch: _forward(converted, b, "the converted model"), inputs=True,
                      stop_after=counts[1] if counts else None)
        if counts is None:
            counts = (len(ys), len(xs))
        if len(xs) != len(ys) or not xs:
            acc.info.reason = (f"called {len(xs)}× in the converted model but {len(ys)}× in the original: "
                               "cannot pair inputs with targets")
            break
        if not all(acc.add(x, y) for x, y in zip(xs, ys)):
            break
    return acc.finish(ridge)


def _bn_streaming(model: nn.Module, batches: Sequence[tuple], names: Sequence[str], device: torch.device | None) -> int:
    """Exact BatchNorm statistics in network order, one pass over the data per BatchNorm (no fx needed)."""
    done = 0
    for n in _call_order(model, _to_device(batches[0], device), names):
        bn = model.get_submodule(n)
        stats = _BNStats(bn)
        count = None
        for b in batches:
            b = _to_device(b, device)
            xs = _capture(bn, lambda b=b: _forward(model, b, "the converted model"), inputs=True, stop_after=count)
            count = count or len(xs)
            for x in xs:
                stats.add(x)
        stats.finish()
        done += 1
    return done


# ---------------------------------------------------------------------------------------------------------
# BatchNorm


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _downstream_batchnorms(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """BatchNorm modules whose input depends on any of ``targets`` (all of them if ``model`` is not fx)."""
    all_bn = [n for n, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats
              and m.running_mean is not None]
    if not isinstance(model, fx.GraphModule):
        return all_bn
    targets = list(targets)

    def touches(node_target: str) -> bool:
        return any(t == node_target or t.startswith(node_target + ".") for t in targets)

    frontier = [n for n in model.graph.nodes if n.op == "call_module" and touches(str(n.target))]
    reached: set[fx.Node] = set()
    while frontier:
        node = frontier.pop()
        if node in reached:
            continue
        reached.add(node)
        frontier.extend(node.users)
    out: list[str] = []
    for node in model.graph.nodes:
        if node in reached and node.op == "call_module":
            name = str(node.target)
            for n in all_bn:
                if (n == name or n.startswith(name + ".")) and n not in out:
                    out.append(n)
    return out


def reestimate_batchnorm(model: nn.Module, batches: Any, names: Iterable[str] | None = None) -> int:
    """Recompute the running mean/variance of BatchNorm layers (``names``; default all) on ``batches``.

    The statistics are exact over all the data, in network order: each BatchNorm sees inputs normalised by
    the (already re-estimated) statistics before it, as in inference, so the result does not depend on how
    the data is batched or ordered (a batch of one class would skew train-mode batch statistics). Modes
    are restored. Returns how many BatchNorm layers were updated.

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> reestimate_batchnorm(net, torch.randn(8, 3, 9, 9))
    1
    """
    batches = as_batches(batches)
    names = [n for n, m in model.named_modules() if isinstance(m, _BN)] if names is None else list(names)
    names = [n for n in names if getattr(model.get_submodule(n), "running_mean", None) is not None]
    if not names:
        return 0
    dev = _device_of(model)
    with _eval_modes(model), torch.no_grad():
        if isinstance(model, fx.GraphModule):
            done, _ = _bn_frontier(model, [_to_device(b, dev) for b in batches], names)
        else:
            done = _bn_streaming(model, batches, names, dev)
    return done


# ---------------------------------------------------------------------------------------------------------
# the whole calibration


def _samples(batches: Sequence[tuple]) -> int:
    return sum(int(b[0].shape[0]) if isinstance(b[0], torch.Tensor) and b[0].dim() else 1 for b in batches)


def _rel_error(outputs: Sequence[Any], references: Sequence[Any]) -> float:
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


#: frontier execution keeps every batch's live activations at once; above this it streams instead
FRONTIER_MAX_BYTES = 3 * 2**30


def _choose_mode(
    converted: nn.Module, original: nn.Module, batches: Sequence[tuple], mode: str
) -> tuple[str, fx.GraphModule | None]:
    """``"frontier"`` when both models are fx graphs and all batches' activations fit, else ``"streaming"``."""
    if mode == "streaming":
        return "streaming", None
    ref_gm = original if isinstance(original, fx.GraphModule) else None
    if ref_gm is None and isinstance(converted, fx.GraphModule):
        from .tracing import trace

        try:
            ref_gm = trace(original)
        except Exception:  # an original fx cannot trace still calibrates, by streaming
            ref_gm = None
    if not isinstance(converted, fx.GraphModule) or ref_gm is None:
        if mode == "frontier":
            raise SurgeryError("calibrate: mode='frontier' needs both models as torch.fx graphs")
        return "streaming", None
    if mode == "auto":
        need = (_peak_bytes(converted, batches[0]) + _peak_bytes(ref_gm, batches[0])) * len(batches)
        if need > FRONTIER_MAX_BYTES:
            return "streaming", None
    return "frontier", ref_gm


def calibrate(
    converted: nn.Module,
    original: nn.Module,
    calibration: Any,
    *,
    rewrites: Iterable[Any] | None = None,
    ridge: float = DEFAULT_RIDGE,
    bn: bool | str = "auto",
    mode: str = "auto",
    targets: str = "block",
    relu: bool = True,
) -> CalibrationReport:
    """Refit ``converted``'s rewritten layers, in network order, to reproduce ``original`` on real data.

    Edits ``converted`` in place; ``original`` is only run. Each refit layer's inputs come from the
    converted model as calibrated so far and its targets from the original layer in the original model
    (see the module docstring for the maths). A refit that would not lower the layer's error on the
    calibration data is not applied.

    Args:
        converted: the model from :func:`fxsurgeon.convert` (or any model whose module names match).
        original: the model before conversion (same qualified names for the rewritten modules).
        calibration: a tensor (one batch) or an iterable of batches (tensors or tuples of inputs), e.g. a
            few hundred to a few thousand training images. Iterated once per refit layer.
        rewrites: the rewrites to calibrate; default: every rewrite in ``converted``'s record.
        ridge: λ as a fraction of the mean eigenvalue of the layer's input Gram matrix (shrinks the refit
            towards the current weights).
        bn: re-estimate the statistics of BatchNorm layers downstream of the rewrites: ``True``, ``False`` or
            ``"auto"`` (keep the new statistics only when the output error on the calibration data falls).
        mode: ``"frontier"`` runs fx graphs node by node over all batches at once (each node once per batch;
            memory: the widest cut of activations times the data), ``"streaming"`` re-runs the models up to
            each layer batch by batch (any model, little memory, slower); ``"auto"`` picks frontier when the
            activations fit in :data:`FRONTIER_MAX_BYTES`.
        targets: ``"block"`` refits a layer that feeds a residual sum (through at most a BatchNorm) to make
            the sum match the original's; ``"layer"`` matches each layer's own output. Block targets need
            frontier mode (streaming uses layer targets); each layer's ``target_kind`` says which it got.
        relu: a layer whose output (or residual sum) goes through at most a BatchNorm into a ReLU is asked
            only for what the ReLU passes on: where the original's ReLU outputs zero, any output the ReLU
            also zeroes is as good. After the plain fit, :data:`RELU_ROUNDS` refits to targets relaxed there
            (alternating minimisation; the Gram matrix is reused). Such a layer's ``relu_relaxed`` is the share
            of positions the original's ReLU zeroes, and its errors are measured as the ReLU sees them (a zeroed
            position counts only by how far the output would pass the ReLU). Frontier mode only.


    Returns:
        A :class:`CalibrationReport`; the converted model's record, when it has one, gets it at
        ``extras["calibration"]`` and each rewrite gets ``details["calibration"]`` (error before/after).

    >>> import torch, torch.nn as nn, fxsurgeon
    >>> net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    >>> small = fxsurgeon.convert(net, separable=dict(multiplier=1))
    >>> rep = calibrate(small, net, [torch.randn(8, 8, 12, 12) for _ in range(4)])
    >>> rep.output_error_after < rep.output_error_before
    True
    """
    from .record import Conversion, find_record

    if mode not in ("auto", "frontier", "streaming"):
        raise SurgeryError(f"calibrate: mode must be 'auto', 'frontier' or 'streaming', got {mode!r}")
    if targets not in ("layer", "block"):
        raise SurgeryError(f"calibrate: targets must be 'layer' or 'block', got {targets!r}")
    if not isinstance(relu, bool):
        raise SurgeryError(f"calibrate: relu must be True or False, got {relu!r}")
    if bn not in (True, False, "auto"):
        raise SurgeryError(f"calibrate: bn must be True, False or 'auto', got {bn!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise SurgeryError(f"calibrate: ridge must be a number >= 0, got {ridge!r}")
    t0 = time.perf_counter()
    batches = as_batches(calibration)
    record = find_record(converted)
    if rewrites is None:
        if not isinstance(record, Conversion):
            raise SurgeryError("calibrate: the converted model carries no fxsurgeon record; pass rewrites=")
        rewrites = record.rewrites
    rewrites = list(rewrites)
    report = CalibrationReport(batches=len(batches), options={"ridge": ridge, "bn": bn, "targets": targets,
                                                                  "relu": relu})
    report.samples = sum(int(b[0].shape[0]) for b in batches if isinstance(b[0], torch.Tensor) and b[0].dim())
    if not rewrites:
        report.seconds = time.perf_counter() - t0
        return report
    device = _device_of(converted)
    batches = [_to_device(b, device) for b in batches]
    with _eval_modes(converted, original), torch.no_grad():
        report.mode, ref_gm = _choose_mode(converted, original, batches, mode)
        specs, skipped = refit_specs(converted, original, rewrites)
        order = _call_order(converted, batches[0], [s.layer for s in specs])
        by_layer = {s.layer: s for s in specs}
        specs = [by_layer[n] for n in order]
        before = [_forward(converted, b, "the converted model") for b in batches]
        if report.mode == "frontier":
            results, after, ref_out = _refit_frontier(converted, ref_gm, batches, specs, float(ridge),
                                                      block=targets == "block", relu=relu)
        else:
            ref_out = [_forward(original, b, "the original model") for b in batches]
            results = [_refit_streaming(converted, original, batches, s, float(ridge), None) for s in specs]
            after = [_forward(converted, b, "the converted model") for b in batches]
        rank = {n: i for i, n in enumerate(order)}
        report.layers = sorted(results, key=lambda r: rank.get(r.layer, -1)) + skipped
        report.output_error_before = _rel_error(before, ref_out)
        del before
        err = _rel_error(after, ref_out)
        if bn is not False:
            bns = _downstream_batchnorms(converted, [r.target for r in rewrites])
            saved = {n: {k: v.clone() for k, v in converted.get_submodule(n).state_dict().items()} for n in bns}
            if report.mode == "frontier":
                count, with_bn = _bn_frontier(converted, batches, bns)
            else:
                count = _bn_streaming(converted, batches, bns, None)
                with_bn = [_forward(converted, b, "the converted model") for b in batches]
            err_bn = _rel_error(with_bn, ref_out) if count else err
            keep = bool(count) and (bn is True or err_bn < err)
            report.batchnorm = {"modules": count, "output_error_without": err, "output_error_with": err_bn,
                                "kept": keep}
            if keep:
                err = err_bn
            else:
                for n, st in saved.items():
                    converted.get_submodule(n).load_state_dict(st)
        report.output_error_after = err
    report.seconds = time.perf_counter() - t0
    if isinstance(record, Conversion):
        annotate_record(record, report)
    return report


def annotate_record(record: Any, report: CalibrationReport) -> None:
    """Put ``report`` in ``record.extras["calibration"]`` and each rewrite's ``details["calibration"]``.

    A rewrite with one refit layer gets ``{"layer", "error_before", "error_after", "refit"[, "reason"]}``;
    one with several (a concat fusion's consumers) gets a list of them.
    """
    record.extras["calibration"] = report.to_dict()
    per: dict[str, list[dict[str, Any]]] = {}
    for x in report.layers:
        entry = {"layer": x.layer, "error_before": x.error_before, "error_after": x.error_after, "refit": x.refit}
        if x.reason:
            entry["reason"] = x.reason
        per.setdefault(x.target, []).append(entry)
    for rw in record.rewrites:
        if rw.target in per:
            entries = per[rw.target]
            rw.details["calibration"] = entries[0] if len(entries) == 1 else entries


# ---------------------------------------------------------------------------------------------------------
# data-aware errors for budget allocation

#: activations kept per layer for :func:`measure_choices` (elements of the conv's input)
MEASURE_MAX_ELEMENTS = 2**21


def _last_refittable(module: nn.Module) -> nn.Module | None:
    if _is_refittable(module):
        return module
    if isinstance(module, nn.Sequential) and len(module) and _is_refittable(module[-1]):
        return module[-1]
    return None


def measure_choices(
    gm: nn.Module,
    options: Sequence[Any],
    convs: dict[str, nn.Conv2d],
    calibration: Any,
    *,
    ridge: float = DEFAULT_RIDGE,
    max_elements: int = MEASURE_MAX_ELEMENTS,
) -> list[Any]:
    """Each choice's error measured on data: the relative squared output error left after calibration.

    Runs ``gm`` (the model before rewriting) on the calibration batches to record each conv's inputs (up to
    ``max_elements`` per layer), then for every choice builds its module, refits it by the same
    regularised least squares :func:`calibrate` uses (depthwise and pointwise jointly where it can, from
    statistics of the layer's input patches shared by all choices), and measures ``||y' − y||² / ||y||²``
    against the conv's own output. That is the error calibration will leave (before the drift from earlier layers),
    comparable across layers and forms — unlike weight errors, which ignore what the inputs look like.

    Args:
        gm: the model the convs belong to.
        options: :class:`fxsurgeon.allocation.LayerOptions` whose choices are to be measured.
        convs: layer name → the conv module.
        calibration: input batches (see :func:`as_batches`).

    Returns:
        New ``LayerOptions`` with measured errors and ``weight=1``.
    """
    from dataclasses import replace

    from .forms import get_form

    batches = as_batches(calibration)
    dev = _device_of(gm)
    store: dict[str, list[torch.Tensor]] = {o.name: [] for o in options}
    size = dict.fromkeys(store, 0)

    def hook_for(name: str):
        def hook(mod, args, out):
            if size[name] < max_elements and args and isinstance(args[0], torch.Tensor):
                x = args[0].detach()
                keep = max(1, min(x.shape[0], -(-(max_elements - size[name]) // max(x[0].numel(), 1))))
                store[name].append(x[:keep])
                size[name] += x[:keep].numel()
        return hook

    handles = [convs[o.name].register_forward_hook(hook_for(o.name)) for o in options]
    try:
        with _eval_modes(gm), torch.no_grad():
            for b in batches:
                if all(v >= max_elements for v in size.values()):
                    break
                _forward(gm, _to_device(b, dev), "the original model")
    finally:
        for h in handles:
            h.remove()
    out = []
    with torch.no_grad():
        for o in options:
            conv = convs[o.name]
            xs = store.pop(o.name)
            if not xs:
                raise SurgeryError(f"measure_choices: conv '{o.name}' was not called on the calibration data")
            x = torch.cat(xs)
            y = conv(x)
            yy = float(y.double().pow(2).sum())
            shared: _SeparableAccumulator | None = None  # input-patch statistics: the same for every choice
            choices = []
            for c in o.choices:
                if c.form == "original" or c.exact or yy == 0:
                    choices.append(replace(c, error=0.0 if (c.form == "original" or c.exact) else c.error))
                    continue
                module, _ = get_form(c.form).build(conv, c.rank)
                module.eval()
                spec = RefitSpec(o.name, o.name, o.name, kind="separable")
                if separable_refittable(module):
                    # one alternation: a cheaper estimate of what calibration leaves, for ranking choices
                    acc = _SeparableAccumulator(spec, module, iterations=1)
                    if shared is not None and shared.gram.shape == acc.gram.shape:
                        acc.gram, acc.cross, acc.yy, acc.n = shared.gram, shared.cross, shared.yy, shared.n
                    else:
                        acc.add(x, y)
                        shared = acc
                    info = acc.finish(ridge)
                    err = (info.error_after or 0.0) ** 2 * yy if info.error_after is not None else math.inf
                else:
                    last = _last_refittable(module)
                    if last is None:  # nothing to refit: the plain output error
                        err = float((module(x) - y).double().pow(2).sum())
                    else:
                        acc = _Accumulator(spec, last)
                        feats = _capture(last, lambda m=module, x=x: m(x), inputs=True, stop_after=1)
                        acc.add(feats[0], y)
                        w = ridge_refit(acc.gram, acc.cross, acc.w0, ridge)
                        err = min(residual(acc.gram, acc.cross, acc.yy, w), residual(acc.gram, acc.cross, acc.yy, acc.w0))
                choices.append(replace(c, error=err / yy))
            out.append(replace(o, choices=tuple(choices), weight=1.0))
    return out


def output_sensitivity(
    model: nn.Module, names: Sequence[str], calibration: Any, *, samples: int = 1000, noise: float = 0.1,
    seed: int = 0,
) -> dict[str, float]:
    """How much ``model``'s outputs move per unit of relative error at each named layer's output.

    For each layer, seeded Gaussian noise of relative norm ``noise`` is added to its output (one forward per
    layer, over the first ``samples`` calibration samples) and ``(||Δout|| / ||out||)² / noise²`` is the
    layer's sensitivity: the factor by which a relative squared error there reaches the outputs, to first
    order. A budget weighted by it spends MACs where the network amplifies errors, not where layers merely
    have large relative errors (the spread is wide: 100× across the ResNet-20's 3×3 convs).
    """
    from torch.utils._pytree import tree_flatten

    batches, n = [], 0
    for b in as_batches(calibration):
        if n >= samples:
            break
        x = b[0]
        take = samples - n if isinstance(x, torch.Tensor) and x.dim() else None
        batches.append(tuple(t[:take] if isinstance(t, torch.Tensor) and t.dim() else t for t in b) if take else b)
        n += int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1
    dev = _device_of(model)
    batches = [_to_device(b, dev) for b in batches]

    def flat(out: Any) -> torch.Tensor:
        leaves, _ = tree_flatten(out)
        return torch.cat([t.detach().double().reshape(-1) for t in leaves
                          if isinstance(t, torch.Tensor) and t.is_floating_point()])

    out: dict[str, float] = {}
    with _eval_modes(model), torch.no_grad():
        clean = [flat(_forward(model, b, "the model")) for b in batches]
        norm2 = sum(float(c.pow(2).sum()) for c in clean)
        for name in names:
            gen = torch.Generator(device="cpu").manual_seed(seed)

            def hook(mod, args, y, gen=gen):
                z = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.device, y.dtype)
                return y + noise * y.norm() / z.norm().clamp_min(1e-30) * z

            h = model.get_submodule(name).register_forward_hook(hook)
            try:
                moved = sum(float((flat(_forward(model, b, "the model")) - c).pow(2).sum())
                            for b, c in zip(batches, clean))
            finally:
                h.remove()
            out[name] = moved / norm2 / noise ** 2 if norm2 > 0 else 1.0
    return out
