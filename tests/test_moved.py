"""Models saved by fxsurgeon before the package moved into folders (issue 19) still load and compute the same.

``tests/golden/saved_before_layout`` was written by the flat-layout package (see its ``make.py``): a
``torch.save`` pickle naming module classes by their old import paths, and an ``fxsurgeon.save`` file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

import fxsurgeon

HERE = Path(__file__).resolve().parent / "golden" / "saved_before_layout"


def _io():
    data = torch.load(HERE / "io.pt", weights_only=True)
    return data["x"], data["y"]


def test_the_fixtures_really_name_the_old_layout():
    # if they were ever rewritten by the current package (make.py run again), the tests below would prove nothing
    with zipfile.ZipFile(HERE / "model.pt") as z:
        pickled = b"".join(z.read(n) for n in z.namelist() if n.endswith(".pkl"))
    assert b"fxsurgeon.forms_dense" in pickled and b"fxsurgeon.forms.dense" not in pickled
    assert b"fxsurgeon.forms_dense" in (HERE / "model.safetensors").read_bytes()


def test_pickled_model_from_before_the_move_unpickles_and_computes_the_same():
    x, y = _io()
    # our own fixture, written by make.py: a full pickle on purpose (what users do with torch.save(model))
    gm = torch.load(HERE / "model.pt", weights_only=False)
    kinds = {type(m).__name__ for m in gm.modules()}
    assert {"TuckerConv2d", "SpatialSeparableConv2d", "SeparableConv2d"} <= kinds
    # y was computed on the machine that wrote the fixture: another CPU's conv kernels may round differently
    # (CI saw 1.9e-6 on outputs of magnitude ~3), so compare to float32 accumulation error, not bit for bit
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y, rtol=1e-5, atol=1e-5)


def test_saved_file_from_before_the_move_loads_and_computes_the_same():
    x, y = _io()
    gm = fxsurgeon.load(HERE / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y, rtol=1e-5, atol=1e-5)
    rec = fxsurgeon.get_record(gm)
    assert {r.details["form"] for r in rec.rewrites if r.pass_name == "separable"} == {
        "tucker2", "spatial-svd", "pw-dw-pw", "dw-pw"}
