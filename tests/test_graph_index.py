"""fxsurgeon.graph.index: one module index per graph, and the one swap-refusal check the passes share."""

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxsurgeon.graph import replace_module
from fxsurgeon.graph.index import ModuleIndex, SwapWording, swap_refusal


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class Shared(nn.Module):
    """``block`` is registered twice (``left``/``right``: one object), ``fc`` is called twice, ``proj``'s bias is
    read by ``get_attr`` besides its call, and ``tied``'s weight is ``head``'s."""

    def __init__(self):
        super().__init__()
        self.left = Block()
        self.right = self.left
        self.fc = nn.Linear(4, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)
        self.tied = nn.Linear(4, 4)
        self.tied.weight = self.head.weight

    def forward(self, x):
        y = self.right(self.left(x)).mean((2, 3))
        y = self.fc(self.fc(y))
        y = self.proj(y) + self.proj.bias
        return self.head(y) + self.tied(y)


def _index() -> ModuleIndex:
    # a leaf Block keeps its subtree, so the GraphModule holds both names of the shared block
    class Leaves(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, Block) or super().is_leaf_module(m, qualname)

    root = Shared()
    gm = fx.GraphModule(root, Leaves().trace(root))
    gm.add_submodule("right", gm.left)  # the tracer named every call 'left'; keep the second name too
    return ModuleIndex(gm)


def test_modules_keep_every_name_of_a_shared_module():
    index = _index()
    block = index.modules["left"]
    assert index.modules["right"] is block
    assert index.modules["right.conv"] is index.modules["left.conv"]  # inside a doubly registered container too
    assert index.names(block) == ["left", "right"]
    assert index.names(block.conv) == ["left.conv", "right.conv"]
    # each object once, under its first name, in named_modules() order
    assert list(index.unique_modules()) == list(index.gm.named_modules())


def test_call_sites_per_target_and_across_names():
    index = _index()
    assert [n.op for n in index.calls["fc"]] == ["call_module", "call_module"]
    assert len(index.calls["left"]) == 2 and "right" not in index.calls  # traced under the first name
    assert len(index.call_sites(["left", "right"])) == 2
    assert index.call_sites(["nothing"]) == []


def test_get_attr_reads_and_users():
    index = _index()
    assert [n.name for n in index.reads["proj.bias"]] == ["proj_bias"]
    assert [n.target for n in index.attribute_reads(["proj"])] == ["proj.bias"]
    assert index.attribute_reads(["fc"]) == []
    assert [n.op for n in index.users(["proj"])] == ["call_module", "get_attr"]


def test_owners_and_tied_weights():
    index = _index()
    head, tied = index.modules["head"], index.modules["tied"]
    assert index.owners[id(head.weight)] == ["head", "tied"]
    assert index.tied_with(head, ["head"]) == ["tied"]
    assert index.tied_with(tied, ["tied"]) == ["head"]
    assert index.tied_with(index.modules["fc"], ["fc"]) == []
    # a tied partner registered under two names is one partner, named once
    gm = index.gm
    gm.add_submodule("tied_again", gm.tied)
    assert ModuleIndex(gm).tied_with(head, ["head"]) == ["tied"]


def test_swap_refusal_reasons_in_order():
    index = _index()
    block = index.modules["left"]
    assert swap_refusal(index, "left", block, single_name=True) == "registered under several names (left, right)"
    # a drop-in replacement at every name may keep a module shared
    assert swap_refusal(index, "left", block) is None
    assert swap_refusal(index, "left", block, single_call=True) == "called at 2 places in the graph"
    assert swap_refusal(index, "fc", index.modules["fc"], single_call=True) == "called at 2 places in the graph"
    assert swap_refusal(index, "fc", index.modules["fc"]) is None
    assert swap_refusal(index, "proj", index.modules["proj"]) == (
        "its parameters are read directly by graph node(s) proj_bias")
    assert swap_refusal(index, "head", index.modules["head"]) == "weights tied with tied"
    # the pass's own words, formatted with the same facts
    words = SwapWording(call_sites="{sites} calls", read="read by '{first}'", tied="tied to {owners}!")
    assert swap_refusal(index, "fc", index.modules["fc"], single_call=True, wording=words) == "2 calls"
    assert swap_refusal(index, "proj", index.modules["proj"], wording=words) == "read by 'proj_bias'"
    assert swap_refusal(index, "tied", index.modules["tied"], wording=words) == "tied to head!"


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.other = nn.Linear(4, 4)

    def forward(self, x):
        y = F.linear(x, self.lin.weight, self.lin.bias) + self.other.bias
        return F.linear(y, self.other.weight, self.other.bias)


