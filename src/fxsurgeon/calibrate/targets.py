"""What a refit layer is fit to, beyond its own output: residual sums (block targets) and ReLU-aware targets.

Graph matchers find where a layer's output joins a residual sum or reaches a ReLU (through at most a BatchNorm);
the target functions shift or relax the layer's targets accordingly (maths in each docstring).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import SurgeryError
from .stepper import Stepper

_ADDS = (operator.add, operator.iadd, torch.add)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _bn_after(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    """``(BatchNorm node, its per-channel scale γ/√(σ²+ε))`` when ``node``'s only user is an eval BatchNorm."""
    nxt = _only_user(node)
    if nxt is None or nxt.op != "call_module":
        return None
    bn = gm.get_submodule(str(nxt.target))
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
        return None
    scale = (bn.running_var.detach().double() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    return nxt, scale


def residual_join(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor | None] | None:
    """Where ``node``'s output joins a residual sum: ``(other operand of the add, per-channel scale)``.

    Matches ``node → add`` and ``node → BatchNorm (eval statistics) → add``; the scale is the BatchNorm's
    γ/√(σ²+ε) (None: no BatchNorm between). Anything else (an activation between, a second user, a sum of
    the output with itself) is not a residual join.
    """
    scale = None
    after = _bn_after(gm, node)
    if after is not None:
        node, scale = after
    nxt = _only_user(node)
    if nxt is None or nxt.op != "call_function" or nxt.target not in _ADDS or nxt.kwargs or len(nxt.args) != 2:
        return None
    a, b = nxt.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or node not in (a, b) or a is b:
        return None
    # every step has one user, so the other operand cannot depend on this layer's output
    return (b if a is node else a), scale


def gives_output_of(gm: fx.GraphModule, node: fx.Node, layer: str) -> bool:
    """Whether ``node``'s value is ``layer``'s output: the layer itself, or a Sequential (nested) ending with it."""
    name = str(node.target)
    while name != layer:
        mod = gm.get_submodule(name)
        if type(mod).forward is not nn.Sequential.forward or not len(mod) or not layer.startswith(name + "."):
            return False
        name = f"{name}.{list(mod._modules)[-1]}"
    return True


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu_)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return node.op == "call_module" and type(gm.get_submodule(str(node.target))) is nn.ReLU


def relu_after(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor | None] | None:
    """Where ``node``'s output reaches a ReLU: ``(the ReLU's input node, the BatchNorm scale between or None)``.

    Matches ``node → [BatchNorm] → [residual sum] → ReLU``, every step the only user of the one before (the
    sum as :func:`residual_join` accepts it).
    """
    head, scale = node, None
    after = _bn_after(gm, node)
    if after is not None:
        head, scale = after
    nxt = _only_user(head)
    if nxt is not None and residual_join(gm, node) is not None:
        head, nxt = nxt, _only_user(nxt)
    if nxt is None or not _is_relu(gm, nxt):
        return None
    return head, scale


