"""The `fxsurgeon` command: convert and batch end to end on tiny models, exit codes, errors before work."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from fxsurgeon.cli import build_parser, load_model, main, parse_bytes, parse_count

TINY = textwrap.dedent('''
    import time
    import torch.nn as nn

    def tiny():
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
        m.pretrained_cfg = {"input_size": (3, 16, 16)}
        return m

    def broken():
        raise RuntimeError("this factory always fails")

    def sleepy():
        time.sleep(3600)

    def with_bn():
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        m.pretrained_cfg = {"input_size": (3, 8, 8)}
        return m

    def zero_bn():
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        nn.init.zeros_(m[1].weight)  # like timm's zero_init_last: the verification cannot see the conv
        m.pretrained_cfg = {"input_size": (3, 8, 8)}
        return m
''')


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    d = tmp_path / "mods"
    d.mkdir()
    (d / "clitiny.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(d))
    return "clitiny:tiny"


@pytest.fixture
def exact_recipe(tmp_path):
    path = tmp_path / "exact.yaml"
    path.write_text("# test recipe\nseparable:\n  multiplier: full\n")
    return path


def test_default_command_is_resnet18():
    args = build_parser().parse_args(["convert"])
    assert args.model == "resnet18" and args.recipe is None and args.out is None


def test_convert_end_to_end(tiny, exact_recipe, tmp_path, capsys):
    out, report = tmp_path / "converted.pt", tmp_path / "report.md"
    rc = main(["convert", tiny, "--recipe", str(exact_recipe), "--out", str(out), "--report", str(report)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "separable: 1 rewritten (1 exact)" in printed and f"saved to {out}" in printed
    assert "savings: parameters" in printed and "MACs" in printed and "note:" not in printed
    converted = torch.load(out, weights_only=False)
    torch.manual_seed(0)  # the command's default --seed: the same random weights
    original = load_model(tiny)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-5)
    md = report.read_text()
    assert "MAC" in md
    # the saved model is a MODEL too: converting it again finds no standard 3x3 conv left to rewrite
    assert main(["convert", str(out), "--recipe", str(exact_recipe)]) == 0
    assert "separable: 0 rewritten" in capsys.readouterr().out


def test_convert_notes_branches_silenced_by_fresh_weights(tiny, capsys):
    assert main(["convert", "clitiny:zero_bn", "--no-savings"]) == 0
    printed = capsys.readouterr().out
    assert "note: 1 scaling parameters of this model are zero (e.g. 1.weight)" in printed
    assert "savings:" not in printed


def test_convert_synthetic_calibration(tiny, capsys):
    assert main(["convert", "clitiny:with_bn", "--synthetic-calibration", "--no-savings"]) == 0
    printed = capsys.readouterr().out
    from fxsurgeon.synthetic import DEFAULT_COUNT

    assert f"calibration: {DEFAULT_COUNT} synthetic images" in printed and "output error on them" in printed


def test_convert_bad_recipe_exit_2_names_key_and_file(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# bad\nseparable:\n  multipler: 2\n")
    assert main(["convert", tiny, "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "'multipler'" in err and f"{bad}:3" in err and "multiplier" in err and "did you mean" in err


def test_convert_refuses_unwritable_out_before_work(tiny, tmp_path, capsys, monkeypatch):
    import fxsurgeon.cli.app as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("built the model before checking --out"))
    assert main(["convert", tiny, "--out", str(tmp_path / "no" / "such" / "dir" / "m.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_load_model_errors(tmp_path):
    from fxsurgeon import SurgeryError

    with pytest.raises(SurgeryError, match="did you mean resnet18"):
        load_model("resnet18x")
    state = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(1)}, state)
    with pytest.raises(SurgeryError, match="state dict, not a model"):
        load_model(str(state))
    with pytest.raises(SurgeryError, match="cannot import"):
        load_model("no_such_pkg.mod:factory")


def test_sizes_parse():
    assert parse_count("200M") == 200_000_000 and parse_count("1.5B") == 1_500_000_000
    assert parse_bytes("8G") == 8 * 2**30
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["batch", "x", "--max-params", "lots"])
    assert exc.value.code == 2


def test_batch_three_models_failure_and_timeout(tiny, exact_recipe, tmp_path, capsys):
    out, summary = tmp_path / "results.jsonl", tmp_path / "summary.md"
    rc = main(["batch", tiny, "clitiny:broken", "clitiny:sleepy", "--recipe", str(exact_recipe),
               "--timeout", "3", "--workers", "3", "--out", str(out), "--summary", str(summary), "--no-progress"])
    assert rc == 1  # a model failed
    rows = {r["model"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows[tiny]["status"] == "ok" and rows[tiny]["verified"]
    assert rows[tiny]["rel_error"] <= 1e-4 and rows[tiny]["passes"]["separable"]["rewrites"] == 1
    assert rows[tiny]["macs_after"] > rows[tiny]["macs_before"]  # the exact form costs more
    assert rows["clitiny:broken"]["status"] == "error"
    assert "this factory always fails" in rows["clitiny:broken"]["error"]
    assert rows["clitiny:sleepy"]["status"] == "timeout"
    text = summary.read_text()
    assert "**Coverage: 1 of 3 attempted models converted and verified (33.3%).**" in text
    assert "this factory always fails" in text and "timeout during build" in text
    assert "3 run (0 already in" in capsys.readouterr().out
    # rerun: nothing left to do, the failures stay failures
    assert main(["batch", tiny, "clitiny:broken", "clitiny:sleepy", "--recipe", str(exact_recipe),
                 "--timeout", "3", "--out", str(out), "--no-progress"]) == 1
    assert "0 run (3 already in" in capsys.readouterr().out  # and exit 1: the recorded failures stand
    assert len(out.read_text().splitlines()) == 3


def test_batch_errors_before_work(tmp_path, capsys, exact_recipe):
    assert main(["batch", "resnet18", "--out", str(tmp_path / "missing" / "r.jsonl"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["batch", "no_such_model_*", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "matches no timm model" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("separable: [1, 2]\n")
    assert main(["batch", "resnet18", "--recipe", str(bad), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "wrong type for pass 'separable'" in capsys.readouterr().err


def test_batch_list(capsys):
    assert main(["batch", "resnet1*", "--exclude", "*d", "--list"]) == 0
    assert capsys.readouterr().out.split()[:3] == ["resnet10t", "resnet14t", "resnet18"]
