"""Conv head pass: Linear classifier on globally average-pooled features → 1×1 conv (exact).

Matches the model's classifier — the ``nn.Linear`` (or timm's traced-through ``F.linear``) whose output
reaches the graph output with no other parametric layer after it — when its input comes from a global
average pool of an (N, C, H, W) map, in every form models write that pool: ``nn.AdaptiveAvgPool2d(1)``,
``F.adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3))`` / ``x.mean([-2, -1])`` with or without ``keepdim`` (also
``x.mean(3).mean(2)`` and ``x.flatten(2).mean(-1)``), any average pool whose window is the whole map
(``F.avg_pool2d(x, x.size(3))``, ``nn.AvgPool2d(7)`` on a 7×7 map; checked with ShapeProp shapes), timm's
``SelectAdaptivePool2d`` (avg / fast, flattening or not) and ``ClassifierHead`` whether traced through or
kept as leaf modules; then flatten / view / reshape / squeeze, dropout, activations and further Linears.

Emits ``Conv2d(C, K, 1)`` at the Linear's qualified name (weight reshaped to (K, C, 1, 1), same bias) applied
to the (N, C, 1, 1) pooled tensor, then ``flatten(1)``: the same (N, K) output, exactly. Norms, activations
and 1×1 convs between pool and Linear (timm ``NormMlpClassifierHead``, ConvNeXt, MobileNetV3) stay; Linears
between pool and classifier (MLP heads) become 1×1 convs too. With ``fully_convolutional=True`` the convs
move before the pool, where only linear per-position operations lie between (exact by linearity); the model
then takes any input size and :func:`fxsurgeon.class_map` returns the dense class-score map.

Token/sequence heads (ViT, MLP-Mixer), max pooling, several classifier heads combined (distillation), and
Linears not fed by a spatial average pool are skipped with the reason. Shapes come from ShapeProp when
``convert()`` had ``example_inputs``; without them they are derived from a timm model's
``pretrained_cfg["input_size"]``, and otherwise only the unambiguous forms are matched structurally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ...graph import propagate_shapes
from ...graph.index import ModuleIndex
from ...heads import adopt_head_api
from ...modes import eval_modes
from ..base import PassResult, Rewrite, Skip
from ..options import PassOptions
from ..registry import register_pass
from .match import HeadMatch, expand_classifier_head, find_heads, op_kind
from .nodes import LINEAR, node_shape
from .pools import Gap, match_global_pool
from .rewrite import check_ranks, fc_refusal, head_segment, rewrite_head, tensor_rank

__all__ = ["ConvHeadOptions", "Gap", "HeadMatch", "conv_head", "find_heads", "match_global_pool"]


def _has_shapes(gm: fx.GraphModule) -> bool:
    return any(node_shape(n) is not None for n in gm.graph.nodes if n.op == "placeholder")


def _shapes_would_decide(ctx: ModuleIndex, matches: list[HeadMatch], skipped: list[Skip],
                         fully_convolutional: bool) -> bool:
    """Whether derived shapes could change the outcome: a head waits for shapes, or a match is ambiguous without.

    A match whose every check passes structurally (timm's ``ClassifierHead``, ``AdaptiveAvgPool2d(1)`` then
    ``flatten(1)``, ...) is converted the same with or without shapes, so the shape derivation — a pass over the
    whole model, the bulk of this pass's time — is left out for it.
    """
    if any("shapes are needed" in s.reason for s in skipped):
        return True
    for match in matches:
        if node_shape(match.linear) is None and ctx.gm.get_submodule(match.name).weight.shape[1] == 1:
            return True
        if fully_convolutional and fc_refusal(ctx, match) is None and check_ranks(
                ctx, match.gap.node, tensor_rank(ctx, match.gap.node, match.gap), match.chain, match.linear)[0]:
            return True
        for target in (match.linear, *(n for n in match.chain if op_kind(ctx, n) == LINEAR)):
            source, seg = head_segment(ctx, target)
            if check_ranks(ctx, source, tensor_rank(ctx, source, match.gap), seg, target)[0]:
                return True
    return False


def _derive_shapes(gm: fx.GraphModule) -> tuple[str | None, str | None]:
    """Run ShapeProp on an input of a timm model's ``pretrained_cfg["input_size"]``: (how, None) or (None, why not)."""
    cfg = getattr(gm, "pretrained_cfg", None) or getattr(gm, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if not (isinstance(size, (tuple, list)) and len(size) == 3 and all(isinstance(s, int) for s in size)):
        return None, "no example_inputs and no timm pretrained_cfg input_size to derive shapes from"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None, f"no example_inputs, and the model takes {len(placeholders)} inputs"
    ref = next((t for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    if device.type == "meta":
        return None, "no example_inputs, and the model is on the meta device"
    gen = torch.Generator().manual_seed(0)
    # batch 2: a batch of 1 would hide what a bare squeeze() does to the batch dimension
    x = torch.randn(2, *size, generator=gen).to(device=device, dtype=ref.dtype if ref is not None else None)
    try:
        with eval_modes(gm):
            propagate_shapes(gm, x)
    except Exception as exc:  # the model may not accept that size: fall back to structural matching
        for n in gm.graph.nodes:
            n.meta.pop("tensor_meta", None)
        return None, (f"no example_inputs, and running it at pretrained_cfg input_size {list(size)} failed: "
                      f"{type(exc).__name__}: {exc}")
    return f"derived: ShapeProp at pretrained_cfg input_size {list(size)} (no example_inputs)", None


@dataclass(frozen=True)
class ConvHeadOptions(PassOptions):
    """Options of the :func:`conv_head` pass.

    Attributes:
        fully_convolutional: move the convs before the pool (pool → conv becomes conv → pool), exact by
            linearity where only linear per-position operations lie between (dropout becomes channel
            dropout, which pools to exactly the original's distribution). Refused with the reason, and the
            plain form used, where a norm or nonlinearity sits between pool and classifier.
    """

    pass_name: ClassVar[str] = "conv_head"

    fully_convolutional: bool = False


@register_pass(order=100, needs_shapes=True, default=True, options=ConvHeadOptions)
def conv_head(gm: fx.GraphModule, options: ConvHeadOptions | None = None, /, **kwargs: Any) -> PassResult:
    """Swap a Linear classifier after global average pooling for a 1×1 conv (exact).

    Matches: the model's single classifier (a Linear with no layer with weights after it) whose input comes
    from a global average pool (every form: see the module docstring), through flatten / view / reshape /
    squeeze, dropout, and possibly norms, activations, 1×1 convs and hidden Linears.

    Emits: ``Conv2d(C, K, 1)`` at the Linear's qualified name (weight (K, C, 1, 1), same bias) on the
    (N, C, 1, 1) pooled tensor, then ``flatten(1)``; Linears of an MLP head likewise. Exact (float rounding
    only). The model becomes a :class:`fxsurgeon.heads.ConvHeadGraphModule` answering ``get_classifier()``
    / ``reset_classifier()`` / ``class_map()``.

    Args:
        gm: the traced model, edited in place.
        options: a :class:`ConvHeadOptions` (``fully_convolutional``), or its fields as keywords (not both).

    Needs: shapes from ShapeProp to confirm window/mean pools and squeezes (``convert()`` provides them with
    ``example_inputs``; for timm models they are derived from ``pretrained_cfg``); ``AdaptiveAvgPool2d(1)`` /
    ``F.adaptive_avg_pool2d(x, 1)`` followed by ``flatten(1)`` or ``view(x.size(0), -1)`` are matched
    without. The record says which (``details["shapes"]``).

    >>> import torch, torch.nn as nn
    >>> from fxsurgeon.tracing import trace
    >>> gm = trace(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)))
    >>> res = conv_head(gm)
    >>> res.rewrites[0].after, res.rewrites[0].exact
    ('Conv2d(128→10, 1x1)', True)
    >>> gm(torch.randn(4, 128, 7, 7)).shape
    torch.Size([4, 10])
    """
    fully_convolutional = ConvHeadOptions.coerce(options, kwargs).fully_convolutional
    expand_classifier_head(gm)
    shapes, no_shapes = ("shape_prop", None) if _has_shapes(gm) else (None, None)
    ctx = ModuleIndex(gm)
    matches, skipped = find_heads(gm, ctx)
    if not shapes and _shapes_would_decide(ctx, matches, skipped, fully_convolutional):
        shapes, no_shapes = _derive_shapes(gm)
        if shapes:
            matches, skipped = find_heads(gm, ctx)
    elif not shapes:
        no_shapes = "the head's form needs none"
    label = shapes or f"none: matched structurally ({no_shapes})"
    if not shapes:
        for s in skipped:
            if "shapes are needed" in s.reason:
                s.details["shapes"] = label
    rewrites: list[Rewrite] = []
    infos = []
    for i, match in enumerate(matches):
        done, skips, info = rewrite_head(ctx if i == 0 else ModuleIndex(gm), match, fully_convolutional, label)
        rewrites += done
        skipped += skips
        if info is not None:
            infos.append(info)
    if rewrites:
        gm.graph.lint()
        for info in infos:
            adopt_head_api(gm, info, recompile=False)
        gm.recompile()
    return PassResult(gm, rewrites, skipped, "conv_head")
