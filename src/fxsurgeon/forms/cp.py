"""CP separable form: a k×k conv as pointwise 1×1 → depthwise k×k → pointwise 1×1 (``"pw-dw-pw"``).

View a conv weight as the 3-way tensor ``T`` of shape (C_out, C_in, k·k). A rank-R CP (CANDECOMP/PARAFAC)
decomposition writes it as a sum of R outer products, ``T ≈ Σ_r λ_r · a_r ∘ b_r ∘ c_r``, and that is a conv
block: a 1×1 conv C_in → R with filters b_r, a depthwise k×k conv on the R channels with filters c_r (it
carries the stride, padding and dilation), and a 1×1 conv R → C_out with columns λ_r·a_r (Lebedev et al.,
ICLR 2015; TensorLy-Torch's ``implementation="mobilenet"``). A 1×1 conv without bias commutes with every
padding mode, so the block computes exactly the CP-approximated conv. The λ scales are folded into the last
1×1 conv: no multiply is left in the graph.

Rank R may exceed C_in and C_out (up to :func:`cp_max_rank`, where the form is exact). The decomposition is
deterministic (:mod:`fxsurgeon.forms.cp_fit`: the best of three slice-SVD starts, refined by ALS with Bro's
line search in float64, :mod:`fxsurgeon.forms.als`). This module is the form around that fit: how much work
each fit may spend (:func:`als_sweeps`, :data:`ALS_RIDGE`), the caches in front of it, the menus of ranks and
errors a budget chooses from (:meth:`PointwiseDepthwisePointwise.choices`), and the block it builds
(:func:`make_cp_separable`).

>>> import torch.nn as nn
>>> conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
>>> f = cp_factors(conv.weight, cp_max_rank(conv.weight.shape))
>>> f.relative_error < 1e-6
True
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError
from ..modules import SeparableConv2d, depthwise_conv_class
from .base import LayerChoice, check_weight, register_form
from .cp_fit import CPFactors, clear_svds, cp_max_rank, fit_cp, fit_threads, slice_svd_init
from .cp_store import active_store

__all__ = [
    "CPFactors",
    "PointwiseDepthwisePointwise",
    "als_sweeps",
    "clear_cache",
    "cp_cost",
    "cp_error_curve",
    "cp_factors",
    "cp_max_rank",
    "cp_rank_grid",
    "make_cp_separable",
    "menu_builds",
    "menu_points",
    "slice_svd_init",
]

#: ALS sweeps when building a layer (where one sweep is cheap, see :data:`BUILD_WORK`). Chosen with
#: benchmarks/defaults_two_models.py on the mean logit error of the trained ResNet-20 and ResNet-32 at 0.60× and
#: 0.45× MACs (``form="auto"``, bias correction): with 12 menu ranks 0.177 at 100 sweeps, 0.166 at 300, 0.163 at
#: 1,000; with :data:`CHOICE_POINTS` = 24, 0.154 at 300, 0.151 at 1,000 (lower in each of the four cases) and
#: 0.151 at 3,000 (higher on the ResNet-20 at 0.45×: a closer weight is not always a closer output)
DEFAULT_ITERATIONS = 1000
#: ALS sweeps behind each error in :meth:`PointwiseDepthwisePointwise.choices`. Same start, same ALS, fewer
#: sweeps, at a third of the cost. Plain ALS never increases the error, so this would bound what the build
#: reaches; with :data:`ALS_RIDGE` the sweeps minimise the ridged error, and the plain error can rise by about
#: the ridge's bias as they go on (a near bound, not a strict one).
CHOICE_ITERATIONS = 30
#: stop when a sweep improves the relative error by less than this
DEFAULT_TOL = 1e-7
#: Tikhonov ridge of every ALS update, relative to the normal matrix's mean diagonal
#: (:func:`fxsurgeon.forms.als.cp_als`). Plain ALS drifts into CP degeneracy on trained weights: components grow
#: and cancel (1×1 weights up to ~170 where the original 3×3 weights stay under 2), which float32 computes well
#: and bfloat16 does not. On the trained ResNet-20/32 at 0.60× and 0.45× MACs, mean logit error in float32 /
#: bfloat16: 0 → 0.151 / 0.334; 1e-5 → 0.152 / 0.181; 1e-4 → 0.155 / 0.164
ALS_RIDGE = 1e-5
#: ranks per layer that :meth:`PointwiseDepthwisePointwise.choices` decomposes (12 → 24: mean logit error
#: 0.166 → 0.154 on the two trained models, with 300 build sweeps; the menu takes twice as long)
CHOICE_POINTS = 24
#: multiply-adds one error on a menu may spend in ALS sweeps (2·C_out·C_in·k²·R per sweep): all
#: :data:`CHOICE_ITERATIONS` sweeps up to 256×256×3×3 at rank 512, fewer (not under
#: :data:`MIN_CHOICE_ITERATIONS`) on wider layers at high rank, where one sweep takes a second or more
CHOICE_WORK = 2e10
MIN_CHOICE_ITERATIONS = 5
#: ... and a build: all :data:`DEFAULT_ITERATIONS` sweeps up to 2·10⁷ multiply-adds a sweep (64×64×3×3 at rank
#: ~270; 128×128×3×3 at rank ~70), fewer above (a build never spends more than this many multiply-adds), never
#: fewer than :data:`CHOICE_ITERATIONS` (so a menu's error stays an upper bound on what the build reaches)
BUILD_WORK = 2e10
#: multiply-adds one layer's whole menu may spend (~2 s on one core): :data:`CHOICE_POINTS` ranks where that is
#: enough (every CIFAR ResNet layer), fewer on wide layers, never under :data:`MIN_CHOICE_POINTS`
MENU_WORK = 2e10
MIN_CHOICE_POINTS = 6


def als_sweeps(shape: tuple[int, ...] | torch.Size, rank: int, *, build: bool) -> int:
    """ALS sweeps spent on a (C_out, C_in, kh, kw) weight at CP rank ``rank``, for a build or a menu's error.

    >>> als_sweeps((64, 64, 3, 3), 128, build=True), als_sweeps((512, 512, 3, 3), 1376, build=False)
    (1000, 5)
    """
    c_out, c_in, kh, kw = shape
    per_sweep = 2 * c_out * c_in * kh * kw * max(rank, 1)
    most, least, work = ((DEFAULT_ITERATIONS, CHOICE_ITERATIONS, BUILD_WORK) if build else
                         (CHOICE_ITERATIONS, MIN_CHOICE_ITERATIONS, CHOICE_WORK))
    return int(max(least, min(most, work // per_sweep)))


def cp_cost(shape: tuple[int, ...] | torch.Size, rank: int) -> tuple[int, int, int]:
    """(weights, MACs per input position, MACs per output position) of the block at ``rank``.

    The first 1×1 conv runs before the stride, at the input's resolution; the depthwise and the last 1×1
    run at the output's.

    >>> cp_cost((16, 16, 3, 3), 32)
    (1312, 512, 800)
    """
    c_out, c_in, kh, kw = shape
    return rank * (c_in + kh * kw + c_out), c_in * rank, rank * (kh * kw + c_out)


def cp_factors(
    weight: torch.Tensor,
    rank: int,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    tol: float = DEFAULT_TOL,
    ridge: float | None = None,
) -> CPFactors:
    """Rank-R CP decomposition of a conv weight into 1×1 → depthwise → 1×1 weights, uncached
    (:func:`fxsurgeon.forms.cp_fit.fit_cp` with this form's defaults).

    Args:
        weight: (C_out, C_in, kh, kw) conv weight (groups=1).
        rank: R ≥ 1; capped at :func:`cp_max_rank`, where the result is exact.
        iterations: most ALS sweeps (0: the slice-SVD start alone).
        tol: stop once a sweep improves the relative error by less than this.
        ridge: the ALS updates' Tikhonov ridge (None: :data:`ALS_RIDGE`, read when called; 0: plain ALS, which can
            recover a weight of low CP rank to float64 precision but drifts into large cancelling components on
            trained weights).

    >>> w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    >>> f = cp_factors(w, 8)
    >>> f.reduce.shape, f.depthwise.shape, f.pointwise.shape, f.error <= f.init_error
    (torch.Size([8, 4, 1, 1]), torch.Size([8, 1, 3, 3]), torch.Size([6, 8, 1, 1]), True)
    """
    return fit_cp(weight, rank, iterations=iterations, tol=tol, ridge=ALS_RIDGE if ridge is None else ridge)


# A conversion asks for the same (weight, rank) more than once (choices, then build): keep recent results,
# up to a bounded number of factor elements so wide models cannot fill the memory.
_CACHE: OrderedDict[tuple, CPFactors] = OrderedDict()
_CACHE_MAX_ELEMENTS = 16_000_000
_CACHE_LOCK = threading.Lock()


def _size(f: CPFactors) -> int:
    return f.reduce.numel() + f.depthwise.numel() + f.pointwise.numel()


def _weight_key(weight: torch.Tensor) -> tuple:
    w = weight.detach().to(device="cpu").contiguous()
    return (tuple(w.shape), str(w.dtype), hash(w.numpy().tobytes()) if w.dtype != torch.bfloat16
            else hash(w.float().numpy().tobytes()))


def clear_cache() -> None:
    """Forget cached decompositions (they are only a speed-up: results are the same without them)."""
    with _CACHE_LOCK:
        _CACHE.clear()
    clear_svds()


def _cached_factors(weight: torch.Tensor, rank: int, iterations: int, tol: float) -> CPFactors:
    key = (_weight_key(weight), rank, iterations, tol, ALS_RIDGE)  # the ridge cp_factors reads when called
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
    if hit is None:
        hit = cp_factors(weight, rank, iterations=iterations, tol=tol)
        with _CACHE_LOCK:
            _CACHE[key] = hit
            while sum(_size(v) for v in _CACHE.values()) > _CACHE_MAX_ELEMENTS and len(_CACHE) > 1:
                _CACHE.popitem(last=False)
    like = {"dtype": weight.dtype, "device": weight.device}
    return CPFactors(hit.reduce.to(**like), hit.depthwise.to(**like), hit.pointwise.to(**like), hit.rank,
                     hit.error, hit.norm2, hit.init, hit.init_error, hit.iterations)


def cp_rank_grid(shape: tuple[int, ...] | torch.Size, max_rank: int, points: int = CHOICE_POINTS) -> list[int]:
    """Ranks 1 … max_rank spaced about evenly in cost, at most ``points`` of them (``max_rank`` included).

    A CP decomposition per rank is too dear for every rank of a wide layer; budget allocation picks among
    these, and any rank in between can still be asked for by name.

    >>> cp_rank_grid((64, 64, 3, 3), 269, points=6)
    [1, 55, 108, 162, 215, 269]
    """
    if max_rank < 1:
        return []
    if max_rank <= points:
        return list(range(1, max_rank + 1))
    step = (max_rank - 1) / (points - 1)
    return sorted({1 + round(i * step) for i in range(points)})


def _menu_factors(weight: torch.Tensor, rank: int) -> CPFactors:
    """The decomposition behind a menu's error at ``rank``: :func:`als_sweeps` (``build=False``) sweeps, cached."""
    return _cached_factors(weight, rank, als_sweeps(weight.shape, rank, build=False), DEFAULT_TOL)


