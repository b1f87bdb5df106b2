"""Where each module of a traced graph is registered and used: names, call sites, parameter reads.

:class:`ModuleIndex` gathers these facts once per graph for the passes, and :func:`swap_refusal` is the one
check every pass makes before it puts a new module at a module's qualified name: is the module shared by
other names or call sites, are its tensors read by ``get_attr`` elsewhere, are its weights tied to another
module's. Each pass words the reasons its own way (:class:`SwapWording`); the checks are the same.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from .ops import FUNCTIONAL_LAYERS

__all__ = [
    "ModuleIndex",
    "SwapWording",
    "called_modules",
    "enclosing_called_module",
    "functional_calls",
    "module_aliases",
    "swap_refusal",
]


def module_aliases(root: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every module object, keyed by ``id``: a module registered twice has two.

    >>> relu = nn.ReLU()
    >>> net = nn.Sequential(relu, nn.Linear(2, 2), relu)
    >>> module_aliases(net)[id(relu)]
    ['0', '2']
    """
    names: dict[int, list[str]] = defaultdict(list)
    for name, mod in root.named_modules(remove_duplicate=False):
        if name not in names[id(mod)]:
            names[id(mod)].append(name)
    return dict(names)


def called_modules(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """``call_module`` targets of the graph and the nodes calling them.

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    >>> {t: [n.name for n in ns] for t, ns in called_modules(gm).items()}
    {'0': ['_0'], '1': ['_1']}
    """
    sites: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sites[str(node.target)].append(node)
    return dict(sites)


def enclosing_called_module(name: str, called: dict[str, list[fx.Node]]) -> str | None:
    """The graph-called (leaf) module that contains submodule ``name``, if any.

    >>> enclosing_called_module("stem.conv.weight_gen", {"stem.conv": []}), enclosing_called_module("fc", {})
    ('stem.conv', None)
    """
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in called:
            return prefix
    return None


def functional_calls(gm: fx.GraphModule, kind: str) -> Iterator[fx.Node]:
    """``call_function`` nodes of a functional op, e.g. ``kind="conv2d"`` finds ``F.conv2d`` / ``torch.conv2d``.

    >>> import torch.nn.functional as F
    >>> gm = fx.symbolic_trace(lambda x, w: F.relu(F.conv2d(x, w)))
    >>> [n.name for n in functional_calls(gm, "conv2d")]
    ['conv2d']
    """
    targets = FUNCTIONAL_LAYERS[kind]
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in targets:
            yield node


def _owner(target: str) -> str:
    """The module a ``get_attr`` target belongs to: ``"layer1.conv.weight"`` → ``"layer1.conv"``."""
    return target.rsplit(".", 1)[0]


class ModuleIndex:
    """Facts about the modules of one :class:`~torch.fx.GraphModule`, gathered once when it is built.

    The index is a snapshot: after editing the graph or the module tree, build a new one.

    Attributes:
        gm: the graph module indexed.
        modules: every qualified name of every module (``named_modules(remove_duplicate=False)``): a module
            registered under several names, or inside a container registered under several names, appears
            under each.
        aliases: ``id(module)`` → every name of that module object, first the one ``named_modules()`` gives it.
        calls: ``call_module`` target → the nodes calling it, in graph order.
        reads: ``get_attr`` target → the nodes reading it, in graph order.
        owners: ``id(tensor)`` → the modules holding that parameter or buffer directly, each module object once
            under its first name (several entries: tied weights).

    >>> import torch.fx as fx
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a = nn.Linear(4, 4)
    ...         self.c = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return self.c(self.a(self.a(x))) + self.c.bias
    >>> gm = fx.symbolic_trace(Net())
    >>> gm.add_submodule("b", gm.a)  # one module, two names
    True
    >>> index = ModuleIndex(gm)
    >>> index.names(index.modules["b"]), len(index.calls["a"]), [n.name for n in index.attribute_reads(["c"])]
    (['a', 'b'], 2, ['c_bias'])
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules: dict[str, nn.Module] = dict(gm.named_modules(remove_duplicate=False))
        aliases: dict[int, list[str]] = defaultdict(list)
        for name, mod in self.modules.items():  # the module_aliases(gm) of this traversal
            aliases[id(mod)].append(name)
        self.aliases: dict[int, list[str]] = dict(aliases)
        self.calls: dict[str, list[fx.Node]] = called_modules(gm)
        reads: dict[str, list[fx.Node]] = defaultdict(list)
        by_owner: dict[str, list[fx.Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                reads[str(node.target)].append(node)
                by_owner[_owner(str(node.target))].append(node)
        self.reads: dict[str, list[fx.Node]] = dict(reads)
        self._reads_by_owner = dict(by_owner)
        owners: dict[int, list[str]] = defaultdict(list)
        for name, mod in self.unique_modules():
            for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)):
                owners[id(t)].append(name)
        self.owners: dict[int, list[str]] = dict(owners)

    def unique_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """Each module object once, under its first name, in ``named_modules()`` order."""
        for names in self.aliases.values():
            yield names[0], self.modules[names[0]]

    def names(self, module: nn.Module, fallback: str | None = None) -> list[str]:
        """Every qualified name of ``module``; ``[fallback]`` for a module not in the tree (one swapped in since)."""
        return list(self.aliases.get(id(module), [fallback] if fallback is not None else []))

    def call_sites(self, names: Iterable[str]) -> list[fx.Node]:
        """The ``call_module`` nodes calling the module under any of ``names``."""
        return [node for name in names for node in self.calls.get(name, [])]

    def attribute_reads(self, names: Iterable[str]) -> list[fx.Node]:
        """The ``get_attr`` nodes reading a tensor of the module under any of ``names`` (name by name, each in
        graph order)."""
        return [node for name in names for node in self._reads_by_owner.get(name, [])]

    def users(self, names: Iterable[str]) -> list[fx.Node]:
        """Every node using the module under any of ``names``: its call sites and the reads of its tensors."""
        names = list(names)
        return [*self.call_sites(names), *self.attribute_reads(names)]

    def tied_with(self, module: nn.Module, names: Iterable[str]) -> list[str]:
        """The other modules (first names, sorted) holding one of ``module``'s own parameters: tied weights."""
        names = set(names)
        return sorted({o for p in module.parameters(recurse=False) for o in self.owners.get(id(p), [])
                       if o not in names})

    def enclosing_called(self, name: str) -> str | None:
        """The graph-called (leaf) module that contains submodule ``name``, if any."""
        return enclosing_called_module(name, self.calls)


@dataclass(frozen=True)
class SwapWording:
    """How a pass words each reason :func:`swap_refusal` gives; each field is a :meth:`str.format` template.

    Fields and the values they are formatted with:
        aliases: ``names`` (joined with ", ").
        call_sites: ``sites`` (how many).
        read: ``nodes`` (names joined with ", "), ``first`` (the first node's name).
        read_elsewhere: ``target`` (the ``get_attr`` target).
        also_called: ``name``.
        tied: ``owners`` (names joined with ", ").
    """

    aliases: str = "registered under several names ({names})"
    call_sites: str = "called at {sites} places in the graph"
    read: str = "its parameters are read directly by graph node(s) {nodes}"
    read_elsewhere: str = "'{target}' is read elsewhere in the graph"
    also_called: str = "'{name}' is also called as a module in the graph"
    tied: str = "weights tied with {owners}"


def swap_refusal(
    index: ModuleIndex,
    name: str,
    module: nn.Module,
    *,
    node: fx.Node | None = None,
    single_name: bool = False,
    single_call: bool = False,
    wording: SwapWording = SwapWording(),
) -> str | None:
    """Why ``module`` (at qualified name ``name``) cannot be replaced by a new module object, or None.

    The checks, in order:

    1. ``single_name``: the module is registered under one name only (a pass that swaps it at ``name`` alone
       would untie the others);
    2. for a module used by the ``call_module`` node ``node`` (or ``node=None``): ``single_call``, it is called
       at one place only, under all its names together (a pass that changes what the module computes would
       break the other calls); and no ``get_attr`` node reads one of its tensors directly;
    3. for a module whose tensors feed the functional call ``node`` (``F.linear(x, m.weight, m.bias)``): no
       other node uses those tensors, and the graph does not also call it as a module;
    4. none of its parameters is also a parameter of another module (tied weights).

    A pass whose new module is a drop-in replacement at every name (same inputs and outputs) leaves
    ``single_name`` and ``single_call`` False: sharing then stays sharing.

    >>> import torch.fx as fx
    >>> class Twice(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return self.fc(self.fc(x))
    >>> index = ModuleIndex(fx.symbolic_trace(Twice()))
    >>> swap_refusal(index, "fc", index.modules["fc"], single_call=True)
    'called at 2 places in the graph'
    >>> swap_refusal(index, "fc", index.modules["fc"]) is None
    True
    """
    names = index.names(module, name)
    if single_name and len(names) > 1:
        return wording.aliases.format(names=", ".join(names))
    if node is None or node.op == "call_module":
        sites = len(index.call_sites(names))
        if single_call and sites > 1:
            return wording.call_sites.format(sites=sites)
        read = index.attribute_reads(names)
        if read:
            return wording.read.format(nodes=", ".join(r.name for r in read), first=read[0].name)
    else:
        for r in index.attribute_reads([name]):
            if any(u is not node for u in r.users):
                return wording.read_elsewhere.format(target=r.target)
        if name in index.calls:
            return wording.also_called.format(name=name)
    tied = index.tied_with(module, names)
    if tied:
        return wording.tied.format(owners=", ".join(tied))
    return None
