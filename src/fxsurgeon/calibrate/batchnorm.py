"""BatchNorm statistics re-estimated exactly on calibration data, for the layers downstream of rewrites."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..modes import eval_modes as _eval_modes
from ..runtime import device_of, to_device
from .data import as_batches
from .refit import bn_frontier, bn_streaming

__all__ = ["downstream_batchnorms", "reestimate_batchnorm"]


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def downstream_batchnorms(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """BatchNorm modules whose input depends on any of ``targets`` (all of them if ``model`` is not fx)."""
    all_bn = [n for n, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats
              and m.running_mean is not None]
    if not isinstance(model, fx.GraphModule):
        return all_bn
    targets = list(targets)

    def touches(node_target: str) -> bool:
        return any(t == node_target or t.startswith(node_target + ".") for t in targets)

    frontier = [n for n in model.graph.nodes if n.op == "call_module" and touches(str(n.target))]
    reached: set[fx.Node] = set()
    while frontier:
        node = frontier.pop()
        if node in reached:
            continue
        reached.add(node)
        frontier.extend(node.users)
    out: list[str] = []
    for node in model.graph.nodes:
        if node in reached and node.op == "call_module":
            name = str(node.target)
            for n in all_bn:
                if (n == name or n.startswith(name + ".")) and n not in out:
                    out.append(n)
    return out


def reestimate_batchnorm(model: nn.Module, batches: Any, names: Iterable[str] | None = None) -> int:
    """Recompute the running mean/variance of BatchNorm layers (``names``; default all) on ``batches``.

    The statistics are exact over all the data, in network order: each BatchNorm sees inputs normalised by
    the (already re-estimated) statistics before it, as in inference, so the result does not depend on how
    the data is batched or ordered (a batch of one class would skew train-mode batch statistics). Modes
    are restored. Returns how many BatchNorm layers were updated.

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> reestimate_batchnorm(net, torch.randn(8, 3, 9, 9))
    1
    """
    batches = as_batches(batches)
    names = [n for n, m in model.named_modules() if isinstance(m, _BN)] if names is None else list(names)
    names = [n for n in names if getattr(model.get_submodule(n), "running_mean", None) is not None]
    if not names:
        return 0
    dev = device_of(model)
    with _eval_modes(model), torch.no_grad():
        if isinstance(model, fx.GraphModule):
            done, _ = bn_frontier(model, [to_device(b, dev) for b in batches], names)
        else:
            done = bn_streaming(model, batches, names, dev)
    return done
