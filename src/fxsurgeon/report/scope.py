"""Give the ops torch.fx inlined into a GraphModule back to the modules they were written in, for counting.

fvcore and FlopCounterMode attribute an op to the modules whose ``forward`` is running when it executes. A
GraphModule calls only the leaf modules fx kept; the code of every other module (timm's ``LayerNorm`` and
``Conv2dSame``, a block's residual add, any functional ``F.conv2d``) is inlined into the root ``forward``. Counted
as is, a converted ViT's layer norms would move from ``blocks.3.norm1`` to the root and look "saved".
fx records where each node was traced in ``node.meta["nn_module_stack"]``; :class:`ScopedGraph` runs the graph node
by node and opens that module's scope around each inlined node: a ``torch.jit`` tracing scope, which is what
fvcore reads, and a per-node ``FlopCounterMode`` whose FLOPs are handed to the same module for the cross-check.
The ops and the totals are unchanged; only where they are filed.

Graphs without that metadata (a GraphModule unpickled by ``torch.load`` re-traces its code and loses it) are
counted as they are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = ["ScopedGraph", "node_scope", "scoped"]


def node_scope(node: fx.Node, known: set[str]) -> str | None:
    """The innermost module of ``known`` that fx traced ``node`` inside, or None (the root, or no metadata)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, value = next(reversed(stack.items()))
    path = value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else str(key)
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in known:
            return prefix
    return None


class _ScopedInterpreter(fx.Interpreter):
    def __init__(self, owner: ScopedGraph) -> None:
        super().__init__(owner.graph_module)
        self.owner = owner

    def run_node(self, n: fx.Node) -> Any:
        scope = self.owner.scopes.get(n)
        if scope is None:
            return super().run_node(n)
        state = torch._C._get_tracing_state()
        if state is not None:  # fvcore's torch.jit trace: the scope names the module that owns the ops
            state.push_scope(scope)
            try:
                return super().run_node(n)
            finally:
                state.pop_scope()
        if self.owner.count_torch:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                out = super().run_node(n)
            bucket = self.owner.moved.setdefault(scope, {})
            for op, v in counter.get_flop_counts().get("Global", {}).items():
                bucket[str(op)] = bucket.get(str(op), 0) + int(v)
            return out
        return super().run_node(n)


class ScopedGraph(nn.Module):
    """Runs ``gm`` node by node with each inlined node inside the scope of the module it came from.

    Its submodules, parameters and buffers are ``gm``'s own objects under the same names, so hooks and names
    line up with ``gm``; ``gm`` itself is not a submodule (its name would prefix every other).

    Attributes:
        scopes: inlined node → qualified name of its module.
        count_torch: measure each inlined node with FlopCounterMode (outside a jit trace).
        moved: ``{module: {aten op: FLOPs}}`` measured for inlined nodes since the last reset.
    """

    def __init__(self, gm: fx.GraphModule, scopes: dict[fx.Node, str]) -> None:
        super().__init__()
        for name, child in gm.named_children():
            self.add_module(name, child)
        for name, p in gm.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in gm.named_buffers(recurse=False):
            self.register_buffer(name, b)
        object.__setattr__(self, "graph_module", gm)
        self.scopes = scopes
        self.count_torch = False
        self.moved: dict[str, dict[str, int]] = {}

    def forward(self, *args: Any) -> Any:
        return _ScopedInterpreter(self).run(*args)


def scoped(model: nn.Module) -> ScopedGraph | None:
    """A :class:`ScopedGraph` for a GraphModule with inlined nodes that belong to a submodule, else None."""
    if not isinstance(model, fx.GraphModule):
        return None
    known = {name for name, _ in model.named_modules() if name}
    scopes = {}
    for n in model.graph.nodes:
        if n.op in ("call_function", "call_method"):
            scope = node_scope(n, known)
            if scope is not None:
                scopes[n] = scope
    return ScopedGraph(model, scopes) if scopes else None