def _relax_for_relu(y: torch.Tensor, pred: torch.Tensor, v: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Targets that ask only for what the ReLU after the layer passes on; and how many positions were relaxed.

    With v the original's ReLU input and a the scale between the layer and it, the converted model's ReLU
    input is ``u(ŷ) = v + a·(ŷ − y)`` (exactly, for block targets too). Where the original's ReLU outputs zero
    (v ≤ 0) any ŷ with u(ŷ) ≤ 0 gives the same result, so the target there becomes the current output
    ``pred`` projected onto that set: ``pred`` itself when already below, else the boundary ``y − v/a``.
    One step of alternating minimisation over (weights, feasible targets); channels with a = 0 keep y.
    """
    if scale is None:
        a = torch.ones((), dtype=y.dtype, device=y.device)
    else:
        a = scale.to(device=y.device, dtype=y.dtype).reshape(1, -1, *([1] * (y.dim() - 2)))
    dead = (v <= 0) & (a != 0)
    safe = torch.where(a != 0, a, torch.ones_like(a))
    below = v + a * (pred - y) <= 0  # the current output already zeroed by the ReLU
    relaxed = torch.where(dead, torch.where(below, pred, y - v / safe), y)
    return relaxed, int(dead.sum())


def block_targets(cs: Stepper, rs: Stepper, c_join: tuple, r_join: tuple, ys: list[list[torch.Tensor]]) -> bool:
    """Shift the layer's targets so the residual sum after it matches the original's (in place).

    With s the other operand of the sum and a the BatchNorm scale between (1 without one), the original
    computes ``a·y + s`` and the converted model ``a·y' + s'``; the target ``y + (s − s')/a`` makes the layer
    cancel the error its shortcut carries. Channels with a = 0 keep the plain target.
    """
    c_other, scale = c_join
    r_other = r_join[0]
    inv = None if scale is None else torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    shifted = []
    for i, ys_i in enumerate(ys):
        if len(ys_i) != 1:
            return False
        y = ys_i[0]
        try:
            s_r, s_c = rs.value(r_other, i), cs.value(c_other, i)
        except SurgeryError:  # a value the walk no longer holds: keep the layer's own target
            return False
        if not (isinstance(s_r, torch.Tensor) and isinstance(s_c, torch.Tensor)) or s_r.shape != y.shape \
                or s_c.shape != y.shape:
            return False
        d = (s_r - s_c).double()
        if inv is not None:
            d = d * inv.to(d.device).reshape(1, -1, *([1] * (d.dim() - 2)))
        shifted.append([(y.double() + d).to(y.dtype)])
    ys[:] = shifted
    return True


class ReluTargets:
    """Targets for a layer before a ReLU, relaxed around the layer's current output (:func:`_relax_for_relu`),
    and the error of that output as the ReLU sees it.

    ``r_head`` is the original's ReLU input node and ``scale`` the BatchNorm scale between layer and ReLU.
    :meth:`__call__` takes batch ``i``'s targets and the layer's current output on it, returns the relaxed
    targets and adds to the running error: a position the original's ReLU zeroes counts only by how far the
    output would pass the ReLU. A batch whose values are missing or do not line up keeps its targets and
    makes :attr:`error` None.
    """

    def __init__(self, rs: Stepper, r_head: fx.Node, scale: torch.Tensor | None) -> None:
        self.rs, self.r_head, self.scale = rs, r_head, scale
        self.err = self.norm = 0.0
        self.dead = self.total = 0
        self.ok = True

    def __call__(self, i: int, ys: list[Any], pred: Any) -> list[Any]:
        try:
            v = self.rs.value(self.r_head, i) if len(ys) == 1 else None
        except SurgeryError:
            v = None
        y = ys[0] if len(ys) == 1 else None
        if not all(isinstance(t, torch.Tensor) and t.shape == y.shape for t in (y, v, pred)):
            self.ok = False
            return ys
        relaxed, dead = _relax_for_relu(y, pred, v, self.scale)
        self.err += float((pred - relaxed).pow(2).sum(dtype=torch.float64))
        self.norm += float(y.pow(2).sum(dtype=torch.float64))
        self.dead, self.total = self.dead + dead, self.total + y.numel()
        return [relaxed]

    @property
    def error(self) -> float | None:
        """Relative error of the outputs seen so far, as the ReLU sees it (None when a batch did not line up)."""
        if not self.ok or self.norm <= 0:
            return None
        return math.sqrt(self.err / self.norm)


def layer_outputs(cs: Stepper, node: fx.Node, ys_all: list[list[Any]], relu: ReluTargets) -> ReluTargets:
    """Run the layer's node on every batch (current weights) through ``relu``, for its error."""
    for i, ys in enumerate(ys_all):
        relu(i, ys, cs.call(node, i))
    return relu
