"""Separable pass: each standard k×k conv → depthwise k×k + pointwise 1×1, keeping the trained weights.

Matches every ``nn.Conv2d`` with ``groups == 1`` and a k×k kernel (k in ``kernel_sizes``; 3×3 by default)
that the traced forward calls, whatever its stride, padding (``"same"`` too), dilation, ``padding_mode`` and
bias, including convs inside leaf modules (swapped by qualified name; the graph need not change). Emits a
:class:`~fxsurgeon.modules.SeparableConv2d` at the same qualified name; a module registered under several
names or called at several sites is converted once and stays shared.

Weights come from a per-input-channel truncated SVD (:func:`fxsurgeon.forms.decompose.separable_factors`): exact
when the multiplier reaches ``min(C_out, k²)``, otherwise the best approximation at that multiplier, with
the discarded energy in the record. Every other conv is accounted for as a skip with its reason.
"""

from __future__ import annotations

import difflib
import fnmatch
import operator
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from ..budget.allocation import BUDGET_DEFAULTS, UNIFORM_DEFAULTS
from ..budget.allotment import allot, check_form, layer_positions
from ..budget.latency import LatencyJudge
from ..errors import SurgeryError
from ..forms.decompose import multiplier_for_energy
from ..forms.importance import (
    bn_channel_scales,
    correct_mean_shift,
    input_channel_mean,
    scaled_conv,
    unscale_separable,
)
from ..forms.registry import conv_cost, get_form
from ..graph import describe, functional_calls, replace_module
from ..graph.index import ModuleIndex, SwapWording, swap_refusal
from ..modules import depthwise_conv_class
from .base import PassResult, Rewrite, Skip
from .options import OptionError, PassOptions
from .registry import register_pass
from .separable_replay import replay_separable

__all__ = ["Candidate", "SeparableOptions", "find_candidates", "separable"]


@dataclass
class Candidate:
    """A conv the separable pass may rewrite: its primary name, every alias, and where it is called from."""

    name: str
    aliases: list[str]
    conv: nn.Conv2d
    leaf: str | None  # the leaf module it sits in, when the graph calls it only through that

    @property
    def full_rank(self) -> int:
        c_out, _, kh, kw = self.conv.weight.shape
        return min(c_out, kh * kw)


def _kernel_ok(conv: nn.Conv2d, kernel_sizes: str | tuple[int, ...]) -> str | None:
    kh, kw = conv.kernel_size
    if kh * kw == 1:
        return "1x1"  # not a spatial conv: nothing to separate, not worth a record line
    if kernel_sizes == "all":
        return None
    if kh != kw:
        return f"kernel {kh}x{kw} is not square (kernel_sizes='all' includes it)"
    if kh not in kernel_sizes:
        return f"kernel {kh}x{kw} not in kernel_sizes={tuple(kernel_sizes)}"
    return None


# a separable conv is a drop-in replacement at every name and call site: only reads and ties refuse it
_WORDING = SwapWording(
    read="its parameters are read directly by graph node '{first}' (a swap would break that read)",
    tied="weights tied with {owners}: rewriting would untie them",
)


