"""Editing a module tree by qualified name, and describing its layers for records."""

from __future__ import annotations

from torch import nn

__all__ = ["describe", "parent_name", "replace_module"]


def parent_name(target: str) -> tuple[str, str]:
    """``"a.b.c"`` → ``("a.b", "c")``; ``"c"`` → ``("", "c")``.

    >>> parent_name("layer1.0.conv1"), parent_name("fc")
    (('layer1.0', 'conv1'), ('', 'fc'))
    """
    *parent, name = target.rsplit(".", 1)
    return (parent[0] if parent else ""), name


def replace_module(root: nn.Module, target: str, new: nn.Module) -> None:
    """Put ``new`` at qualified name ``target`` in ``root`` (works inside leaf modules too).

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> replace_module(net, "1", nn.Tanh())
    >>> net[1]
    Tanh()
    """
    parent, name = parent_name(target)
    setattr(root.get_submodule(parent) if parent else root, name, new)


def describe(module: nn.Module) -> str:
    """Short, stable description of a layer for records: ``"Conv2d(64→128, 3x3, s2)"``.

    >>> describe(nn.Conv2d(64, 128, 3, stride=2)), describe(nn.Linear(8, 4))
    ('Conv2d(64→128, 3x3, s2)', 'Linear(8→4)')
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        k = "x".join(str(v) for v in module.kernel_size)
        extras = []
        if any(s != 1 for s in module.stride):
            extras.append("s" + "x".join(map(str, module.stride)) if len(set(module.stride)) > 1 else f"s{module.stride[0]}")
        if module.groups != 1:
            extras.append(f"g{module.groups}")
        if any(d != 1 for d in module.dilation):
            extras.append(f"d{module.dilation[0]}")
        tail = (", " + ", ".join(extras)) if extras else ""
        return f"{type(module).__name__}({module.in_channels}→{module.out_channels}, {k}{tail})"
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}→{module.out_features})"
    if isinstance(module, nn.Sequential):
        return " → ".join(describe(m) for m in module)
    return type(module).__name__
