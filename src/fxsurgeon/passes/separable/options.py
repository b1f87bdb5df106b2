"""The separable pass's options: :class:`SeparableOptions`, its defaults (budget defaults included) and value
checks.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from ...budget.allocation import BUDGET_DEFAULTS, LATENCY_DEFAULTS, UNIFORM_DEFAULTS
from ...budget.allotment import check_form
from ...errors import SurgeryError
from ...forms.registry import applies, default_form, is_pointwise
from ..options import OptionError, PassOptions

__all__ = ["SeparableOptions", "check_forms_apply", "check_layer_names"]


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
        or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in kernel_sizes)
    ):
        raise OptionError(f"separable: kernel_sizes must be 'all' or ints >= 1, got {kernel_sizes!r}",
                          key="kernel_sizes")


_LAYER_KEYS = {"form", "rank", "bias"}


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


def check_layer_names(gm: fx.GraphModule, layers: Any) -> None:
    """``layers`` names convs of this model, each entry with keys the pass reads; refused otherwise."""
    convs = {n for n, m in gm.named_modules(remove_duplicate=False) if isinstance(m, nn.Conv2d)}
    for name, spec in (layers or {}).items():
        if not isinstance(name, str) or name not in convs:
            near = difflib.get_close_matches(str(name), sorted(convs), n=3)
            raise SurgeryError(f"separable: layers names {name!r}, which is not a Conv2d of the traced model"
                               + (f"; did you mean {', '.join(map(repr, near))}?" if near else
                                  " (qualified names as in model.named_modules())"))
        extra = sorted(set(spec) - _LAYER_KEYS) if isinstance(spec, dict) else []
        if extra:
            raise SurgeryError(f"separable: layers[{name!r}] has unknown key(s) {extra}; an entry takes 'rank' "
                               "and optionally 'form' and 'bias'")
        if isinstance(spec, dict) and "bias" in spec and not isinstance(spec["bias"], bool):
            raise SurgeryError(f"separable: layers[{name!r}]['bias'] must be True or False, got {spec['bias']!r:.40}")


def check_forms_apply(candidates: Iterable[Any], form: str, layers: dict[str, Any], budgeted: bool,
                      layer_form: str | None = None) -> None:
    """Every form a candidate would be rewritten with can rewrite it: a rank in ``layers`` (with its form, else
    ``layer_form``, by default the pass's), else the pass's ``form``; refused, naming the layer, otherwise.
    (1×1 convs take ``"pw-pw"``; k×k convs the spatial forms; ``"auto"`` picks per layer.)"""
    for cand in candidates:
        alias, spec = next(((a, layers[a]) for a in cand.aliases if a in layers), (None, None))
        if isinstance(spec, dict) and "form" in spec:
            name, where, key = str(spec["form"]), f"layers[{alias!r}]['form']", "layers"
        elif spec is not None:
            name, where, key = default_form(layer_form or form, cand.conv), "form", "form"
        elif budgeted or not is_pointwise(cand.conv):
            name, where, key = default_form(form, cand.conv), "form", "form"
        else:
            continue  # a 1×1 conv without a budget or rank is skipped by the pass, with its reason
        if name == "auto" or applies(name, cand.conv):
            continue
        kh, kw = cand.conv.kernel_size
        if is_pointwise(cand.conv):
            hint = "1×1 convs take form 'pw-pw' (or 'auto'); leave 1 out of kernel_sizes to keep them"
        else:
            hint = (f"'{name}' rewrites 1×1 convs only; {kh}×{kw} convs take 'dw-pw', 'pw-dw-pw', 'tucker2' or "
                    "'spatial-svd' (or 'auto'); kernel_sizes=[1] matches only the 1×1 convs")
        raise OptionError(f"separable: {where}={name!r} cannot rewrite '{cand.name}' ({kh}×{kw} conv): {hint}",
                          key=key)


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
        kernel_sizes: square kernel sizes to match, default ``(3,)``, and ``(1, 3)`` under ``target_latency``
            with ``form="auto"`` (:data:`fxsurgeon.budget.allocation.LATENCY_DEFAULTS`; ``(1,)`` with
            ``form="pw-pw"``); 1 matches the 1×1 convs, which only the ``"pw-pw"`` form rewrites, under a budget
            or by ``layers``. ``"all"`` matches every k×k and non-square kernel bigger than 1×1.
        include_stem: also rewrite convs with ≤ 3 input channels (RGB stems); they gain little and lose much.
        include_unprofitable: also rewrite layers whose separable form has no fewer parameters. Default:
            only with ``multiplier="full"``, which asks for exactness over savings.
        exclude: fnmatch patterns of qualified names to leave alone, e.g. ``["layer4.*"]``.
        layers: per-layer settings that override the uniform ones, ``{"layer1.0.conv1": {"form": "dw-pw",
            "rank": 3}}``; the record's rewrites give exactly this, so a conversion can be replayed. ``"bias":
            True`` gives the replacement's last conv a (zero) bias even where the conv has none — the shape bias
            correction leaves, which a replay must rebuild before the saved weights load.
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
    kernel_sizes: str | Iterable[int] | None = None
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
        budget = any(v is not None for v in (self.target_macs, self.target_params, self.target_latency))
        base = LATENCY_DEFAULTS if self.target_latency is not None else BUDGET_DEFAULTS if budget else UNIFORM_DEFAULTS
        defaulted = {k: base[k] for k, unset in (("form", self.form is None), ("weighting", self.weighting == "default"),
                                                 ("bias_correction", self.bias_correction is None),
                                                 ("kernel_sizes", self.kernel_sizes is None)) if unset}
        if "kernel_sizes" in defaulted and self.form not in (None, "auto"):
            # a named form says which convs are meant: pw-pw the 1×1 ones, any other the 3×3 ones
            defaulted["kernel_sizes"] = (1,) if self.form == "pw-pw" else (3,)
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
