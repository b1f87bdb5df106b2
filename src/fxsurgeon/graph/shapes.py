"""Shapes of every node of a traced graph (``node.meta["tensor_meta"]``), from a meta-device twin when possible."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["propagate_shapes"]


def _meta_twin(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose parameters and buffers live on the meta device: no data is copied."""
    memo: dict[int, object] = {}
    for t in (*gm.parameters(), *gm.buffers()):
        twin = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else twin
    return copy.deepcopy(gm, memo)


def propagate_shapes(gm: fx.GraphModule, *inputs: object) -> str:
    """Fill ``node.meta["tensor_meta"]`` (ShapeProp) for ``inputs``; returns ``"meta"`` or ``"real"``.

    Shapes need no arithmetic: ShapeProp first runs on a twin of the model whose weights are on the meta
    device (no compute, no copy of the weights — a ResNet-50 at 224 takes a fraction of a real forward on a
    CPU) and the shapes are copied back node by node. Ops the meta device cannot run fall back to a real
    forward under ``no_grad``. The caller sets eval mode when it matters (BatchNorm in train mode would update
    its statistics on the real path).

    >>> import torch.fx as fx
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3)))
    >>> propagate_shapes(gm, torch.randn(1, 3, 10, 10))
    'meta'
    >>> [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op == "call_module"]
    [(1, 8, 8, 8)]
    """
    def channels_last(t: torch.Tensor) -> bool:
        return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)

    # meta kernels do not carry channels_last through every op, and memory format is part of the shapes
    # (latency-aware timing reads it): such models take the real path
    real = any(isinstance(x, torch.Tensor) and channels_last(x) for x in inputs) or any(
        channels_last(p) for p in gm.parameters()
    )
    try:
        if real:
            raise RuntimeError("channels_last model or inputs")
        twin = _meta_twin(gm)
        meta_inputs = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs]
        ShapeProp(twin).propagate(*meta_inputs)
        metas = [n.meta.get("tensor_meta") for n in twin.graph.nodes]
        if len(metas) != len(gm.graph.nodes):
            raise RuntimeError("graph changed while copying")
        for node, tm in zip(gm.graph.nodes, metas):
            if tm is None:
                node.meta.pop("tensor_meta", None)
            else:
                node.meta["tensor_meta"] = tm
        return "meta"
    except Exception:  # data-dependent ops, kernels without meta support: measure for real
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
        return "real"
