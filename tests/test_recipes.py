"""Recipe files: loading, validation against the pass registry, and every shipped recipe on a tiny model."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.passes import PassInfo, PassResult
from fxsurgeon.passes.options import matches_hint as _matches
from fxsurgeon.recipes import allowed_keys, load_recipe, validate_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def _tiny() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_shipped_recipes_exist():
    assert {p.name for p in RECIPES} >= {"exact.yaml", "mobile.yaml", "fully_conv.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_header_loads_and_converts(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# {path.name} — "), "first line says what the recipe is for"
    header = [ln for ln in lines if ln.startswith("#")]
    assert any(f"--recipe recipes/{path.name}" in ln and "fxsurgeon " in ln for ln in header), "and how to run it"
    recipe = load_recipe(path)
    assert recipe and set(recipe) <= set(allowed_keys())
    model = _tiny()
    x = torch.randn(2, 3, 16, 16)
    converted = fxsurgeon.convert(model, example_inputs=x, **recipe)
    rec = converted.meta["fxsurgeon"]
    assert rec.rewrites and rec.verification is not None
    if path.name == "exact.yaml":
        assert rec.exact and rec.verification.rel_error <= 1e-4
        assert {r.pass_name for r in rec.rewrites} >= {"separable", "conv_head"}
    if path.name.startswith("mobile"):
        assert rec.params_after < rec.params_before
    if path.name == "fully_conv.yaml":
        assert rec.exact and {r.pass_name for r in rec.rewrites} == {"conv_head"}
        y = converted(torch.randn(2, 3, 24, 20))  # any input size now
        assert y.shape == (2, 10)


def test_mobile_budget_meets_its_mac_target():
    recipe = load_recipe(RECIPES[0].parent / "mobile_budget.yaml")
    model = _tiny()
    x = torch.randn(1, 3, 16, 16)
    converted = fxsurgeon.convert(model, example_inputs=x, **recipe)
    report = fxsurgeon.savings(model, converted, x, measure_fidelity=False, torch_cross_check=False)
    assert report.macs_after <= recipe["separable"]["target_macs"] * report.macs_before


def test_empty_recipe_is_convert_defaults(tmp_path):
    assert load_recipe(_write(tmp_path, "# nothing\n")) == {}


def test_unknown_key_names_key_file_line_and_allowed(tmp_path):
    path = _write(tmp_path, "# x\nseparable: true\nseperable:\n  multiplier: 2\n")
    with pytest.raises(SurgeryError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert "'seperable'" in msg and f"{path}:3" in msg and "did you mean 'separable'" in msg
    for key in fxsurgeon.list_passes():
        assert key in msg
    assert "verify" in msg and "tolerance" in msg


def test_unknown_option_lists_the_pass_options_with_defaults(tmp_path):
    path = _write(tmp_path, "separable:\n  multiplier: 2\n  kernel: 3\n")
    with pytest.raises(SurgeryError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert "unknown option 'kernel' for pass 'separable'" in msg and f"{path}:3" in msg
    for opt, default in fxsurgeon.get_pass("separable").options().items():
        assert f"{opt} (default {default!r})" in msg


@pytest.mark.parametrize(("text", "key", "expected"), [
    ("separable:\n  multiplier: [1, 2]\n", "separable.multiplier", "int | str | null"),
    ("separable:\n  include_stem: 'yes'\n", "separable.include_stem", "bool"),
    ("separable:\n  kernel_sizes: [3, 'five']\n", "separable.kernel_sizes", "str | list of int"),
    ("separable:\n  exclude: layer4\n", "separable.exclude", "list of str"),
    ("separable:\n  energy: true\n", "separable.energy", "float | null"),
    ("tolerance: small\n", "'tolerance'", "float | null"),
    ("verify: 1\n", "'verify'", "bool | null"),
    ("separable: 3\n", "pass 'separable'", "true, false or a mapping"),
])
def test_wrong_type_names_key_file_and_expected(tmp_path, text, key, expected):
    path = _write(tmp_path, text)
    with pytest.raises(SurgeryError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert f"wrong type for {key}" in msg and str(path) in msg and expected in msg


def test_right_types_pass(tmp_path):
    path = _write(tmp_path, "separable:\n  multiplier: full\n  kernel_sizes: [3, 5]\n  exclude: ['layer4.*']\n"
                            "  energy: null\n  layers: {a.b: {form: dw-pw, rank: 2}}\n"
                            "tolerance: 1.0e-3\nverify: true\n")
    recipe = load_recipe(path)
    assert recipe["separable"]["kernel_sizes"] == [3, 5] and recipe["tolerance"] == 1e-3
    energy = _write(tmp_path, "separable:\n  energy: 1\n")  # an int where a float is expected is fine
    assert load_recipe(energy) == {"separable": {"energy": 1}}


def test_not_yaml_missing_and_not_a_mapping(tmp_path):
    with pytest.raises(SurgeryError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "separable: [1, 2\n"))
    with pytest.raises(SurgeryError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(SurgeryError, match="must be a mapping"):
        load_recipe(_write(tmp_path, "- separable\n"))


def test_a_newly_registered_pass_is_picked_up(tmp_path, monkeypatch):
    import fxsurgeon.passes.registry as passes

    def toy(gm, *, level: int = 1, names: list[str] | None = None) -> PassResult:
        return PassResult(gm)

    monkeypatch.setitem(passes._PASSES, "toy", PassInfo("toy", toy, 999, False, False))
    assert load_recipe(_write(tmp_path, "toy:\n  level: 3\n  names: [a]\n")) == {"toy": {"level": 3, "names": ["a"]}}
    with pytest.raises(SurgeryError, match=r"wrong type for toy.level .*expected int \(default 1\)"):
        load_recipe(_write(tmp_path, "toy:\n  level: 2.5\n"))
    with pytest.raises(SurgeryError, match="level \\(default 1\\), names \\(default None\\)"):
        load_recipe(_write(tmp_path, "toy:\n  lvl: 2\n"))


def test_validate_recipe_in_python():
    assert validate_recipe({"separable": None, "conv_head": False}) == {"separable": True, "conv_head": False}


def test_matches_annotations():
    from collections.abc import Iterable
    from typing import Any, Literal

    empty = inspect.Parameter.empty
    assert _matches(3, int) and not _matches(True, int) and not _matches(3.5, int)
    assert _matches(3, float) and not _matches(False, float)
    assert _matches([1, 2], Iterable[int]) and not _matches("12", Iterable[int])
    assert _matches("all", str | Iterable[int]) and _matches(None, int | None)
    assert _matches({"a": {"rank": 1}}, dict[str, dict[str, Any]]) and not _matches({"a": 1}, dict[str, dict])
    assert _matches("svd", Literal["svd", "random"]) and not _matches("x", Literal["svd", "random"])
    assert _matches(2, empty, 1) and not _matches("2", empty, 1) and _matches("anything", empty, None)
    assert _matches([3], empty, (3,)) and not _matches(3, empty, (3,))
    assert not _matches(lambda: 0, torch.Tensor)