def _menu_errors(weight: torch.Tensor, ranks: list[int]) -> list[tuple[float, float]]:
    """``(error, norm2)`` of :func:`_menu_factors` at each rank, from the active :func:`cp_error_store` when it
    kept them (the same floats: the key names everything a fit depends on), else fitted and kept there."""
    store = active_store()
    if store is None:
        return [(f.error, f.norm2) for f in (_menu_factors(weight, r) for r in ranks)]
    wid = store.weight_id(weight)
    numel = weight.numel()
    out = []
    for r in ranks:
        sweeps = als_sweeps(weight.shape, r, build=False)
        threads = fit_threads(numel * r)
        hit = store.get(wid, r, sweeps, DEFAULT_TOL, ALS_RIDGE, threads)
        if hit is None:
            f = _menu_factors(weight, r)
            hit = (f.error, f.norm2)
            store.put(wid, r, sweeps, DEFAULT_TOL, ALS_RIDGE, threads, *hit)
        out.append(hit)
    return out


_MENU_BUILDS: contextvars.ContextVar[bool] = contextvars.ContextVar("fxsurgeon_cp_menu_builds", default=False)


@contextlib.contextmanager
def menu_builds() -> Iterator[None]:
    """Within it, CP builds that name no sweep count get a menu's (:func:`als_sweeps` with ``build=False``).

    For measuring many candidates on data (:func:`fxsurgeon.calibrate.measure_choices`): each is refitted
    there anyway, and the one chosen is built again, outside, with the full count. The factors are the menu's
    own (cached), so this costs no new decomposition.
    """
    token = _MENU_BUILDS.set(True)
    try:
        yield
    finally:
        _MENU_BUILDS.reset(token)


