"""Least-squares statistics of one refit layer (a groups=1 conv or a Linear): ZᵀZ, ZᵀY and ||Y||² fed batch
by batch on a seeded subset of the samples, then the ridge refit; and exact BatchNorm statistics."""

from __future__ import annotations

import math

import torch
from torch import nn

from .solve import residual, ridge_refit
from .specs import LayerRefit, RefitSpec, conv_padding

__all__ = [
    "ADD_MAX_ELEMENTS",
    "DOWNSTREAM_ROWS_PER_UNKNOWN",
    "Accumulator",
    "BNStats",
    "RefitStatistics",
    "as_rows",
    "rows_cap",
    "write_back",
]


def as_rows(t: torch.Tensor, linear: bool) -> torch.Tensor:
    """Activations → (samples, features): channels last for a conv's output, last axis for a Linear."""
    t = t.detach()
    if not linear:
        t = t.movedim(1, -1)
    return t.reshape(-1, t.shape[-1])


def _input_rows(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """A layer's input → (samples, weight columns): im2col patches for a k×k conv (the weight's layout)."""
    if isinstance(layer, nn.Linear):
        return as_rows(x, True)
    if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and conv_padding(layer) == (0, 0):
        return as_rows(x, False)
    cols = torch.nn.functional.unfold(x.detach(), layer.kernel_size, dilation=layer.dilation,
                                      padding=conv_padding(layer), stride=layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


#: rows of calibration data per unknown (per output) a downstream layer needs before it is refit (a classifier
#: sees one row per image: timm's resnet50 head, 2,049 unknowns, needs 20,490 images)
DOWNSTREAM_ROWS_PER_UNKNOWN = 10

#: rows × columns handled at once when accumulating (bounds the memory of unfolded k×k inputs)
ADD_MAX_ELEMENTS = 2**25


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
    Each sample is kept or dropped by its own seeded draw, indexed by its position in the whole calibration
    data, so the subset does not depend on how the data is split into batches. Whole samples are dropped
    before any unfolding, so a high-resolution layer costs no more than a small one.
    """

    def __init__(self, samples: int | None, columns: int) -> None:
        self.samples = samples
        self.columns = columns
        self.fraction: float | None = None if samples else 1.0
        self.gen = torch.Generator().manual_seed(0)
        self.draws = torch.empty(0, dtype=torch.float64)
        self.seen = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rows_per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 2 or y.shape[0] != x.shape[0]:
            return x, y
        if self.fraction is None:
            self.fraction = min(1.0, rows_cap(self.columns) / max(rows_per_sample * self.samples, 1.0))
        if self.fraction >= 1.0:
            return x, y
        n = x.shape[0]
        # one draw per sample, in data order (more than the data holds if a layer runs several times a batch)
        while self.draws.numel() < self.seen + n:
            more = torch.rand(max(self.samples or 0, n), generator=self.gen, dtype=torch.float64)
            if not self.draws.numel():
                more[0] = 0.0  # the first sample is always kept: never an empty fit
            self.draws = torch.cat([self.draws, more])
        keep = self.draws[self.seen:self.seen + n] < self.fraction
        self.seen += n
        idx = keep.nonzero().squeeze(1).to(x.device)  # may be empty: the batch adds nothing
        return x[idx], y[idx]


def write_back(layer: nn.Module, w: torch.Tensor, has_bias: bool) -> None:
    """Copy a solution ``w`` (d × c: input columns, then the bias row when ``has_bias``) into a conv or Linear."""
    with torch.no_grad():
        core = w[:-1] if has_bias else w
        layer.weight.copy_(core.T.reshape(layer.weight.shape).to(layer.weight.dtype))
        if has_bias:
            layer.bias.copy_(w[-1].to(layer.bias.dtype))


class RefitStatistics:
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
        self.info = LayerRefit(spec.target, spec.layer, spec.reference, downstream=spec.downstream)
        self.gram_given = False

    def reuse_gram(self, other: RefitStatistics) -> None:
        """Take ``other``'s ZᵀZ (the same inputs, seeded subset and layer): only ZᵀY and ||Y||² are gathered."""
        self.gram, self.gram_given = other.gram, True

    def _sampled_add(self, x: torch.Tensor, y: torch.Tensor, rows_per_sample: int) -> bool:
        """Add one call's input and target on the seeded subset of its samples (nothing when none is kept)."""
        x, y = self.sample(x, y, rows_per_sample)
        return True if x.dim() > 1 and x.shape[0] == 0 else self._add(x, y)

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        raise NotImplementedError

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


class Accumulator(RefitStatistics):
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
        if not self.linear and y.dim() == 2 and x.dim() == 4 and x.shape[-2:] == (1, 1):
            y = y[:, :, None, None]  # a 1×1 conv on pooled features standing for the original's Linear
        channels = y.shape[-1] if self.linear else (y.shape[1] if y.dim() > 1 else 1)
        return self._sampled_add(x, y, y[0].numel() // max(channels, 1) if y.dim() > 1 else 1)

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        # k×k convs unfold into C·k² columns per position: go through the batch in slices to bound memory
        cols = self.w0.shape[0] * (1 if self.linear else max(1, x[0].numel() // max(x.shape[1], 1)))
        step = max(1, ADD_MAX_ELEMENTS // max(cols, 1)) if x.dim() > 1 and x.shape[0] > 1 else max(x.shape[0], 1)
        if x.dim() > 1 and x.shape[0] > step and y.shape[0] == x.shape[0]:
            return all(self._add(x[i:i + step], y[i:i + step]) for i in range(0, x.shape[0], step))
        z, t = _input_rows(x, self.layer), as_rows(y, self.linear)
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
        need = DOWNSTREAM_ROWS_PER_UNKNOWN * self.w0.shape[0]
        if self.spec.downstream and self.n < need:
            # a layer whose weights were right for the original's inputs is only worth changing on data that
            # pins the change down; with fewer rows than unknowns it would fit the calibration data exactly
            info.reason = (f"too few samples to refit: {self.n} rows for {self.w0.shape[0]} unknowns per output "
                           f"(a downstream layer needs {DOWNSTREAM_ROWS_PER_UNKNOWN} per unknown, {need})")
            return info
        before = residual(self.gram, self.cross, self.yy, self.w0)
        w = ridge_refit(self.gram, self.cross, self.w0, ridge)
        after = residual(self.gram, self.cross, self.yy, w)
        info.error_before = math.sqrt(before / self.yy)
        if not math.isfinite(after) or after >= before or not torch.isfinite(w).all():
            info.error_after = info.error_before
            info.reason = "the refit did not lower the error; weights kept"
            return info
        info.error_after = math.sqrt(after / self.yy)
        write_back(self.layer, w, self.has_bias)
        info.refit = True
        return info


class BNStats:
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
