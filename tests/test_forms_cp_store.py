"""The disk cache of CP menu errors: the same floats as a new fit, keyed on everything a fit depends on, and a
file that does not validate is refitted, never trusted."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from fxsurgeon.forms import cp, get_form
from fxsurgeon.forms.cp_store import ALGORITHM, CPErrorStore, active_store, cp_error_store


@pytest.fixture
def conv():
    torch.manual_seed(3)
    return nn.Conv2d(12, 16, 3, padding=1, bias=False)


def no_fits(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a CP fit ran although the store held it")

    monkeypatch.setattr(cp, "cp_factors", refuse)


def test_errors_from_the_store_are_the_floats_a_new_fit_gives(tmp_path, conv, monkeypatch):
    form = get_form("pw-dw-pw")
    ranks = [1, 5, 17]
    cp.clear_cache()
    plain = form.error_at(conv, ranks)
    choices = form.choices(conv)
    cp.clear_cache()
    store = CPErrorStore(tmp_path)
    with cp_error_store(store) as s:
        assert s is store and active_store() is store
        assert form.error_at(conv, ranks) == plain
    assert active_store() is None
    assert store.fits == 3 and store.hits == 0
    store.flush()
    cp.clear_cache()
    no_fits(monkeypatch)
    warm = CPErrorStore(tmp_path)
    with cp_error_store(warm):
        assert form.error_at(conv, ranks) == plain  # bit-identical: a warm conversion decides as a cold one
        with pytest.raises(AssertionError, match="a CP fit ran"):
            form.choices(conv)  # its grid has ranks the store has not seen
    assert warm.hits == 3 + 1 and warm.summary()["cache_file"] == str(warm.path)  # rank 1 is on the grid too
    assert [c.rank for c in choices] and all(c.error >= 0 for c in choices)


def test_choices_read_error_and_relative_error_from_the_store(tmp_path, conv, monkeypatch):
    form = get_form("pw-dw-pw")
    cp.clear_cache()
    plain = form.choices(conv)
    store = CPErrorStore(tmp_path)
    with cp_error_store(store):
        form.choices(conv)
    store.flush()
    cp.clear_cache()
    no_fits(monkeypatch)
    with cp_error_store(CPErrorStore(tmp_path)):
        warm = form.choices(conv)
    assert [(c.rank, c.error, c.extra["relative_error"]) for c in warm] == \
        [(c.rank, c.error, c.extra["relative_error"]) for c in plain]


def test_the_key_names_weight_rank_sweeps_tolerance_ridge_and_threads(tmp_path):
    store = CPErrorStore(tmp_path)
    w = torch.randn(4, 3, 3, 3)
    wid = store.weight_id(w)
    store.put(wid, 2, 30, 1e-7, 1e-5, 1, 0.5, 2.0)
    assert store.get(wid, 2, 30, 1e-7, 1e-5, 1) == (0.5, 2.0)
    assert store.get(wid, 3, 30, 1e-7, 1e-5, 1) is None
    assert store.get(wid, 2, 29, 1e-7, 1e-5, 1) is None
    assert store.get(wid, 2, 30, 1e-6, 1e-5, 1) is None
    assert store.get(wid, 2, 30, 1e-7, 0.0, 1) is None  # a fit with another ridge is another fit
    assert store.get(wid, 2, 30, 1e-7, 1e-5, 2) is None
    w2 = w.clone()
    w2[0, 0, 0, 0] += 1e-6
    assert store.weight_id(w2) != wid
    assert store.weight_id(w.double()) != wid  # dtype is part of it
    assert store.weight_id(w.clone()) == wid
    assert store.weight_id(w.bfloat16()) != store.weight_id(w.bfloat16().float())


def test_context_names_torch_cpu_and_algorithm(tmp_path, monkeypatch):
    store = CPErrorStore(tmp_path)
    assert store.context["torch"] == torch.__version__ and store.context["algorithm"] == ALGORITHM
    monkeypatch.setattr("fxsurgeon.forms.cp_store.ALGORITHM", "changed/2")
    assert CPErrorStore(tmp_path).path != store.path  # old errors are not read by new code


@pytest.mark.parametrize("entry", [[2.0, 1.0], [-1.0, 1.0], [0.1], [0.1, 1.0, 2.0], "0.1", [True, 1.0],
                                   [float("nan"), 1.0], {"e": 0.1}])
def test_a_tampered_file_is_refitted(tmp_path, conv, entry):
    form = get_form("pw-dw-pw")
    cp.clear_cache()
    truth = form.error_at(conv, [4])
    store = CPErrorStore(tmp_path)
    with cp_error_store(store):
        form.error_at(conv, [4])
    store.flush()
    data = json.loads(store.path.read_text())
    (key,) = data["entries"]
    data["entries"][key] = entry
    store.path.write_text(json.dumps(data))  # NaN is written as JSON's NaN token, which Python reads
    cp.clear_cache()
    again = CPErrorStore(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cp_error_store(again):
            assert form.error_at(conv, [4]) == truth
    assert again.fits == 1 and again.hits == 0
    assert any("CP error cache" in str(w.message) and "ignored" in str(w.message) for w in caught)
    again.flush()
    rewritten = json.loads(store.path.read_text())
    assert rewritten["entries"][key][0] == truth[0]  # the whole file was rewritten from the new fit


def test_cp_error_curve_gives_the_menu_errors_and_reads_the_store(tmp_path, conv, monkeypatch):
    ranks = [2, 9, 300]  # 300 is above the full CP rank: capped, like the form's own menu
    menu = get_form("pw-dw-pw").error_at(conv, ranks)
    assert cp.cp_error_curve(conv.weight, ranks) == menu
    store = CPErrorStore(tmp_path)
    with cp_error_store(store):
        cp.cp_error_curve(conv.weight, ranks)
    assert store.fits + store.hits == 3
    assert cp.cp_error_curve(conv.weight, [9], iterations=0)[0] >= menu[1]  # the start alone: never better