def find_candidates(
    gm: fx.GraphModule,
    *,
    kernel_sizes: str | tuple[int, ...] = (3,),
    include_stem: bool = False,
    exclude: Iterable[str] = (),
) -> tuple[list[Candidate], list[Skip]]:
    """Every conv in ``gm``: the ones the pass may rewrite, and the others with the reason they are skipped."""
    index = ModuleIndex(gm)
    called = index.calls
    patterns = list(exclude)

    candidates: list[Candidate] = []
    skipped: list[Skip] = []
    for name, mod in index.unique_modules():
        if not isinstance(mod, nn.modules.conv._ConvNd):
            continue
        if isinstance(mod, (nn.Conv1d, nn.Conv3d, nn.modules.conv._ConvTransposeNd)):
            if any(k > 1 for k in mod.kernel_size):
                skipped.append(Skip(name, f"{describe(mod)} is not a 2-D standard conv; left alone"))
            continue
        if not isinstance(mod, nn.Conv2d):
            continue
        why = _kernel_ok(mod, kernel_sizes)
        if why == "1x1":
            continue
        names = index.names(mod, name)
        leaf = None if any(n in called for n in names) else next(
            (o for o in (index.enclosing_called(n) for n in names) if o), None
        )
        if why is None and mod.groups != 1:
            why = f"groups={mod.groups} > 1: already grouped/depthwise"
        if why is None and any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns):
            why = "excluded by the `exclude` option"
        if why is None and not include_stem and mod.in_channels <= 3:
            why = f"stem conv (in_channels={mod.in_channels} ≤ 3; include_stem=True rewrites it)"
        if why is None and depthwise_conv_class(mod) is None:
            why = f"{type(mod).__module__}.{type(mod).__qualname__} overrides forward (not a plain conv)"
        if why is None and isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params():
            why = "lazy conv with uninitialised parameters: run a forward first"
        if why is None and not any(n in called for n in names) and leaf is None:
            why = "not called by the traced forward (unused, or reached some other way)"
        if why is None:  # get_attr reads of its tensors, weights tied with another module
            why = swap_refusal(index, name, mod, wording=_WORDING)
        if why is not None:
            skipped.append(Skip(name, why, details={"module": describe(mod)}))
            continue
        candidates.append(Candidate(name, names, mod, leaf))

    for node in functional_calls(gm, "conv2d"):
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        source = _weight_source(weight)
        target = source.rsplit(".", 1)[0] if source and "." in source else node.name
        skipped.append(Skip(
            target,
            f"conv2d called functionally at graph node '{node.name}'"
            + (f" with weight '{source}'" if source else "")
            + " (functional code, or a conv subclass such as a weight-standardised conv whose forward was "
            "traced through): only nn.Conv2d modules called as modules can be swapped",
            details={"node": node.name},
        ))
    return candidates, skipped


def _weight_source(arg: object, depth: int = 6) -> str | None:
    """The parameter a functional conv's weight argument is computed from (through reshapes, norms, ...)."""
    frontier = [arg] if isinstance(arg, fx.Node) else []
    for _ in range(depth):
        nxt = []
        for node in frontier:
            if node.op == "get_attr":
                return str(node.target)
            nxt += node.all_input_nodes
        frontier = nxt
    return None


def _check_options(multiplier, energy, init, kernel_sizes) -> None:
    if multiplier is not None and multiplier != "full" and (
        not isinstance(multiplier, int) or isinstance(multiplier, bool) or multiplier < 1
    ):
        raise OptionError(f"separable: multiplier must be an int >= 1 or 'full', got {multiplier!r}",
                          key="multiplier")
    if energy is not None:
        if multiplier is not None:
            raise OptionError("separable: give either multiplier= or energy=, not both", key="energy")
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
            raise OptionError(f"separable: energy must be a number in (0, 1], got {energy!r}", key="energy")
    if init not in ("svd", "random"):
        raise OptionError(f"separable: init must be 'svd' or 'random', got {init!r}", key="init")
    if kernel_sizes != "all" and (
        isinstance(kernel_sizes, (str, bytes))
        or not all(isinstance(k, int) and not isinstance(k, bool) and k > 1 for k in kernel_sizes)
    ):
        raise OptionError(f"separable: kernel_sizes must be 'all' or ints > 1, got {kernel_sizes!r}",
                          key="kernel_sizes")


_LAYER_KEYS = {"form", "rank"}


def _check_option_values(kernel_sizes: Any, exclude: Any, allocation: Any) -> None:
    if kernel_sizes != "all" and not kernel_sizes:
        raise OptionError("separable: kernel_sizes=[] matches no conv; give sizes such as [3] or 'all'",
                          key="kernel_sizes")
    for i, pattern in enumerate(exclude or ()):
        if not isinstance(pattern, str):
            raise OptionError(f"separable: exclude[{i}] must be a string (an fnmatch pattern of qualified names), "
                              f"got {type(pattern).__name__}: {pattern!r}", key="exclude")
    if not (isinstance(allocation, str) and allocation in ("auto", "weight", "data", "sensitivity")):
        raise OptionError(f"separable: allocation must be 'auto', 'weight', 'data' or 'sensitivity', got "
                          f"{allocation!r}", key="allocation")


