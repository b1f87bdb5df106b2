"""Second moments of the concatenated activations on calibration data, for the data-aware reduction.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from ...errors import SurgeryError
from ...modes import eval_modes

__all__ = ["second_moments"]


def _batches(calibration: Any) -> Iterable[tuple]:
    if isinstance(calibration, torch.Tensor):
        yield (calibration,)
        return
    try:
        it = iter(calibration)
    except TypeError:
        raise SurgeryError(
            f"concat_fusion: calibration must be an iterable of input batches (tensors or tuples of positional "
            f"inputs), got {type(calibration).__name__}"
        ) from None
    for i, batch in enumerate(it):
        if isinstance(batch, torch.Tensor):
            yield (batch,)
        elif isinstance(batch, (tuple, list)):
            yield tuple(batch)
        else:
            raise SurgeryError(
                f"concat_fusion: calibration batch {i} is a {type(batch).__name__}; each batch must be a tensor or "
                "a tuple of positional inputs"
            )


class _MomentCollector(fx.Interpreter):
    """Runs the graph and accumulates ``Σ x xᵀ`` over every position of the watched nodes' outputs."""

    def __init__(self, gm: fx.GraphModule, watched: Iterable[fx.Node]) -> None:
        super().__init__(gm)
        self.watched = set(watched)
        self.sums: dict[fx.Node, torch.Tensor] = {}
        self.counts: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.watched and isinstance(out, torch.Tensor):
            x = out.detach()
            # (N, C, H, W) → (C, N·H·W); (N, C) → (C, N): one column per position the consumers read
            x = x.transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)
            gram = x @ x.T
            self.sums[n] = self.sums[n] + gram if n in self.sums else gram
            self.counts[n] = self.counts.get(n, 0) + x.shape[1]
        return out


def second_moments(gm: fx.GraphModule, nodes: Iterable[fx.Node], calibration: Any) -> dict[fx.Node, tuple[torch.Tensor, int]]:
    """``{node: (E[x xᵀ], positions)}`` of the channel vectors at ``nodes``, over ``calibration`` batches.

    Runs ``gm`` in eval mode under ``no_grad`` (restoring every module's mode afterwards) on its device.

    >>> import torch, torch.nn as nn
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    >>> node = next(n for n in gm.graph.nodes if n.op == "call_module")
    >>> sigma, n = second_moments(gm, [node], [torch.ones(2, 3, 4, 4)])[node]
    >>> n, sigma[0, 0].item()
    (32, 1.0)
    """
    nodes = list(nodes)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    device = next((t.device for t in (*gm.parameters(), *gm.buffers())), None)
    collector = _MomentCollector(gm, nodes)
    seen = 0
    with eval_modes(gm), torch.no_grad():
        for i, batch in enumerate(_batches(calibration)):
            if len(batch) > len(placeholders):
                raise SurgeryError(
                    f"concat_fusion: calibration batch {i} has {len(batch)} elements but the model takes "
                    f"{len(placeholders)} input(s); pass the inputs only (e.g. `(x for x, _ in loader)`)"
                )
            if device is not None and device.type != "meta":
                batch = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in batch)
            try:
                collector.run(*batch)
            except SurgeryError:
                raise
            except Exception as exc:
                shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in batch]
                raise SurgeryError(
                    f"concat_fusion: running calibration batch {i} (shapes {shapes}) failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            seen += 1
    if seen == 0:
        raise SurgeryError("concat_fusion: calibration is empty: give at least one batch of inputs")
    return {n: (collector.sums[n] / collector.counts[n], collector.counts[n]) for n in nodes if n in collector.sums}
