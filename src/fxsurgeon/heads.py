"""Conv classifier heads: the pure Linear → 1×1 conv builder, the converted model's head API, class maps.

A Linear classifier on globally average-pooled features is a 1×1 convolution on the (N, C, 1, 1) pooled
tensor; with only linear, per-position operations between, it can also run *before* the pool, on the whole
feature map, which gives a dense class-score map (Long et al., "Fully Convolutional Networks", CVPR 2015).
:func:`linear_to_conv1x1` builds the conv; the ``conv_head`` pass (:mod:`fxsurgeon.passes.conv_head`) does the
graph surgery; :func:`class_map` reads the dense map off a model converted with ``fully_convolutional=True``.

A model whose head the pass converted becomes a :class:`ConvHeadGraphModule`: an ordinary
``torch.fx.GraphModule`` that also answers timm's ``get_classifier()`` / ``reset_classifier()`` and
``class_map(x)``, and keeps that through ``copy.deepcopy`` and ``torch.save`` / ``torch.load``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from .errors import SurgeryError

__all__ = [
    "HEAD_ATTR",
    "ConvHeadGraphModule",
    "adopt_head_api",
    "class_map",
    "conv1x1_from_linear_params",
    "head_info",
    "linear_refusal",
    "linear_to_conv1x1",
]

#: instance attribute of a converted model describing its conv head (a plain dict: survives pickling)
HEAD_ATTR = "_fxsurgeon_head"

#: timm ``global_pool`` names of a global average pool: the only pooling a converted head has
_AVERAGE_POOLS = ("avg", "fast", "fastavg")


def linear_to_conv1x1(linear: nn.Linear) -> nn.Conv2d:
    """The 1×1 ``Conv2d`` computing ``linear`` at every spatial position.

    The weight (K, C) becomes (K, C, 1, 1) and the bias is kept, both copied (not shared) in the Linear's
    device, dtype and ``requires_grad``; the conv takes the Linear's train/eval mode. On an (N, C, 1, 1)
    tensor the conv followed by ``flatten(1)`` equals the Linear on the flattened (N, C) tensor.

    Raises:
        TypeError: ``linear`` is not an ``nn.Linear``, has uninitialised (lazy) or parametrized weights
            (weight norm, spectral norm: converting would bake the parametrization in), or is a subclass
            whose ``forward`` is not a plain linear map.

    >>> fc = nn.Linear(128, 10)
    >>> conv = linear_to_conv1x1(fc)
    >>> conv
    Conv2d(128, 10, kernel_size=(1, 1), stride=(1, 1))
    >>> x = torch.randn(4, 128, 1, 1)
    >>> torch.allclose(conv(x).flatten(1), fc(x.flatten(1)), atol=1e-6)
    True
    """
    why = linear_refusal(linear)
    if why is not None:
        raise TypeError(why)
    conv = conv1x1_from_linear_params(linear.weight, linear.bias)
    conv.train(linear.training)
    return conv


def conv1x1_from_linear_params(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """The 1×1 conv computing ``F.linear(x, weight, bias)`` per position; tensors copied, ``requires_grad`` kept.

    For classifiers the graph computes functionally (timm's ``Linear`` traced through): fx then keeps only the
    weight and bias, not the module.

    >>> conv1x1_from_linear_params(torch.randn(10, 128), None).weight.shape
    torch.Size([10, 128, 1, 1])
    """
    if weight.dim() != 2 or (bias is not None and bias.shape != weight.shape[:1]):
        raise TypeError(f"expected a (K, C) weight and a (K,) bias, got {tuple(weight.shape)} and "
                        f"{None if bias is None else tuple(bias.shape)}")
    k, c = weight.shape
    # built on the meta device and then given memory: PyTorch's random init would be overwritten at once
    conv = nn.Conv2d(c, k, 1, bias=bias is not None, device="meta", dtype=weight.dtype).to_empty(device=weight.device)
    with torch.no_grad():
        conv.weight.copy_(weight.detach().reshape(k, c, 1, 1))
        if bias is not None:
            conv.bias.copy_(bias.detach())
    conv.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        conv.bias.requires_grad_(bias.requires_grad)
    return conv


def _is_timm_linear(cls: type) -> bool:
    # timm.layers.Linear only casts the weight to the input dtype under TorchScript: a plain linear map
    return cls.__name__ == "Linear" and cls.__module__.startswith("timm.layers")


def linear_refusal(linear: nn.Module) -> str | None:
    """Why :func:`linear_to_conv1x1` cannot convert ``linear``, or None when it can."""
    if not isinstance(linear, nn.Linear):
        return f"expected an nn.Linear, got {type(linear).__module__}.{type(linear).__qualname__}"
    if isinstance(linear, nn.modules.lazy.LazyModuleMixin) and linear.has_uninitialized_params():
        return "lazy Linear with uninitialised parameters: run a forward first"
    if parametrize.is_parametrized(linear):
        return "its weight is parametrized (weight/spectral norm): a conv would bake the parametrization in"
    cls = type(linear)
    if cls.forward is not nn.Linear.forward and not _is_timm_linear(cls):
        return f"{cls.__module__}.{cls.__qualname__} overrides forward (not a plain linear map)"
    return None


# ----------------------------------------------------------------------------------- the converted model


def head_info(model: nn.Module) -> dict[str, Any] | None:
    """The conv head description the ``conv_head`` pass left on ``model``, or None."""
    info = getattr(model, HEAD_ATTR, None)
    return info if isinstance(info, dict) else None


class ConvHeadGraphModule(fx.GraphModule):
    """A ``GraphModule`` whose Linear classifier became a 1×1 conv, with timm's head API.

    - ``get_classifier(name_only=False)``: the 1×1 conv (or its qualified name), as timm returns its Linear.
    - ``reset_classifier(num_classes, global_pool=None)``: a freshly initialised ``Conv2d(C, num_classes, 1)``
      in place of the classifier (PyTorch's default init, which for a 1×1 conv draws from the same
      distribution as ``nn.Linear``'s); ``num_classes=0`` puts ``nn.Identity`` there, so the model returns the
      pooled (N, C) features, as timm does. Changing ``global_pool`` is refused: the pooling is part of the
      traced graph; reset it on the timm model and convert again.
    - ``class_map(x)``: :func:`class_map`.

    The description lives in the plain attribute ``_fxsurgeon_head``; this class keeps itself and the plain
    attributes ``torch.fx`` would drop across ``copy.deepcopy`` and ``torch.save`` / ``torch.load``.
    """

    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        name = self._head()["classifier"]
        return name if name_only else self.get_submodule(name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        info = self._head()
        if global_pool is not None and global_pool not in _AVERAGE_POOLS:
            raise SurgeryError(
                f"reset_classifier(global_pool={global_pool!r}): the converted model's global average pool "
                f"({info.get('pool', '?')}) is part of its traced graph and cannot be swapped. Reset the pooling "
                "on the original timm model and convert it again."
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise SurgeryError(f"reset_classifier: num_classes must be an int >= 0, got {num_classes!r}")
        name = info["classifier"]
        old = self.get_submodule(name)
        ref = next(iter(old.parameters()), None)
        if ref is None:  # after reset_classifier(0): take device and dtype from the rest of the model
            ref = next(self.parameters(), None)
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        new: nn.Module = (
            nn.Conv2d(info["in_channels"], num_classes, 1, **factory) if num_classes > 0 else nn.Identity()
        )
        new.train(old.training)
        parent, _, leaf = name.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, leaf, new)
        info["num_classes"] = num_classes
        self.num_classes = num_classes

    def class_map(self, x: Any) -> torch.Tensor:
        """The dense (N, K, H', W') class-score map for input ``x``: see :func:`class_map`."""
        return class_map(self, x)

    def _head(self) -> dict[str, Any]:
        info = head_info(self)
        if info is None:
            raise SurgeryError("this model carries no conv head description (attribute _fxsurgeon_head)")
        return info

    def __reduce__(self) -> tuple[Any, ...]:
        # GraphModule pickles as a plain GraphModule; rebuild that, then give it this class back
        fn, args = super().__reduce__()
        return (_restore_conv_head_module, (fn, args))

    def __deepcopy__(self, memo: dict[int, Any]) -> ConvHeadGraphModule:
        res = super().__deepcopy__(memo)
        # GraphModule.__deepcopy__ keeps only modules, parameters, buffers and meta: carry the plain attributes
        # (the head description, timm's pretrained_cfg / num_classes, the conversion record) as well
        for key, value in self.__dict__.items():
            if key not in res.__dict__ and not isinstance(value, (nn.Module, torch.Tensor)):
                res.__dict__[key] = copy.deepcopy(value, memo)
        return res


def _restore_conv_head_module(fn: Callable[..., fx.GraphModule], args: tuple) -> fx.GraphModule:
    return _set_class(fn(*args), ConvHeadGraphModule)


def _set_class(gm: fx.GraphModule, cls: type[fx.GraphModule], recompile: bool = True) -> fx.GraphModule:
    """Make ``gm`` an instance of ``cls`` (a GraphModule subclass), in place.

    Every GraphModule instance has its own singleton class ``GraphModuleImpl`` holding its generated
    ``forward``; a new singleton deriving from ``cls`` replaces it, and ``recompile`` installs ``forward`` there
    (``recompile=False``: the caller recompiles next, and ``gm`` cannot be called until it has).
    """
    if isinstance(gm, cls):
        return gm
    impl = type("GraphModuleImpl", (cls,), {"__module__": cls.__module__})
    impl.__name__ = type(gm).__name__  # GraphModule shows the traced model's class name
    gm.__class__ = impl
    if recompile:
        gm.recompile()
    return gm


def adopt_head_api(gm: fx.GraphModule, info: dict[str, Any], *, recompile: bool = True) -> fx.GraphModule:
    """Attach the head description ``info`` to ``gm`` and make it a :class:`ConvHeadGraphModule`, in place.

    ``info`` has at least ``classifier`` (qualified name of the 1×1 conv) and ``in_channels``; the pass adds
    ``fully_convolutional``, the reason it was refused if it was, and the pool's description. A GraphModule
    of another subclass keeps its class and only gets the attribute (``class_map`` still works). A change of
    class needs a recompile: ``recompile=False`` leaves it to the caller (a pass that recompiles anyway).
    """
    setattr(gm, HEAD_ATTR, dict(info))
    base = next((t for t in type(gm).__mro__ if t.__qualname__.split(".")[-1] != "GraphModuleImpl"), fx.GraphModule)
    if base is fx.GraphModule:
        _set_class(gm, ConvHeadGraphModule, recompile=recompile)
    return gm


# ----------------------------------------------------------------------------------------------- class map


def class_map(model: nn.Module, x: Any, *, head: str | None = None) -> torch.Tensor:
    """The dense (N, K, H', W') class-score map of a fully convolutional model, for input ``x``.

    After ``fxsurgeon.convert(model, conv_head=dict(fully_convolutional=True))`` the classifier is a 1×1
    conv applied to the last feature map before global average pooling, so the model accepts any input size
    and its logits are the spatial mean of this map (exactly, up to float rounding). The map is the output
    of that conv, captured with a forward hook during one forward of ``model`` (in its current train/eval
    mode and grad mode; the logits are discarded). After ``reset_classifier(0)`` it is the feature map.

    Args:
        model: a model converted with ``conv_head=dict(fully_convolutional=True)``.
        x: the input tensor, or a tuple of positional inputs.
        head: qualified name of the module whose output to return, for models converted by calling the
            pass directly or by other means; default: the classifier recorded by the ``conv_head`` pass.

    Raises:
        SurgeryError: the model has no fully convolutional head (with the reason the pass gave), or the module
            was not called or did not return an (N, K, H', W') tensor.

    >>> import torch, torch.nn as nn, fxsurgeon
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    >>> fcn = fxsurgeon.convert(net, conv_head=dict(fully_convolutional=True), separable=False)
    >>> x = torch.randn(2, 3, 20, 24)
    >>> cmap = fxsurgeon.class_map(fcn, x)
    >>> cmap.shape
    torch.Size([2, 5, 18, 22])
    >>> torch.allclose(cmap.mean((2, 3)), net(x), atol=1e-5)
    True
    """
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"class_map takes an nn.Module, got {type(model).__name__}")
    if head is None:
        info = head_info(model)
        if info is None:
            raise SurgeryError(
                f"{type(model).__name__} has no converted conv head: convert it with "
                "fxsurgeon.convert(model, conv_head=dict(fully_convolutional=True)), or name the module "
                "whose output is the class map with head=..."
            )
        if not info.get("fully_convolutional"):
            why = info.get("fully_convolutional_refused")
            raise SurgeryError(
                f"the classifier '{info['classifier']}' of {type(model).__name__} runs after the global pool, so "
                "there is no dense class map: "
                + (f"the fully convolutional form was refused: {why}" if why else
                   "it was converted without fully_convolutional=True; convert with "
                   "conv_head=dict(fully_convolutional=True)")
            )
        head = info["classifier"]
    try:
        module = model.get_submodule(head)
    except AttributeError as exc:
        raise SurgeryError(f"class_map: {type(model).__name__} has no submodule '{head}'") from exc
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    captured: list[Any] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(*inputs)
    finally:
        handle.remove()
    if not captured:
        raise SurgeryError(f"class_map: module '{head}' was not called during the forward of {type(model).__name__}")
    if len(captured) > 1:
        raise SurgeryError(f"class_map: module '{head}' was called {len(captured)} times in one forward; "
                           "its output is not a single class map")
    out = captured[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SurgeryError(f"class_map: module '{head}' returned {shape}, not an (N, K, H', W') map")
    return out
