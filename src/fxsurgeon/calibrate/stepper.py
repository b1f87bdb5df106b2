"""Running the models for calibration: capture hooks, network order, and the node-by-node ("frontier")
execution of a GraphModule over all batches at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import SurgeryError
from .data import StopForward, forward_batch


class _Capture:
    """A hook on one module recording its first input (pre-hook) or output per call, stopping when done."""

    def __init__(self, module: nn.Module, *, inputs: bool, stop_after: int | None) -> None:
        self.stop_after = stop_after
        self.items: list[torch.Tensor] = []
        if inputs:
            self.handle = module.register_forward_pre_hook(lambda mod, args: self._add(mod, args[0] if args else None))
        else:
            self.handle = module.register_forward_hook(lambda mod, args, out: self._add(mod, out))

    def _add(self, mod: nn.Module, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            raise SurgeryError(f"calibration: {type(mod).__name__} takes or returns {type(t).__name__}, not a tensor")
        self.items.append(t.detach())
        if self.stop_after is not None and len(self.items) >= self.stop_after:
            raise StopForward

    def remove(self) -> None:
        self.handle.remove()


def capture_module(module: nn.Module, fn: Any, *, inputs: bool, stop_after: int | None) -> list[torch.Tensor]:
    """Run ``fn()`` with a capture hook on ``module``; what it saw, per call."""
    cap = _Capture(module, inputs=inputs, stop_after=stop_after)
    try:
        fn()
    except StopForward:
        pass
    finally:
        cap.remove()
    return cap.items


def call_order(model: nn.Module, batch: tuple, names: Sequence[str]) -> list[str]:
    """``names`` sorted by when ``model`` first calls them (network order), uncalled ones last."""
    order: dict[str, int] = {}
    handles = []
    for n in names:
        def hook(mod, args, n=n):
            order.setdefault(n, len(order))
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            forward_batch(model, batch, "the converted model")
    finally:
        for h in handles:
            h.remove()
    return sorted(names, key=lambda n: order.get(n, len(names) + 1))


class Stepper:
    """Runs a GraphModule node by node over *all* batches at once ("frontier" execution).

    Only live values are kept (fx's last-use analysis), so memory is the widest cut of the graph times
    the amount of data, and each node runs once per batch: refitting a layer needs no re-run of the
    network before it.
    """

    def __init__(self, gm: fx.GraphModule, batches: Sequence[tuple]) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.pos = 0
        self.batch = 0
        self.stepping = False  # True while step() runs a node (not while value() recomputes one)
        self.interps = []
        for b in batches:
            it = fx.Interpreter(gm, garbage_collect_values=True)
            it.args_iter = iter(b)
            self.interps.append(it)
        self.outputs: list[Any] = [None] * len(batches)

    def step(self) -> fx.Node:
        node = self.nodes[self.pos]
        for i, it in enumerate(self.interps):
            self.batch = i
            self.stepping = True
            try:
                val = it.run_node(node)
            except Exception as exc:
                raise SurgeryError(f"calibration: running graph node '{node.name}' failed: {type(exc).__name__}: "
                                   f"{exc}") from exc
            finally:
                self.stepping = False
            if node.op == "output":
                self.outputs[i] = val
            else:
                it.env[node] = val
            for dead in it.user_to_last_uses.get(node, []):
                it.env.pop(dead, None)
        self.pos += 1
        return node

    def run_to_end(self) -> list[Any]:
        while self.pos < len(self.nodes):
            self.step()
        return self.outputs

    def value(self, node: fx.Node, i: int, memo: dict[fx.Node, Any] | None = None) -> Any:
        """``node``'s value on batch ``i``: from the environment, or computed (not stored) from live values.

        A node that has not run yet only needs values that are still live: whatever it depends on was
        either computed before and is used again (by this node's chain) later, or comes after and is
        computed here.
        """
        env = self.interps[i].env
        if node in env:
            return env[node]
        memo = {} if memo is None else memo
        if node not in memo:
            if node.op in ("placeholder", "output"):
                raise SurgeryError(f"calibration: graph input '{node.name}' is no longer held")
            it = self.interps[i]
            args = fx.node.map_arg(node.args, lambda n: self.value(n, i, memo))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: self.value(n, i, memo))
            memo[node] = getattr(it, node.op)(node.target, args, kwargs)
        return memo[node]

    def call(self, node: fx.Node, i: int) -> Any:
        """Call ``node``'s module on batch ``i``'s inputs without storing the result (for hooks to see)."""
        args, kwargs = self.interps[i].fetch_args_kwargs_from_env(node)
        return self.gm.get_submodule(str(node.target))(*args, **kwargs)

    def live_bytes(self) -> int:
        from torch.utils._pytree import tree_flatten

        total = 0
        for it in self.interps:
            leaves, _ = tree_flatten(list(it.env.values()))
            total += sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
        return total


def containing_nodes(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    """call_module nodes whose module is ``name`` or contains it (a leaf module)."""
    return [n for n in gm.graph.nodes if n.op == "call_module"
            and (str(n.target) == name or name.startswith(str(n.target) + "."))]


def peak_bytes(gm: fx.GraphModule, batch: tuple) -> int:
    """Largest live activation memory of one batch through ``gm`` (for choosing frontier execution)."""
    st = Stepper(gm, [batch])
    peak = 0
    while st.pos < len(st.nodes):
        st.step()
        peak = max(peak, st.live_bytes())
    return peak
