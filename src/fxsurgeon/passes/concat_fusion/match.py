"""Finding channel concatenations (``torch.cat`` along dim 1 of 4-D tensors) the concat_fusion pass may fuse,
with the reason for each it skips.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ...graph.ops import (
    CONCAT_FUNCTIONS,
)
from ..base import Skip

__all__ = ["Concat", "find_concats", "meta_shape"]


@dataclass
class Concat:
    """A channel concatenation the pass may rewrite."""

    node: fx.Node
    target: str  # "<enclosing module>:<node name>", stable for records and `exclude`
    scope: str  # qualified name of the module whose forward concatenates ("" at the root)
    channels: int
    inputs: list[int]  # channels of each concatenated tensor
    shape: tuple[int, ...]  # (B, C, H, W)
    dtype: torch.dtype


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return str(path[0] if isinstance(path, tuple) else path)


def _target(node: fx.Node) -> str:
    scope = _scope(node)
    return f"{scope}:{node.name}" if scope else node.name


def meta_shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _cat_args(node: fx.Node) -> tuple[Any, Any, str | None]:
    """(tensors, dim, reason-to-skip) of a concat node, whatever the calling form."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
    if node.kwargs.get("out") is not None:
        return tensors, dim, "writes into an out= tensor"
    if not isinstance(tensors, (tuple, list)):
        return tensors, dim, "the tensor sequence is built at run time (not a literal tuple/list in the graph)"
    if not isinstance(dim, int) or isinstance(dim, bool):
        return tensors, dim, f"dim is not a constant ({dim!r})"
    return tensors, dim, None


def find_concats(gm: fx.GraphModule, *, exclude: Iterable[str] = ()) -> tuple[list[Concat], list[Skip]]:
    """Channel concatenations of 4-D tensors in ``gm``, and every other concat with the reason it is skipped.

    Needs ``node.meta["tensor_meta"]`` from ``ShapeProp``.

    >>> import torch, torch.nn as nn
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> class Cat(nn.Module):
    ...     def forward(self, a, b):
    ...         return torch.cat([a, b], dim=-3)
    >>> gm = torch.fx.symbolic_trace(Cat())
    >>> _ = ShapeProp(gm).propagate(torch.randn(1, 32, 16, 16), torch.randn(1, 64, 16, 16))
    >>> found, skipped = find_concats(gm)
    >>> found[0].channels, found[0].inputs
    (96, [32, 64])
    """
    patterns = list(exclude)
    found: list[Concat] = []
    skipped: list[Skip] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in CONCAT_FUNCTIONS:
            continue
        target, scope = _target(node), _scope(node)

        def skip(reason: str, **details: Any) -> None:
            skipped.append(Skip(target, reason, details={"node": node.name, **details}))  # noqa: B023

        tensors, dim, why = _cat_args(node)
        if why:
            skip(why)
            continue
        shape = meta_shape(node)
        meta = node.meta.get("tensor_meta")
        if shape is None:
            skip("no shape recorded for this node: concat_fusion needs ShapeProp shapes "
                 "(convert(..., example_inputs=...))")
            continue
        rank = len(shape)
        if rank != 4:
            skip(f"concatenates {rank}-D tensors (shape {list(shape)}): only 4-D (N, C, H, W) maps are fused",
                 shape=list(shape))
            continue
        if not -rank <= dim < rank or dim % rank != 1:
            skip(f"concatenates along dim={dim} of a 4-D tensor, not the channel axis (dim=1 or -3)",
                 shape=list(shape), dim=dim)
            continue
        parts = [meta_shape(t) for t in tensors]
        if any(p is None or len(p) != 4 for p in parts):
            skip("an input of the concat has no recorded 4-D shape", shape=list(shape))
            continue
        inputs = [p[1] for p in parts]  # type: ignore[index]
        nonempty = [c for c in inputs if c > 0]
        if len(nonempty) < 2:
            skip(f"concatenates a single non-empty tensor ({shape[1]} channels): nothing to fuse",
                 shape=list(shape))
            continue
        if not meta.dtype.is_floating_point:
            skip(f"concatenates {meta.dtype} tensors: only floating-point maps get a conv")
            continue
        if not node.users:
            skip("its result is never used")
            continue
        if any(fnmatch.fnmatchcase(name, p) for name in (target, scope, node.name) for p in patterns if name):
            skip("excluded by the `exclude` option")
            continue
        found.append(Concat(node, target, scope, int(shape[1]), inputs, shape, meta.dtype))
    return found, skipped
