import pytest
from torch import nn

from fxsurgeon.modes import eval_modes, modes, restore_modes


def _mixed():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Sequential(nn.Dropout(), nn.ReLU()))
    net[1].eval()  # a frozen BatchNorm inside a model in train mode
    return net


def test_eval_modes_puts_every_flag_back_even_after_an_error():
    a, b = _mixed(), _mixed().eval()
    before = (modes(a), modes(b))
    with pytest.raises(RuntimeError), eval_modes(a, b):
        assert not any(m.training for m in (*a.modules(), *b.modules()))
        raise RuntimeError("boom")
    assert (modes(a), modes(b)) == before
    assert a.training and not a[1].training


def test_restore_modes_gives_new_submodules_their_parents_flag():
    net = _mixed()
    saved = modes(net)
    net.eval()
    net[2].append(nn.Dropout())  # added while in eval: takes its saved parent's flag
    restore_modes(net, saved, default=False)
    assert modes(net)["2.2"] is True and net[1].training is False