def _check_layer_names(gm: fx.GraphModule, layers: Any) -> None:
    """``layers`` names convs of this model, each entry with keys the pass reads; refused otherwise."""
    convs = {n for n, m in ModuleIndex(gm).modules.items() if isinstance(m, nn.Conv2d)}
    for name, spec in (layers or {}).items():
        if not isinstance(name, str) or name not in convs:
            near = difflib.get_close_matches(str(name), sorted(convs), n=3)
            raise SurgeryError(f"separable: layers names {name!r}, which is not a Conv2d of the traced model"
                               + (f"; did you mean {', '.join(map(repr, near))}?" if near else
                                  " (qualified names as in model.named_modules())"))
        extra = sorted(set(spec) - _LAYER_KEYS) if isinstance(spec, dict) else []
        if extra:
            raise SurgeryError(f"separable: layers[{name!r}] has unknown key(s) {extra}; an entry takes 'rank' "
                               "and optionally 'form'")


def _layer_setting(
    cand: Candidate, form: str, multiplier: int | str | None, energy: float | None,
    layers: dict[str, dict[str, Any]],
) -> tuple[str, int]:
    """(form, rank) for one candidate: a per-layer override, else the uniform options."""
    for name in cand.aliases:
        if name in layers:
            spec = layers[name]
            if not isinstance(spec, dict) or "rank" not in spec:
                raise SurgeryError(f"separable: layers[{name!r}] must be a dict with 'rank' (and 'form'), got {spec!r}")
            rank = spec["rank"]
            if isinstance(rank, bool) or not hasattr(rank, "__index__") or operator.index(rank) < 1:
                raise SurgeryError(f"separable: layers[{name!r}]['rank'] must be an int >= 1, got {rank!r}")
            return str(spec.get("form", form)), operator.index(rank)
    impl = get_form(form)
    if energy is not None:
        return form, multiplier_for_energy(cand.conv.weight, float(energy))
    if multiplier == "full":
        return form, impl.full_rank(cand.conv)
    return form, min(multiplier or 1, impl.full_rank(cand.conv))


@dataclass
class _Planned:
    """A candidate with its setting decided, waiting for its replacement to be built."""

    cand: Any
    decomp: nn.Conv2d
    scales: Any
    allotted: Any
    form_name: str
    rank: int
    impl: Any
    before: int
    after: int
    forced: bool


def _build_one(plan: _Planned, init: str) -> tuple[nn.Module, dict[str, Any]]:
    try:
        if plan.allotted is not None:
            new, built = plan.allotted.module, plan.allotted.details
        else:
            new, built = plan.impl.build(plan.decomp, plan.rank, init=init)
        if plan.scales is not None:
            unscale_separable(new, plan.scales, plan.cand.conv.bias)
    except SurgeryError as exc:  # e.g. an SVD of meta-device weights: say which layer needed them
        raise SurgeryError(f"separable: layer '{plan.cand.name}' ({describe(plan.cand.conv)}): {exc}") from exc
    return new, built


def _load_cuda_linalg(devices: Iterable[torch.device]) -> None:
    """Run one tiny ``eigh`` on each CUDA device here, before any worker thread does.

    torch loads its CUDA linear-algebra library lazily on the first call, and that first call is not
    thread-safe: two workers reaching it together fail with "lazy wrapper should be called at most once"
    (pytorch/pytorch#90613; met converting timm resnet50 on an H100 in a fresh process).
    """
    for dev in {d for d in devices if d.type == "cuda"}:
        torch.linalg.eigh(torch.eye(2, dtype=torch.float64, device=dev))


