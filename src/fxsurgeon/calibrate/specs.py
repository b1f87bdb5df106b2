"""What to refit: which layer of the converted model reproduces which module of the original, and the
records of what calibration did (per layer and in all)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "SEPARABLE_MAX_COLUMNS",
    "CalibrationReport",
    "LayerRefit",
    "RefitSpec",
    "conv_padding",
    "downstream_candidates",
    "is_refittable",
    "refit_specs",
    "separable_refittable",
]


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
        downstream: a layer no rewrite replaced, refit to compensate the error the rewrites before it pass down
            (``calibrate(downstream=True)``); ``target`` is then its own name.
    """

    target: str
    layer: str
    reference: str
    kind: str = "linear"
    downstream: bool = False


@dataclass
class LayerRefit:
    """What calibration did to one layer (errors are relative L2 on the calibration data).

    ``relu_relaxed`` (ReLU-aware targets): the share of output positions the original's ReLU zeroes; the
    errors are then measured as the ReLU sees them. None: the layer had plain targets. ``downstream``: a layer
    no rewrite replaced, refit to compensate the error reaching it (``target`` is then its own name).
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
    downstream: bool = False

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


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
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


def is_refittable(mod: nn.Module) -> bool:
    """A layer linear in its weights whose inputs can be laid out as rows: Linear, or a groups=1 Conv2d."""
    if isinstance(mod, nn.Linear):
        return type(mod).forward is nn.Linear.forward
    if not isinstance(mod, nn.Conv2d) or mod.groups != 1 or type(mod).forward is not nn.Conv2d.forward:
        return False
    if type(mod)._conv_forward is not nn.Conv2d._conv_forward:
        return False
    pad = conv_padding(mod)
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
            if is_refittable(mod):
                pairs = [(target, target)]
            elif isinstance(mod, nn.Sequential) and len(mod) and is_refittable(mod[-1]):
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
            if not _has_module(converted, layer) or not is_refittable(converted.get_submodule(layer)):
                skipped.append(LayerRefit(target, layer, ref, reason="not a plain groups=1 conv or Linear in the "
                                          "converted model"))
            elif not _has_module(reference, ref):
                skipped.append(LayerRefit(target, layer, ref, reason="reference module not in the original model"))
            else:
                specs.append(RefitSpec(target, layer, ref))
    return specs, skipped


def downstream_candidates(converted: nn.Module, reference: nn.Module, rewrites: Iterable[Any],
                          specs: Iterable[RefitSpec]) -> list[str]:
    """Layers of ``converted`` no rewrite replaced that can be refit against the same-named original module.

    A candidate is a refittable layer (a plain groups=1 conv or a Linear, :func:`is_refittable`) that is
    neither a refit layer already nor inside a non-exact rewrite's replacement, and whose original namesake
    is refittable with the same weights' size and outputs (a 1×1 conv may stand for a Linear: an exact conv
    head). Whether it lies downstream of a rewrite is decided by the caller, which knows the graph or the
    call order. Exact rewrites replace a module by an equivalent one: their module itself is a candidate,
    its children are not.
    """
    taken = {sp.layer for sp in specs}
    inside: list[str] = []
    for rw in rewrites:
        target = str(getattr(rw, "target", ""))
        if target:
            inside.append(target + ".")
            if not getattr(rw, "exact", False):
                taken.add(target)
    out = []
    for name, mod in converted.named_modules():
        if not name or name in taken or any(name.startswith(p) for p in inside) or not is_refittable(mod):
            continue
        if not _has_module(reference, name):
            continue
        ref = reference.get_submodule(name)
        if not is_refittable(ref) or ref.weight.numel() != mod.weight.numel() \
                or ref.weight.shape[0] != mod.weight.shape[0] or (ref.bias is None) != (mod.bias is None):
            continue
        if isinstance(ref, nn.Conv2d) and (not isinstance(mod, nn.Conv2d) or ref.weight.shape != mod.weight.shape
                                           or ref.stride != mod.stride or ref.dilation != mod.dilation
                                           or conv_padding(ref) != conv_padding(mod)):
            continue
        if isinstance(ref, nn.Linear) and isinstance(mod, nn.Conv2d) and mod.kernel_size != (1, 1):
            continue
        out.append(name)
    return out


#: largest im2col width (C_in·k², e.g. 128 channels at 3×3) the joint separable refit handles: its Gram
#: matrix costs rows × width² to gather. Wider blocks refit their pointwise conv only.
SEPARABLE_MAX_COLUMNS = 1152


def _plain_conv(conv: Any) -> bool:
    return (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward
            and type(conv)._conv_forward is nn.Conv2d._conv_forward)


def separable_refittable(module: nn.Module) -> bool:
    """A :class:`~fxsurgeon.modules.SeparableConv2d` whose depthwise and pointwise weights can be refit jointly.

    Its convs must be plain, the depthwise one zero-padded (so its input patches are an ``unfold``), the
    1×1 convs unstrided and bias-free before the depthwise, and the input patches narrow enough
    (:data:`SEPARABLE_MAX_COLUMNS`). Others refit only their last pointwise conv.
    """
    from ..modules import SeparableConv2d

    if not isinstance(module, SeparableConv2d):
        return False
    dw, pw = module.depthwise, module.pointwise
    red = getattr(module, "reduce", None) if "reduce" in module._modules else None
    if not (_plain_conv(dw) and _plain_conv(pw) and is_refittable(pw) and pw.kernel_size == (1, 1)):
        return False
    if dw.padding_mode != "zeros" or conv_padding(dw) is None or dw.groups != dw.in_channels:
        return False
    if red is not None and not (_plain_conv(red) and red.kernel_size == (1, 1) and red.stride == (1, 1)
                                and conv_padding(red) == (0, 0) and red.bias is None and red.groups == 1):
        return False
    if dw.bias is not None or pw.stride != (1, 1) or conv_padding(pw) != (0, 0):
        return False
    c_in = red.in_channels if red is not None else dw.in_channels
    k2 = dw.kernel_size[0] * dw.kernel_size[1]
    return c_in * k2 <= SEPARABLE_MAX_COLUMNS