def menu_points(shape: tuple[int, ...] | torch.Size, max_rank: int) -> int:
    """How many ranks a layer's menu decomposes: the most (up to :data:`CHOICE_POINTS`) within :data:`MENU_WORK`.

    >>> menu_points((64, 64, 3, 3), 269), menu_points((512, 512, 3, 3), 2284)
    (24, 6)
    """
    c_out, c_in, kh, kw = shape
    numel = c_out * c_in * kh * kw
    for n in range(CHOICE_POINTS, MIN_CHOICE_POINTS, -1):
        grid = cp_rank_grid(shape, max_rank, n)
        if sum(2 * numel * r * als_sweeps(shape, r, build=False) for r in grid) <= MENU_WORK:
            return n
    return MIN_CHOICE_POINTS


def cp_error_curve(weight: torch.Tensor, ranks: list[int], *, iterations: int | None = None,
                   tol: float = DEFAULT_TOL) -> list[float]:
    """Squared Frobenius error of the CP form at each rank in ``ranks`` (one decomposition per rank).

    ``iterations=None`` gives the errors a menu uses (:func:`als_sweeps` with ``build=False`` per rank, read
    from the active :func:`~fxsurgeon.forms.cp_store.cp_error_store` when it has them); a number runs that many
    sweeps at every rank.

    >>> w = torch.randn(6, 4, 3, 3)
    >>> curve = cp_error_curve(w, [1, 4, 36])
    >>> curve[0] > curve[1] > 0, curve[2] < 1e-8 * float(w.pow(2).sum())
    (True, True)
    """
    check_weight(weight, "pw-dw-pw")
    if iterations is None:
        return [e for e, _ in _menu_errors(weight, [min(r, cp_max_rank(weight.shape)) for r in ranks])]
    return [_cached_factors(weight, r, iterations, tol).error for r in ranks]


