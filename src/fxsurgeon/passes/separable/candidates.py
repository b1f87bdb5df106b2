"""The convs the separable pass may rewrite (k×k, groups=1, called by the traced forward), with every alias,
and the reason for each it leaves alone.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from ...graph import describe, functional_calls
from ...graph.index import ModuleIndex, SwapWording, swap_refusal
from ...modules import depthwise_conv_class
from ..base import Skip

__all__ = ["Candidate", "find_candidates", "pointwise_left_out"]


@dataclass
class Candidate:
    """A conv the separable pass may rewrite: its primary name, every alias, and where it is called from."""

    name: str
    aliases: list[str]
    conv: nn.Conv2d
    leaf: str | None  # the leaf module it sits in, when the graph calls it only through that

    @property
    def full_rank(self) -> int:
        c_out, _, kh, kw = self.conv.weight.shape
        return min(c_out, kh * kw)


def _matches_1x1(kernel_sizes: str | tuple[int, ...]) -> bool:
    return kernel_sizes != "all" and 1 in kernel_sizes  # "all" means every spatial kernel


def _kernel_ok(conv: nn.Conv2d, kernel_sizes: str | tuple[int, ...]) -> str | None:
    kh, kw = conv.kernel_size
    if kh * kw == 1:  # not a spatial conv: rewritten (form pw-pw) only when asked for, else not worth a record line
        return None if _matches_1x1(kernel_sizes) else "1x1"
    if kernel_sizes == "all":
        return None
    if kh != kw:
        return f"kernel {kh}x{kw} is not square (kernel_sizes='all' includes it)"
    if kh not in kernel_sizes:
        return f"kernel {kh}x{kw} not in kernel_sizes={tuple(kernel_sizes)}"
    return None


# a separable conv is a drop-in replacement at every name and call site: only reads and ties refuse it
_WORDING = SwapWording(
    read="its parameters are read directly by graph node '{first}' (a swap would break that read)",
    tied="weights tied with {owners}: rewriting would untie them",
)


def find_candidates(
    gm: fx.GraphModule,
    *,
    kernel_sizes: str | tuple[int, ...] = (3,),
    include_stem: bool = False,
    exclude: Iterable[str] = (),
) -> tuple[list[Candidate], list[Skip]]:
    """Every conv in ``gm``: the ones the pass may rewrite, and the others with the reason they are skipped."""
    index = ModuleIndex(gm)
    called = index.calls
    patterns = list(exclude)

    candidates: list[Candidate] = []
    skipped: list[Skip] = []
    for name, mod in index.unique_modules():
        if not isinstance(mod, nn.modules.conv._ConvNd):
            continue
        if isinstance(mod, (nn.Conv1d, nn.Conv3d, nn.modules.conv._ConvTransposeNd)):
            if any(k > 1 for k in mod.kernel_size):
                skipped.append(Skip(name, f"{describe(mod)} is not a 2-D standard conv; left alone"))
            continue
        if not isinstance(mod, nn.Conv2d):
            continue
        why = _kernel_ok(mod, kernel_sizes)
        if why == "1x1":
            continue
        names = index.names(mod, name)
        leaf = None if any(n in called for n in names) else next(
            (o for o in (index.enclosing_called(n) for n in names) if o), None
        )
        if why is None and mod.groups != 1:
            why = f"groups={mod.groups} > 1: already grouped/depthwise"
        if why is None and any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns):
            why = "excluded by the `exclude` option"
        if why is None and not include_stem and mod.in_channels <= 3:
            why = f"stem conv (in_channels={mod.in_channels} ≤ 3; include_stem=True rewrites it)"
        if why is None and depthwise_conv_class(mod) is None:
            why = f"{type(mod).__module__}.{type(mod).__qualname__} overrides forward (not a plain conv)"
        if why is None and isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params():
            why = "lazy conv with uninitialised parameters: run a forward first"
        if why is None and not any(n in called for n in names) and leaf is None:
            why = "not called by the traced forward (unused, or reached some other way)"
        if why is None:  # get_attr reads of its tensors, weights tied with another module
            why = swap_refusal(index, name, mod, wording=_WORDING)
        if why is not None:
            skipped.append(Skip(name, why, details={"module": describe(mod)}))
            continue
        candidates.append(Candidate(name, names, mod, leaf))

    for node in functional_calls(gm, "conv2d"):
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        source = _weight_source(weight)
        target = source.rsplit(".", 1)[0] if source and "." in source else node.name
        skipped.append(Skip(
            target,
            f"conv2d called functionally at graph node '{node.name}'"
            + (f" with weight '{source}'" if source else "")
            + " (functional code, or a conv subclass such as a weight-standardised conv whose forward was "
            "traced through): only nn.Conv2d modules called as modules can be swapped",
            details={"node": node.name},
        ))
    return candidates, skipped


def _weight_source(arg: object, depth: int = 6) -> str | None:
    """The parameter a functional conv's weight argument is computed from (through reshapes, norms, ...)."""
    frontier = [arg] if isinstance(arg, fx.Node) else []
    for _ in range(depth):
        nxt = []
        for node in frontier:
            if node.op == "get_attr":
                return str(node.target)
            nxt += node.all_input_nodes
        frontier = nxt
    return None


def pointwise_left_out(gm: fx.GraphModule, kernel_sizes: str | tuple[int, ...]) -> str | None:
    """When ``kernel_sizes`` leaves out 1×1 convs and the model has standard ones: how to include them (a hint
    for a latency target that was not met), else None."""
    if _matches_1x1(kernel_sizes):
        return None
    n = sum(1 for _, m in ModuleIndex(gm).unique_modules()
            if type(m) is nn.Conv2d and m.groups == 1 and tuple(m.kernel_size) == (1, 1))
    if not n:
        return None
    return (f"the model's {n} standard 1×1 convs were not candidates: with 1 in kernel_sizes (e.g. [1, 3]) the "
            "budget may rewrite them too (form pw-pw, a low-rank pair of 1×1 convs)")