def test_swap_refusal_for_a_functional_use():
    gm = fx.symbolic_trace(Functional())
    index = ModuleIndex(gm)
    first, second = [n for n in gm.graph.nodes if n.target is F.linear]
    assert swap_refusal(index, "lin", index.modules["lin"], node=first) is None
    # other.bias feeds the add as well as the second F.linear
    assert swap_refusal(index, "other", index.modules["other"], node=second) == (
        "'other.bias' is read elsewhere in the graph")
    # the same module also called as a module
    with gm.graph.inserting_after(first):
        gm.graph.call_module("lin", (first,))
    index = ModuleIndex(gm)
    assert swap_refusal(index, "lin", index.modules["lin"], node=first) == (
        "'lin' is also called as a module in the graph")


def test_index_is_a_snapshot_and_a_swapped_in_module_has_one_name():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    index = ModuleIndex(gm)
    old = index.modules["0"]
    new = nn.Linear(4, 4)
    replace_module(gm, "0", new)
    assert index.modules["0"] is old  # facts are read once; rebuild after an edit
    assert ModuleIndex(gm).modules["0"] is new
    assert index.names(new, "0") == ["0"] and index.names(new) == []
    assert swap_refusal(index, "0", new, single_name=True, single_call=True) is None


def test_enclosing_called_module():
    index = _index()
    assert index.enclosing_called("left.conv") == "left"
    assert index.enclosing_called("right.conv") is None  # only 'left' is called by name
    assert index.enclosing_called("fc") is None


def test_functional_conv_calls_are_found():
    from fxsurgeon.graph import functional_calls

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4, 3, 3))

        def forward(self, x):
            return torch.conv2d(F.conv2d(x, self.w), self.w)

    gm = fx.symbolic_trace(Conv())
    assert len(list(functional_calls(gm, "conv2d"))) == 2
    assert list(functional_calls(gm, "linear")) == []


def test_op_tables_have_one_kind_of_entry_each_and_no_clashing_names():
    from fxsurgeon.graph import ops

    tables = {name: getattr(ops, name) for name in ops.__all__}
    for name, table in tables.items():
        if name.endswith("_MODULES"):
            assert all(isinstance(t, type) and issubclass(t, torch.nn.Module) for t in table), name
        elif name.endswith(("_METHODS", "_ATTRS")):
            assert all(isinstance(t, str) for t in table), name
        elif name.endswith(("_FUNCTIONS", "_OPERATORS")):
            assert all(callable(t) for t in table), name
    # one word, one meaning: activations are not arithmetic (conv_head and concat_fusion once both said
    # "_ELEMENTWISE_METHODS", one for each)
    assert not ops.ACTIVATION_METHODS & ops.ARITHMETIC_METHODS
    assert not ops.ACTIVATION_FUNCTIONS & ops.ARITHMETIC_FUNCTIONS
    assert ops.INPLACE_ARITHMETIC_OPERATORS <= ops.INPLACE_OPERATORS
    assert ops.SIZE_METHODS <= ops.METADATA_METHODS and ops.SIZE_ATTRS <= ops.METADATA_ATTRS
    assert F.relu_ in ops.INPLACE_ACTIVATION_FUNCTIONS and F.relu_ not in ops.ACTIVATION_FUNCTIONS
    assert torch.cat in ops.CONCAT_FUNCTIONS and isinstance(ops.CONCAT_FUNCTIONS, frozenset)


def test_concat_functions_stay_importable_from_the_pass():
    from fxsurgeon.graph import ops
    from fxsurgeon.passes import concat_fusion

    assert concat_fusion.CONCAT_FUNCTIONS is ops.CONCAT_FUNCTIONS