def make_cp_separable(
    conv: nn.Conv2d, rank: int, init: str = "svd", *, iterations: int | None = None, tol: float = DEFAULT_TOL
) -> tuple[SeparableConv2d, CPFactors | None]:
    """Build the 1×1 → depthwise k×k → 1×1 replacement of a groups=1 ``conv`` at CP rank ``rank``.

    The first 1×1 conv (``reduce``) has no bias and runs at the input's resolution; the depthwise conv
    carries stride, padding (``"same"`` too), dilation and padding mode; the last 1×1 conv carries the CP
    weights and the original bias. ``init="random"`` keeps PyTorch's default initialisation instead.
    ``iterations`` (ALS sweeps) defaults to :func:`als_sweeps` with ``build=True`` (``False`` inside
    :func:`menu_builds`).

    >>> sep, f = make_cp_separable(nn.Conv2d(16, 16, 3, padding=1, bias=False), 32)
    >>> [tuple(p.shape) for p in sep.parameters()]
    [(32, 16, 1, 1), (32, 1, 3, 3), (16, 32, 1, 1)]
    """
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    cls = depthwise_conv_class(conv)
    if cls is None:
        raise TypeError(f"{type(conv).__qualname__} overrides forward; cannot be split into plain convs")
    if conv.groups != 1:
        raise SurgeryError(f"the CP form needs a groups=1 conv, got groups={conv.groups}")
    c_out, c_in, kh, kw = conv.weight.shape
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise SurgeryError(f"CP rank must be an int >= 1, got {rank!r}")
    if iterations is None:
        iterations = als_sweeps(conv.weight.shape, min(rank, cp_max_rank(conv.weight.shape)),
                                build=not _MENU_BUILDS.get())
    factors = _cached_factors(conv.weight, rank, iterations, tol) if init == "svd" else None
    r = factors.rank if factors is not None else min(rank, cp_max_rank(conv.weight.shape))
    factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    reduce = nn.Conv2d(c_in, r, 1, bias=False, **factory)
    if cls is nn.Conv2d:
        dw = nn.Conv2d(r, r, (kh, kw), stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                       groups=r, bias=False, padding_mode=conv.padding_mode, **factory)
    else:  # timm Conv2dSame: pads in forward, takes no factory kwargs
        dw = cls(r, r, (kh, kw), stride=conv.stride, dilation=conv.dilation, groups=r, bias=False).to(**factory)
    pw = nn.Conv2d(r, c_out, 1, bias=conv.bias is not None, **factory)
    with torch.no_grad():
        if factors is not None:
            reduce.weight.copy_(factors.reduce)
            dw.weight.copy_(factors.depthwise)
            pw.weight.copy_(factors.pointwise)
        if conv.bias is not None:
            pw.bias.copy_(conv.bias)
    for p in (*reduce.parameters(), *dw.parameters(), *pw.parameters()):
        p.requires_grad_(conv.weight.requires_grad)
    sep = SeparableConv2d(dw, pw, reduce=reduce)
    sep.train(conv.training)
    return sep, factors


