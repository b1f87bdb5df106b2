"""Train/eval flags: save every submodule's, run in eval mode, put them back.

fxsurgeon runs users' models (to verify, measure, calibrate) and must leave each submodule's ``training`` flag as
it found it (STYLE.md; torchvision's ``get_graph_node_names`` does the same). ``model.eval()`` followed by
``model.train(old)`` would not: a model in train mode with a frozen BatchNorm in eval mode comes back all-train.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_modes", "modes", "restore_modes"]


def modes(model: nn.Module) -> dict[str, bool]:
    """Every submodule's ``training`` flag, by qualified name."""
    return {name: m.training for name, m in model.named_modules()}


def restore_modes(model: nn.Module, saved: dict[str, bool], default: bool) -> None:
    """Put ``saved`` flags back; a submodule not in ``saved`` (added since) takes its parent's saved flag when
    the parent was saved, else ``default``."""
    for name, m in model.named_modules():
        m.training = saved.get(name, m.training if name.rsplit(".", 1)[0] in saved else default)


@contextmanager
def eval_modes(*models: nn.Module) -> Iterator[None]:
    """Run the block with ``models`` in eval mode; every submodule's train/eval flag is put back after.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2).eval())
    >>> with eval_modes(net):
    ...     net.training
    False
    >>> net.training, net[1].training
    (True, False)
    """
    saved = [(m, modes(m)) for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for model, flags in saved:
            for name, m in model.named_modules():
                m.training = flags.get(name, m.training)