def _build_all(planned: list[_Planned], init: str) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Build every replacement; decompositions run on a thread pool as wide as torch's CPU threads.

    Each build is a pure function of its conv (the batched eigen-decompositions and CP fits release the GIL),
    so the result is the same as one after the other — for ResNet-50 on 2 cores about twice as fast.
    """
    workers = min(len(planned), torch.get_num_threads(), 8)
    if workers < 2 or init != "svd":
        return [_build_one(p, init) for p in planned]
    _load_cuda_linalg(p.decomp.weight.device for p in planned)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fxsurgeon-separable") as pool:
        return list(pool.map(lambda p: _build_one(p, init), planned))


@dataclass(frozen=True)
class SeparableOptions(PassOptions):
    """Options of the :func:`separable` pass (frozen; build one with keywords or :meth:`from_dict`).

    Attributes:
        form: the separable form (see :data:`fxsurgeon.forms.FORMS`); ``"dw-pw"`` is depthwise k×k with
            channel multiplier m followed by pointwise 1×1. Default: ``"dw-pw"`` (with a budget,
            :data:`fxsurgeon.budget.allocation.BUDGET_DEFAULTS`, like ``weighting`` and ``bias_correction``);
            ``"auto"`` lets every registered form compete per layer — more accuracy per MAC, more time.
        multiplier: channel multiplier m (the form's rank) for every layer (default 1, MobileNet's), or
            ``"full"`` for the form's exact rank per layer (``min(C_out, k²)`` for ``dw-pw``).
        energy: instead of a fixed m, per layer the smallest m keeping this fraction of the weight's squared
            Frobenius norm (e.g. 0.9); ``dw-pw`` only.
        init: ``"svd"`` (keep the trained function as well as m allows) or ``"random"`` (PyTorch's default
            init, for training from scratch).
        kernel_sizes: square kernel sizes to match, default ``(3,)``; ``"all"`` matches every k×k and
            non-square kernel bigger than 1×1.
        include_stem: also rewrite convs with ≤ 3 input channels (RGB stems); they gain little and lose much.
        include_unprofitable: also rewrite layers whose separable form has no fewer parameters. Default:
            only with ``multiplier="full"``, which asks for exactness over savings.
        exclude: fnmatch patterns of qualified names to leave alone, e.g. ``["layer4.*"]``.
        layers: per-layer settings that override the uniform ones, ``{"layer1.0.conv1": {"form": "dw-pw",
            "rank": 3}}``; the record's rewrites give exactly this, so a conversion can be replayed.
        latency_aware: time each candidate conv and its replacement at the layer's input shape, dtype and
            memory format (needs ``example_inputs``) and keep a rewrite only where it is faster; True, or a
            dict of :class:`fxsurgeon.budget.latency.LatencyJudge` settings (``dtype``, ``channels_last``,
            ``batch_size``, ``warmup``, ``iters``, ``margin``, ``timer``). Layers named in ``layers`` are not
            timed. Kept rewrites carry ``details["latency"]``; dropped ones are skips with both times.
        device: where ``latency_aware`` times layers, e.g. ``"cuda"`` (default: where the model lives).
        target_macs: instead of one multiplier, a budget: the fraction of the *original whole model's* MACs
            (fvcore count on ``example_inputs``, which it needs) to meet, e.g. ``0.6``. Each layer's (form,
            rank) — or keeping the conv — is chosen to meet it with the least total error
            (:mod:`fxsurgeon.budget.allocation`); with ``form="auto"`` every registered form competes per layer.
        target_params: the same for the fraction of the original model's parameters (may be combined).
        target_latency: a budget on the fraction of the original whole model's *measured* latency, e.g. ``0.6``:
            every candidate (form × rank, or keeping the conv) is timed at the layer's input shape and the
            allocation runs on milliseconds, then the whole model is timed against the original and the
            budget re-solved when it misses (:mod:`fxsurgeon.budget.latency_budget`). ``latency_aware`` (a dict)
            and ``device`` say where and how to time. Combines with one of ``target_macs`` /
            ``target_params``; with ``form="auto"`` every registered form competes, the dense ones of
            :mod:`fxsurgeon.forms.dense` included.
        allocation: the error a budget minimises: ``"weight"`` (relative squared weight error, data-free),
            ``"data"`` (relative output error left after a least-squares refit on ``calibration``),
            ``"sensitivity"`` (those data errors weighted by how much the model's outputs move per unit of
            each layer's error, measured by injecting noise), or ``"auto"``: data when calibration batches
            are given.
        calibration: input batches for ``allocation="data"``; ``convert(calibration=...)`` fills it in.
        weighting: ``"bn"`` weighs each output channel's error by the following BatchNorm's |γ|/√var and each
            input channel's by the RMS of a ``ReLU(BN(·))`` input (:mod:`fxsurgeon.forms.importance`; data-free)
            when decomposing and when ranking choices; None: plain Frobenius error (the default).
        bias_correction: give each approximate rewrite whose input is ``BN(·)`` or ``ReLU(BN(·))``, or whose
            output feeds a BatchNorm, the conv's
            output mean: the shift ``(W − Ŵ) ∗ E[x]``, with E[x] read from that BatchNorm (data-free), goes
            into the pointwise bias (:func:`fxsurgeon.forms.importance.correct_mean_shift`); where the input has no
            BatchNorm of its own, E[x] is inferred from the one after the conv. Default: True with a budget,
            else False.
    """

    pass_name: ClassVar[str] = "separable"

    form: str | None = None
    multiplier: int | str | None = None
    energy: float | None = None
    init: str = "svd"
    kernel_sizes: str | Iterable[int] = (3,)
    include_stem: bool = False
    include_unprofitable: bool | None = None
    exclude: Iterable[str] | None = None
    layers: dict[str, dict[str, Any]] | None = None
    latency_aware: bool | dict[str, Any] = False
    device: str | torch.device | None = None
    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    allocation: str = "auto"
    calibration: Any = None
    weighting: str | None = "default"
    bias_correction: bool | None = None

    def validate(self) -> None:
        # options not given: a budget takes fxsurgeon.budget.allocation.BUDGET_DEFAULTS (chosen on two trained models),
        # a uniform multiplier keeps the MobileNet form without weighting or bias correction
        budget = self.target_macs is not None or self.target_params is not None
        base = BUDGET_DEFAULTS if budget else UNIFORM_DEFAULTS
        defaulted = {k: base[k] for k, unset in (("form", self.form is None), ("weighting", self.weighting == "default"),
                                                 ("bias_correction", self.bias_correction is None)) if unset}
        set_ = partial(object.__setattr__, self)
        set_("defaulted", defaulted)
        for key, value in defaulted.items():
            set_(key, value)
        kernel_sizes, layers, exclude = self.kernel_sizes, self.layers, self.exclude
        if kernel_sizes != "all":
            if isinstance(kernel_sizes, (str, bytes)) or not isinstance(kernel_sizes, Iterable):
                raise _error(f"separable: kernel_sizes must be 'all' or a sequence of ints > 1, got {kernel_sizes!r}",
                             "kernel_sizes")
            set_("kernel_sizes", tuple(kernel_sizes))
        if layers is not None and not isinstance(layers, dict):
            raise _error("separable: layers must be a dict {qualified name: {'form': ..., 'rank': ...}}, got "
                         f"{type(layers).__name__}: {layers!r}", "layers")
        if isinstance(exclude, str):  # one pattern, not its characters
            exclude = [exclude]
        if exclude is not None and not isinstance(exclude, Iterable):
            raise _error(f"separable: exclude must be a list of fnmatch patterns, got {exclude!r}", "exclude")
        set_("exclude", list(exclude) if exclude is not None else None)  # read twice: a generator would be spent
        _check_options(self.multiplier, self.energy, self.init, self.kernel_sizes)
        _check_option_values(self.kernel_sizes, self.exclude, self.allocation)
        check_form(self.form)
        if self.energy is not None and self.form != "dw-pw":
            raise _error(f"separable: energy= picks dw-pw's multiplier per layer; it does not apply to "
                         f"form={self.form!r}", "energy")
        if not isinstance(self.bias_correction, bool):
            raise _error(f"separable: bias_correction must be True or False, got {self.bias_correction!r}",
                         "bias_correction")
        if self.weighting not in (None, "bn"):
            raise _error(f"separable: weighting must be None or 'bn', got {self.weighting!r}", "weighting")
        if self.energy is not None and self.init == "random":
            raise _error("separable: energy= needs init='svd' (it reads the trained weights)", "energy")
        if self.device is not None and not self.latency_aware and self.target_latency is None:
            raise _error(f"separable: device={self.device!r} is where latency_aware times layers; it needs "
                         "latency_aware=True", "device")
        uniform = self.multiplier is not None or self.energy is not None or self.init != "svd"
        if self.target_latency is not None and uniform:
            raise _error("separable: target_latency= chooses each layer's rank itself: it excludes "
                         "multiplier=, energy= and init='random'", "target_latency")
        if self.target_latency is None and budget and (uniform or self.latency_aware):
            raise _error("separable: target_macs= / target_params= choose each layer's rank themselves: "
                         "they exclude multiplier=, energy=, latency_aware= and init='random'", "target_macs")


def _error(message: str, key: str) -> OptionError:
    return OptionError(message, key=key, kind="value")


@register_pass(order=300, needs_shapes=True, default=True, options=SeparableOptions, replay=replay_separable)
def separable(gm: fx.GraphModule, options: SeparableOptions | None = None, /, **kwargs: Any) -> PassResult:
    """Replace standard k×k convs by depthwise k×k + pointwise 1×1 (Network Decoupling SVD init).

    Args:
        gm: the traced model, edited in place.
        options: a :class:`SeparableOptions`, or its fields as keyword arguments (not both).

    Forms: ``"dw-pw"`` (depthwise k×k, multiplier m → pointwise), ``"pw-dw-pw"`` (1×1 → depthwise k×k → 1×1
    from a rank-R CP decomposition, :mod:`fxsurgeon.forms.cp`), or ``"auto"``: per layer the form with the least
    weight error. With a uniform ``multiplier`` m, forms other than ``dw-pw`` get each layer's MACs of
    ``dw-pw`` at m and take their largest rank within them (:mod:`fxsurgeon.budget.allotment`); with a budget
    (``target_macs``/``target_params``), ``auto`` lets every form's ranks compete in the allocation.

    Returns:
        A :class:`PassResult`; each rewrite's details carry form, rank (m), parameters before/after and the
        relative weight error ``||W - W_m||_F / ||W||_F``.

    >>> import torch.nn as nn
    >>> from fxsurgeon.tracing import trace
    >>> gm = trace(nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, bias=False)))
    >>> res = separable(gm, multiplier=1)  # or separable(gm, SeparableOptions(multiplier=1))
    >>> len(res.rewrites), sum(p.numel() for p in gm.parameters())
    (1, 2336)
    """
    o = SeparableOptions.coerce(options, kwargs)
    form, multiplier, energy, init = o.form, o.multiplier, o.energy, o.init
    kernel_sizes, include_stem, include_unprofitable = o.kernel_sizes, o.include_stem, o.include_unprofitable
    exclude, layers, latency_aware, device = o.exclude, o.layers, o.latency_aware, o.device
    target_macs, target_params, target_latency = o.target_macs, o.target_params, o.target_latency
    allocation, calibration, weighting, bias_correction = o.allocation, o.calibration, o.weighting, o.bias_correction
    defaulted = o.defaulted
    _check_layer_names(gm, layers)
    layers = dict(layers or {})
    judge = LatencyJudge.from_options(latency_aware, device) if target_latency is None else None
    candidates, skipped = find_candidates(
        gm, kernel_sizes=kernel_sizes, include_stem=include_stem, exclude=exclude or ()
    )
    if include_unprofitable is None:
        include_unprofitable = multiplier == "full"
    # weighting="bn": decompose importance-scaled copies (unscaled after building); see fxsurgeon.forms.importance
    work: dict[str, tuple[nn.Conv2d, Any]] = {}
    if weighting == "bn" and init == "svd":
        for cand in candidates:
            scales = bn_channel_scales(gm, cand.aliases, cand.conv)
            if scales is not None:
                work[cand.name] = (scaled_conv(cand.conv, scales), scales)
    budget = kept = None
    if target_latency is not None:
        from ..budget.latency_budget import budget_latency

        data_free = calibration is None or allocation == "weight"
        ranked = [replace(c, conv=work[c.name][0]) if data_free and c.name in work else c for c in candidates]
        plan = budget_latency(gm, ranked, form, layers, target_latency=target_latency, target_macs=target_macs,
                              target_params=target_params, calibration=calibration, errors=allocation,
                              judge=LatencyJudge.from_options(latency_aware or True, device, budget=True))
        chosen, kept, budget = plan.settings, plan.kept, plan.summary
        layers = {**chosen, **layers}
    elif target_macs is not None or target_params is not None:
        from ..budget.allocation import budget_layers

        data_free = calibration is None or allocation == "weight"
        ranked = [replace(c, conv=work[c.name][0]) if data_free and c.name in work else c for c in candidates]
        chosen, kept, budget = budget_layers(gm, ranked, form, layers, target_macs=target_macs,
                                             target_params=target_params, calibration=calibration,
                                             errors=allocation)
        layers = {**chosen, **layers}
        budget = budget.summary()
        budget["defaults"] = defaulted  # the options the budget's defaults filled in (the rest were given)
    planned: list[_Planned] = []
    for cand in candidates:
        conv = cand.conv
        if kept is not None and cand.name in kept:
            why = ("its error costs more than the time it saves elsewhere, or no candidate is faster"
                   if target_latency is not None else "its error costs more than its MACs save elsewhere")
            skipped.append(Skip(cand.name, f"kept as it is by the budget allocation: {why}",
                                details={"module": describe(conv), "form": "original"}))
            continue
        decomp, scales = work.get(cand.name, (conv, None))
        uniform = not any(n in layers for n in cand.aliases) and energy is None
        allotted = None
        if uniform and form != "dw-pw":  # a MAC allotment per layer: see fxsurgeon.budget.allotment
            p_in, p_out, _ = layer_positions(gm, cand.aliases, conv)
            allotted = allot(decomp, form, multiplier, p_in, p_out, init=init)
            if allotted is None:
                skipped.append(Skip(cand.name, f"no rank of {form} fits the MACs of dw-pw at multiplier "
                                    f"{multiplier or 1}", details={"module": describe(conv), "form": form}))
                continue
            form_name, rank = allotted.form, allotted.rank
        else:
            form_name, rank = _layer_setting(cand, form, multiplier, energy, layers)
        impl = get_form(form_name)
        before = conv_cost(conv).params
        after = impl.cost(conv, rank).params
        forced = any(n in layers for n in cand.aliases)
        if after >= before and not (include_unprofitable or forced):
            skipped.append(Skip(
                cand.name,
                f"not profitable at {form_name} rank {rank}: {after:,} weights vs {before:,} "
                "(include_unprofitable=True forces it)",
                details={"module": describe(conv), "form": form_name, "rank": rank,
                         "params_before": before, "params_after": after},
            ))
            continue
        planned.append(_Planned(cand, decomp, scales, allotted, form_name, rank, impl, before, after, forced))

    rewrites: list[Rewrite] = []
    for plan, (new, built) in zip(planned, _build_all(planned, init)):
        cand, conv, form_name, rank, impl = plan.cand, plan.cand.conv, plan.form_name, plan.rank, plan.impl
        before, after, forced, scales, allotted = plan.before, plan.after, plan.forced, plan.scales, plan.allotted
        timing = None
        if judge is not None and not forced:  # keep the rewrite only where it measures faster
            keep, why, timing = judge.decide(gm, cand.name, cand.aliases, conv, new)
            if not keep:
                skipped.append(Skip(cand.name, why, details={"module": describe(conv), "form": form_name,
                                                             "rank": rank, "latency": timing}))
                continue
        for alias in cand.aliases:
            replace_module(gm, alias, new)
        exact = bool(built.pop("exact", False))
        shift = None
        if bias_correction and init == "svd" and not exact:
            mean = input_channel_mean(gm, cand.aliases, conv)
            if mean is not None:
                delta = correct_mean_shift(conv, new, mean[0])
                after += 0 if conv.bias is not None else conv.out_channels
                shift = {"input_mean": mean[1], "max_abs_shift": float(delta.abs().max())}
        details = {"form": form_name, "rank": rank, **built, "params_before": before, "params_after": after,
                   "init": init}
        if shift is not None:
            details["bias_correction"] = shift
        if timing is not None:
            details["latency"] = timing
        if scales is not None:
            details["weighting"] = f"bn ({scales.describe()}); errors are weighted"
        if allotted is not None and allotted.considered:
            details["auto"] = allotted.considered
        p_in, p_out, measured = layer_positions(gm, cand.aliases, conv)
        details["macs_before"] = conv_cost(conv).macs(p_in, p_out)
        details["macs_after"] = impl.cost(conv, rank).macs(p_in, p_out)
        if not measured:
            details["macs_per"] = "output position (no example_inputs)"
        if budget is not None and cand.name in budget["layers"]:
            details["allocation"] = budget["layers"][cand.name]
        if cand.leaf:
            details["inside_leaf_module"] = cand.leaf
        if len(cand.aliases) > 1:
            details["aliases"] = cand.aliases
        rewrites.append(Rewrite(cand.name, describe(conv), describe(new), exact, details=details))
    figures = {"allocation": budget} if budget is not None else {}
    return PassResult(gm, rewrites, skipped, "separable", figures)