@register_form
class PointwiseDepthwisePointwise:
    """1×1 (C_in → R) → depthwise k×k (R channels) → 1×1 (R → C_out), from a rank-R CP decomposition."""

    name = "pw-dw-pw"

    def full_rank(self, conv: nn.Conv2d) -> int:
        return cp_max_rank(conv.weight.shape)

    def cost(self, conv: nn.Conv2d, rank: int) -> LayerChoice:
        r = min(rank, self.full_rank(conv))
        params, macs_in, macs_out = cp_cost(conv.weight.shape, r)
        return LayerChoice(self.name, r, params, macs_in, macs_out, float("nan"), r >= self.full_rank(conv))

    def choices(self, conv: nn.Conv2d, max_rank: int | None = None) -> list[LayerChoice]:
        """Costs and data-free errors on a grid of ranks (:func:`cp_rank_grid`, :func:`menu_points` of them).

        Each error is that of :func:`als_sweeps` (``build=False``) ALS sweeps: an upper bound on what
        :meth:`build` reaches at that rank (same start, at least as many sweeps).
        """
        check_weight(conv.weight, "pw-dw-pw")
        top = min(max_rank or self.full_rank(conv), self.full_rank(conv))
        out = []
        ranks = cp_rank_grid(conv.weight.shape, top, menu_points(conv.weight.shape, top))
        for r, (error, norm2) in zip(ranks, _menu_errors(conv.weight, ranks)):
            c = self.cost(conv, r)
            relative = math.sqrt(error / norm2) if norm2 > 0 else 0.0
            out.append(LayerChoice(c.form, r, c.params, c.macs_in, c.macs_out, error, c.exact or error == 0,
                                   extra={"relative_error": relative, "error_bound": True}))
        return out

    def error_at(self, conv: nn.Conv2d, ranks: list[int]) -> list[float]:
        """Squared Frobenius weight error at each rank, after :func:`als_sweeps` ALS sweeps (a bound)."""
        check_weight(conv.weight, "pw-dw-pw")
        return [e for e, _ in _menu_errors(conv.weight, [min(r, self.full_rank(conv)) for r in ranks])]

    def build(self, conv: nn.Conv2d, rank: int, init: str = "svd") -> tuple[nn.Module, dict[str, Any]]:
        sep, f = make_cp_separable(conv, rank, init=init)
        full = self.full_rank(conv)
        r = sep.depthwise.out_channels
        details: dict[str, Any] = {"cp_rank": r, "full_rank": full}
        details["exact"] = f is not None and (r >= full or f.error <= 1e-12 * (f.norm2 + 1e-300))
        if f is not None:
            details.update(relative_error=f.relative_error, discarded_energy=f.error, cp_init=f.init,
                           cp_iterations=f.iterations)
        return sep, details
