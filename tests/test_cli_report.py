"""``fxsurgeon report``: formats, saved converted models, the threshold gate and its exit codes, and the
GitHub Actions workflow in recipes/ci/ run as written."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

import fxsurgeon
from fxsurgeon.cli import main
from fxsurgeon.cli.report import parse_fraction
from fxsurgeon.report import load_schema

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "recipes" / "ci" / "fxsurgeon-report.yml"
TINY = "fxsurgeon.models.cifar_resnet:resnet20"  # 0.27M parameters, 32×32 inputs: a fast real network
TINY_ARGS = [TINY, "--input-size", "3", "32", "32"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_fraction():
    assert parse_fraction("30%") == 0.3 and parse_fraction("0.3") == 0.3 and parse_fraction("100%") == 1.0
    assert parse_fraction("-10%") == -0.1  # "may grow by at most 10%"
    for bad in ("30", "abc", "150%", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_fraction(bad)


@pytest.mark.parametrize("argv", [
    ["report", TINY, "--min-mac-savings", "30"],          # ambiguous: 30% or 0.30?
    ["report", TINY, "--max-rel-error", "-1"],
    ["report", TINY, "--format", "html"],
    ["report"],
])
def test_usage_errors_exit_2_from_argparse(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_json_report_validates_and_plots_are_written(tmp_path, capsys):
    out = tmp_path / "report.json"
    code, stdout, _ = _run(capsys, "report", *TINY_ARGS, "--format", "json", "--out", str(out), "--depth", "2",
                           "--plot", str(tmp_path / "stages.png"), "--plot", str(tmp_path / "stages.svg"))
    assert code == 0 and stdout == ""
    data = json.loads(out.read_text())
    jsonschema.validate(data, load_schema())
    assert data["model"] == "CifarResNet" and data["input_shapes"] == [[1, 3, 32, 32]]
    separable = [w for w in data["rewrites"] if w["pass"] == "separable"]
    assert data["passes"]["separable"]["rewrites"] == 18 == len(separable)  # every 3×3 conv but the stem
    assert data["macs_after"] < data["macs_before"] and data["module_depth"] == 2
    assert (tmp_path / "stages.png").read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in (tmp_path / "stages.svg").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "stages.png", "stages.svg"]


def test_gate_exits_0_when_met_and_1_with_a_line_per_miss(tmp_path, capsys):
    # random weights: the error gate runs only when asked for with --allow-random
    code, out, err = _run(capsys, "report", *TINY_ARGS, "--min-mac-savings", "30%",
                          "--min-param-savings", "0.5", "--max-rel-error", "10", "--allow-random")
    assert code == 0 and err == ""
    assert out.startswith("fxsurgeon savings report: CifarResNet") and "MACs" in out  # table: the default
    assert "RANDOM WEIGHTS" in out

    code, out, err = _run(capsys, "report", *TINY_ARGS, "--format", "csv", "--min-mac-savings", "99%",
                          "--min-param-savings", "10%", "--max-rel-error", "1e-3", "--allow-random")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("fxsurgeon: threshold missed: MAC savings ") and "< required 99.0%" in lines[0]
    assert lines[1].startswith("fxsurgeon: threshold missed: relative L2 error ") and "> allowed 0.001" in lines[1]
    assert out.startswith("model,weights,input_shape,") and out.count("\n") == 2  # the report is still written
    assert out.splitlines()[1].startswith("CifarResNet,random,")


@pytest.fixture(scope="module")
def saved_resnet18(tmp_path_factory):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(1, 3, 32, 32)
    converted = fxsurgeon.convert(model, example_inputs=x)
    folder = tmp_path_factory.mktemp("saved")
    torch.save(converted, folder / "converted.pt")
    torch.save(model, folder / "original.pt")
    return folder, fxsurgeon.savings(model, converted, x), converted


@pytest.mark.timm
def test_report_on_a_torch_saved_converted_model(saved_resnet18, capsys):
    folder, expected, converted = saved_resnet18
    # no --original: the architecture is rebuilt from the record for counting, fidelity is the record's
    code, out, _ = _run(capsys, "report", str(folder / "converted.pt"), "--format", "json")
    assert code == 0
    data = json.loads(out)
    jsonschema.validate(data, load_schema())
    assert data["input_shapes"] == [[1, 3, 32, 32]]  # taken from the record's verification
    for key in ("macs_before", "macs_after", "params_before", "params_after"):
        assert data[key] == getattr(expected, key)
    assert data["fidelity_source"] == "conversion record"
    assert data["rel_error"] == converted.meta["fxsurgeon"].verification.rel_error
    assert len(data["rewrites"]) == len(expected.rewrites)

    # with --original (here a torch.save'd original) fidelity is measured
    code, out, _ = _run(capsys, "report", str(folder / "converted.pt"), "--original", str(folder / "original.pt"),
                        "--format", "json", "--max-rel-error", "1e-3")
    data = json.loads(out)
    assert data["fidelity_source"] == "measured" and data["top1_agreement"] is not None
    assert data["rel_error"] == pytest.approx(expected.rel_error, abs=1e-6)
    assert code == (0 if expected.rel_error <= 1e-3 else 1)


@pytest.mark.timm
def test_report_on_a_file_written_by_fxsurgeon_save(saved_resnet18, tmp_path, capsys):
    if not hasattr(fxsurgeon, "save"):
        pytest.skip("fxsurgeon.save is not available in this build")
    _, expected, converted = saved_resnet18
    path = tmp_path / "converted.safetensors"
    fxsurgeon.save(converted, path)
    code, out, _ = _run(capsys, "report", str(path), "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert (data["macs_before"], data["macs_after"]) == (expected.macs_before, expected.macs_after)
    assert data["params_after"] == expected.params_after


def test_recipe_changes_what_is_converted(tmp_path, capsys):
    pytest.importorskip("fxsurgeon.recipes")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("separable:\n  exclude: ['layer3.*']\n")
    code, out, _ = _run(capsys, "report", *TINY_ARGS, "--recipe", str(recipe), "--format", "json")
    assert code == 0
    data = json.loads(out)
    separable = [w["target"] for w in data["rewrites"] if w["pass"] == "separable"]
    assert len(separable) == 12 and not any(t.startswith("layer3.") for t in separable)
    assert sum(s["target"].startswith("layer3.") for s in data["skipped"]) == 6


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "r.yaml"], "--recipe applies to an original MODEL"),
    (["--out", "missing/report.md"], "does not exist"),
    (["--plot", "stages.gif"], "unknown format"),
])
def test_input_errors_exit_2_before_any_work(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(torch.nn.Linear(2, 2), "model.pt")
    code, out, err = _run(capsys, "report", "model.pt", *extra)
    assert code == 2 and message in err and out == ""
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_missing_or_unknown_models_exit_2(tmp_path, capsys):
    code, _, err = _run(capsys, "report", str(tmp_path / "nope.pt"))
    assert code == 2 and "no such file" in err
    code, _, err = _run(capsys, "report", "not_a_timm_model_xyz")
    assert code == 2 and "'not_a_timm_model_xyz'" in err and "timm" in err
    code, _, err = _run(capsys, "report", *TINY_ARGS, "--original", "resnet18")
    assert code == 2 and "--original applies to a saved converted MODEL" in err
    torch.save(torch.nn.Linear(2, 2), tmp_path / "plain.pt")
    code, _, err = _run(capsys, "report", str(tmp_path / "plain.pt"))
    assert code == 2 and "no fxsurgeon record" in err


# ----------------------------------------------------------------------------- the CI workflow


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def test_workflow_parses_and_has_the_gate_steps():
    wf = _workflow()
    assert wf["name"] and wf["jobs"]["report"]["runs-on"] == "ubuntu-latest"
    assert True in wf or "on" in wf  # YAML 1.1 reads the `on:` key as the boolean True; GitHub reads "on"
    steps = wf["jobs"]["report"]["steps"]
    runs = [s["run"] for s in steps if "run" in s]
    assert any("pip install" in r for r in runs)
    assert any("fxsurgeon report" in r and "GITHUB_STEP_SUMMARY" in r for r in runs)
    assert {"MODEL", "MIN_MAC_SAVINGS", "MAX_REL_ERROR"} <= set(wf["env"])


def _run_workflow(tmp_path: Path, **env_overrides: str) -> tuple[list[subprocess.CompletedProcess], str]:
    """Run every ``run:`` step of the job as GitHub does (bash -eo pipefail, the workflow's env, a step
    summary file), stopping at the first failing step; ``uses:`` steps are GitHub actions and are skipped.

    The install step runs as written too: it is a no-op when fxsurgeon is importable, and here the test
    environment's python (first on PATH) already has fxsurgeon installed from this checkout. Running its
    pip branch would need the network and would replace the package under test with a downloaded one.
    """
    wf = _workflow()
    summary = tmp_path / "step_summary.md"
    summary.write_text("")
    env = dict(os.environ)
    env.update({k: str(v) for k, v in wf.get("env", {}).items()})
    env.update(env_overrides)
    env["GITHUB_STEP_SUMMARY"] = str(summary)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    bash = shutil.which("bash")
    results = []
    for step in wf["jobs"]["report"]["steps"]:
        if "run" not in step:
            continue
        step_env = dict(env, **{k: str(v) for k, v in step.get("env", {}).items()})
        proc = subprocess.run([bash, "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                              cwd=tmp_path, env=step_env, capture_output=True, text=True, timeout=600)
        results.append(proc)
        if proc.returncode != 0:
            break
    return results, summary.read_text()


@pytest.mark.slow
@pytest.mark.timm
def test_workflow_run_steps_succeed_locally(tmp_path):
    results, summary = _run_workflow(tmp_path)  # as written: resnet18 at 224×224
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert "already installed" in results[0].stdout
    assert summary.startswith("### fxsurgeon savings report: `resnet18`") and "**Totals:** MACs " in summary
    assert (tmp_path / "fxsurgeon-stages.svg").is_file()


@pytest.mark.slow
@pytest.mark.timm
def test_workflow_fails_the_job_on_a_missed_threshold_and_still_writes_the_summary(tmp_path):
    # a smaller model than the workflow's keeps this second run cheap; the command lines are the same
    results, summary = _run_workflow(tmp_path, MODEL=TINY, INPUT_SIZE="3 32 32", MIN_MAC_SAVINGS="99%")
    assert [r.returncode for r in results] == [0, 1]
    assert "threshold missed: MAC savings" in results[1].stderr
    assert summary.startswith("### fxsurgeon savings report: `CifarResNet`") and "**Totals:** MACs " in summary
