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
  (:class:`SeparableAccumulator`).
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
run node by node over all batches at once (each node once per batch, :class:`Stepper`); other models, or
data too large to hold, re-run the network up to each layer batch by batch.

The package, one idea per module: ``solve`` (least-squares maths), ``data`` (batches, errors), ``specs`` (what to
refit, the records), ``stats`` and ``separable_stats`` (one layer's statistics and refit), ``stepper`` (running
the models), ``targets`` (block and ReLU-aware targets), ``refit`` (the walk in network order), ``batchnorm``,
``core`` (:func:`calibrate`), ``measure`` (data-aware errors for budget allocation). Tuning constants live in
their module and are read at call time there: set ``fxsurgeon.calibrate.separable_stats.SEPARABLE_ITERATIONS``,
not a copy on this package.
"""

from __future__ import annotations

from .batchnorm import reestimate_batchnorm
from .core import FRONTIER_MAX_BYTES, annotate_record, calibrate
from .data import as_batches, output_error
from .measure import MEASURE_MAX_ELEMENTS, measure_choices, output_sensitivity
from .refit import RELU_ROUNDS
from .separable_stats import DEPTHWISE_MAX_UNKNOWNS, REFIT_REDUCE, SEPARABLE_ITERATIONS
from .solve import DEFAULT_RIDGE, residual, ridge_cg, ridge_refit
from .specs import (
    SEPARABLE_MAX_COLUMNS,
    CalibrationReport,
    LayerRefit,
    RefitSpec,
    refit_specs,
    separable_refittable,
)
from .stats import DOWNSTREAM_ROWS_PER_UNKNOWN, rows_cap

__all__ = [
    "DEFAULT_RIDGE",
    "DEPTHWISE_MAX_UNKNOWNS",
    "DOWNSTREAM_ROWS_PER_UNKNOWN",
    "FRONTIER_MAX_BYTES",
    "MEASURE_MAX_ELEMENTS",
    "REFIT_REDUCE",
    "RELU_ROUNDS",
    "SEPARABLE_ITERATIONS",
    "SEPARABLE_MAX_COLUMNS",
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
    "residual",
    "ridge_cg",
    "ridge_refit",
    "rows_cap",
    "separable_refittable",
]
