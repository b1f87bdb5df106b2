"""Golden record of what every pass matched, rewrote and skipped (with the skip reason's exact text), over the
timm CI slice and a fixed set of fuzz nets.

The three passes share one graph index (``fxsurgeon.graph.index``); a change in how a model's graph is read
must not change which layers are rewritten or the words a user sees for the ones left alone. The golden file
``tests/golden/skip_reasons.json`` was written before the index was shared (issue 19) and is compared entry by
entry. Regenerate it deliberately, after reading the diff, with::

    FXSURGEON_UPDATE_GOLDEN=1 OMP_NUM_THREADS=1 python -m pytest tests/test_passes_golden.py
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from fxsurgeon import SurgeryError
from fxsurgeon.convert import convert
from fxsurgeon.record import get_record
from fxsurgeon.testing.fuzz import FuzzNet, RandomDraw, approximate_options, exact_options, generate_spec

GOLDEN = Path(__file__).resolve().parent / "golden" / "skip_reasons.json"
UPDATE = os.environ.get("FXSURGEON_UPDATE_GOLDEN") == "1"
TIMM_SLICE = ("test_resnet", "test_efficientnet", "test_convnext", "test_byobnet", "test_vit", "regnetx_002",
              "dla46_c")
FUZZ_SEEDS = range(40)


def _entries(gm) -> list[list[str]]:
    rec = get_record(gm)
    rows = [["rewrite", r.pass_name, r.target, r.after] for r in rec.rewrites]
    rows += [["skip", s.pass_name, s.target, s.reason] for s in rec.skipped]
    return sorted(rows)


def _timm_case(name: str, recipe: str) -> list[list[str]]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 32, 32)
    options = exact_options() if recipe == "exact" else {"concat_fusion": True}
    return _entries(convert(model, example_inputs=x, **options))


def _fuzz_case(seed: int) -> dict[str, list]:
    d = RandomDraw(random.Random(seed))
    spec = generate_spec(d)
    options = approximate_options(d)
    out: dict[str, list] = {}
    for kind, opts in (("exact", exact_options()), ("approximate", options)):
        torch.manual_seed(seed)
        model = FuzzNet(spec).eval()
        x = torch.randn(2, *spec["input"])
        try:
            out[kind] = _entries(convert(model, example_inputs=x, **opts))
        except SurgeryError as exc:
            out[kind] = [["refused", str(exc)]]
    return out


def _current() -> dict[str, object]:
    torch.set_num_threads(1)
    got: dict[str, object] = {}
    for name in TIMM_SLICE:
        for recipe in ("exact", "default"):
            got[f"timm:{name}:{recipe}"] = _timm_case(name, recipe)
    for seed in FUZZ_SEEDS:
        for kind, rows in _fuzz_case(seed).items():
            got[f"fuzz:{seed}:{kind}"] = rows
    return got


@pytest.fixture(scope="module")
def current():
    before = torch.get_num_threads()
    try:
        got = _current()
    finally:
        torch.set_num_threads(before)
    if UPDATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    return got


def _golden() -> dict[str, object]:
    return json.loads(GOLDEN.read_text())


@pytest.mark.timm
def test_rewrites_and_skip_reasons_unchanged(current):
    golden = _golden()
    assert sorted(current) == sorted(golden)
    changed = {k: {"golden": golden[k], "now": current[k]} for k in golden if golden[k] != current[k]}
    assert not changed, json.dumps(changed, indent=1)[:4000]


@pytest.mark.timm
def test_golden_covers_every_pass_and_some_skips():
    golden = _golden()
    kinds = {(row[0], row[1]) for rows in golden.values() for row in rows if row[0] != "refused"}
    for pass_name in ("separable", "conv_head", "concat_fusion"):
        assert ("rewrite", pass_name) in kinds and ("skip", pass_name) in kinds, pass_name
