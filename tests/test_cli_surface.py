"""The command line as a user meets it: honest reports, the same flags everywhere, exports, checkpoints, errors.

Every test goes through the real entry point, ``fxsurgeon.cli.main([...])`` or a subprocess running the
installed module, on tiny models and the CIFAR ResNet-20 (0.27M parameters, 32×32 inputs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon.cli import build_parser, main
from fxsurgeon.report import load_schema

ROOT = Path(__file__).resolve().parents[1]
R20 = "fxsurgeon.models:resnet20"
R20_ARGS = [R20, "--input-size", "3", "32", "32"]

FACTORIES = textwrap.dedent('''
    import torch.nn as nn

    def boom():
        raise RuntimeError("this factory always fails")

    def normed_head():
        # a norm between pool and Linear: conv_head's fully-convolutional form must refuse, saying why
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.LayerNorm(8), nn.Linear(8, 5))
''')


@pytest.fixture(autouse=True)
def factories(tmp_path, monkeypatch):
    (tmp_path / "surface_models.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _subprocess(*argv: str, env_extra: dict[str, str] | None = None, timeout: float = 300, shell_pipe: str = ""):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "fxsurgeon.cli", *argv]
    if shell_pipe:
        import shlex

        return subprocess.run(["bash", "-c", shlex.join(cmd) + " | " + shell_pipe], env=env, capture_output=True,
                              text=True, timeout=timeout)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _trained_like(seed: int = 0) -> nn.Module:
    """A ResNet-20 with weights far from its initialisation, standing for a trained checkpoint."""
    from fxsurgeon.models import resnet20

    torch.manual_seed(seed)
    model = resnet20().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# ---------------------------------------------------------------------------------------------- reports


def test_report_stamps_random_weights_everywhere(tmp_path, capsys):
    code, out, err = _run(capsys, "report", *R20_ARGS)
    assert code == 0 and "weights random" in out and "RANDOM WEIGHTS" in out
    code, out, _ = _run(capsys, "report", *R20_ARGS, "--format", "md")
    assert code == 0 and "> **RANDOM WEIGHTS" in out and "Weights: random." in out
    path = tmp_path / "r.json"
    code, out, err = _run(capsys, "report", *R20_ARGS, "--out", str(path))  # format from the suffix
    data = json.loads(path.read_text())
    jsonschema.validate(data, load_schema())
    assert code == 0 and data["weights"] == "random" and "RANDOM WEIGHTS" in err


def test_error_gate_on_random_weights_is_a_usage_error_unless_allowed(capsys):
    code, out, err = _run(capsys, "report", *R20_ARGS, "--max-rel-error", "10")
    assert code == 2 and out == "" and "--allow-random" in err and len(err.strip().splitlines()) == 1
    code, out, err = _run(capsys, "report", *R20_ARGS, "--max-rel-error", "10", "--allow-random")
    assert code == 0 and "RANDOM WEIGHTS" in out
    # the savings gates do not depend on the weights: they run without ceremony
    code, _, _ = _run(capsys, "report", *R20_ARGS, "--min-mac-savings", "30%")
    assert code == 0


def test_report_with_trained_weights_is_stamped_checkpoint_and_gates(tmp_path, capsys):
    trained = _trained_like()
    ckpt = tmp_path / "trained.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}, "epoch": 3}, ckpt)
    path = tmp_path / "r.json"
    code, _, err = _run(capsys, "report", *R20_ARGS, "--weights", str(ckpt), "--format", "json", "--out", str(path),
                        "--max-rel-error", "100")
    data = json.loads(path.read_text())
    assert code == 0 and data["weights"] == "checkpoint" and "RANDOM" not in err


def test_report_original_without_weights_refuses_fidelity(tmp_path, capsys):
    trained = _trained_like()
    small = fxsurgeon.convert(trained, example_inputs=torch.randn(1, 3, 32, 32), source=R20)
    saved = tmp_path / "small.safetensors"
    fxsurgeon.save(small, saved)
    code, out, err = _run(capsys, "report", str(saved), "--original", R20)
    assert code == 2 and out == "" and "--weights" in err and "freshly randomised" in err
    ckpt = tmp_path / "trained.pt"
    torch.save(trained.state_dict(), ckpt)
    code, out, err = _run(capsys, "report", str(saved), "--original", R20, "--weights", str(ckpt))
    assert code == 0 and "weights checkpoint" in out and "RANDOM" not in out
    # the fidelity is measured against the trained original on the report's input (seed 0)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rel = fxsurgeon.savings(trained, small, x, torch_cross_check=False).rel_error
    path = tmp_path / "r.json"
    _run(capsys, "report", str(saved), "--original", R20, "--weights", str(ckpt), "--out", str(path))
    assert json.loads(path.read_text())["rel_error"] == pytest.approx(rel, rel=1e-3)


def test_convert_records_random_weights_and_report_of_the_saved_file_says_so(tmp_path, capsys):
    saved = tmp_path / "small.safetensors"
    code, out, err = _run(capsys, "convert", *R20_ARGS, "--out", str(saved))
    assert code == 0 and "weights: RANDOM" in out
    code, out, _ = _run(capsys, "report", str(saved))
    assert code == 0 and "weights random" in out
    code, _, err = _run(capsys, "report", str(saved), "--max-rel-error", "1")
    assert code == 2 and "--allow-random" in err


def test_macs_are_per_sample_whatever_the_batch(tmp_path, capsys):
    figures = []
    for batch in ("1", "3"):
        path = tmp_path / f"b{batch}.json"
        _run(capsys, "report", *R20_ARGS, "--batch-size", batch, "--out", str(path))
        data = json.loads(path.read_text())
        figures.append((data["macs_before"], data["macs_after"], data["batch_size"]))
    assert figures[0][:2] == figures[1][:2] and (figures[0][2], figures[1][2]) == (1, 3)
    assert figures[0][0] == 40_927_872  # ResNet-20 at 32×32, one sample
    _, out, _ = _run(capsys, "report", *R20_ARGS, "--batch-size", "3")
    assert "MACs per sample" in out


def test_verified_only_within_tolerance(capsys):
    code, out, _ = _run(capsys, "convert", *R20_ARGS, "--recipe", "exact", "--no-savings")
    assert code == 0 and "  verified on inputs" in out
    code, out, _ = _run(capsys, "convert", *R20_ARGS, "--recipe", "mobile", "--no-savings")
    assert code == 0 and "  measured on inputs" in out and "verified on" not in out and "approximate" in out


def test_batch_summary_counts_verified_only_within_tolerance():
    from fxsurgeon.batch import summary_markdown

    rows = [{"model": "a", "status": "ok", "verified": True, "rel_error": 1e-7, "tolerance": 1e-4},
            {"model": "b", "status": "ok", "verified": True, "rel_error": 0.78, "tolerance": 1e-4}]
    assert "**Coverage: 1 of 2 attempted models converted and verified (50.0%).**" in summary_markdown(rows)


def test_skip_reasons_are_printed_whole(tmp_path, capsys):
    args = ["surface_models:normed_head", "--input-size", "3", "8", "8", "--set",
            "conv_head.fully_convolutional=true", "--set", "separable=false"]
    model = fxsurgeon.cli.load_model("surface_models:normed_head")
    x = torch.randn(1, 3, 8, 8)
    rec = fxsurgeon.get_record(fxsurgeon.convert(model, example_inputs=x, separable=False,
                                                 conv_head={"fully_convolutional": True}))
    assert rec.skipped and any(":" in s.reason for s in rec.skipped)
    code, out, _ = _run(capsys, "convert", *args, "--no-savings")
    assert code == 0
    for s in rec.skipped:
        assert s.reason in out
    code, out, _ = _run(capsys, "report", *args, "--format", "md")
    for s in rec.skipped:
        assert s.reason in out


# ---------------------------------------------------------------------------------------------- bench


def test_bench_interleaves_and_accepts_saved_converted_models(tmp_path, capsys):
    saved = tmp_path / "small.pt"
    _run(capsys, "convert", *R20_ARGS, "--out", str(saved), "--quiet")
    path = tmp_path / "bench.json"
    code, out, err = _run(capsys, "bench", str(saved), "--device", "cpu", "--warmup", "1", "--iters", "4",
                          "--rounds", "2", "--out", str(path))
    assert code == 0, err
    data = json.loads(path.read_text())
    inter = data["interleaved"]["1"]
    assert inter["rounds"] == 2 and len(inter["speedups"]) == 2 and inter["iters_per_round"] == 2
    assert data["original"]["rows"][0]["iters"] == data["converted"]["rows"][0]["iters"] == 4
    assert data["original"]["input_shapes"] == [[1, 3, 32, 32]]  # the size the conversion was verified at
    assert "speed-up per round" in out


def test_bench_noise_warnings():
    from fxsurgeon.bench import BenchmarkResult, BenchmarkRow, Comparison, noise_warnings

    def result(median, p90):
        row = BenchmarkRow(1, median, p90, median, median, 1.0, None, None, 10, 1)
        return BenchmarkResult("m", "cpu", "cpu", "fp32", False, None, [[1]], 1, 0.1, rows=[row])

    steady = Comparison(result(10, 11), result(5, 5.5), rounds={1: {
        "rounds": 3, "speedups": [2.0, 2.0, 2.1], "speedup_median": 2.0, "speedup_min": 2.0, "speedup_max": 2.1,
        "spread": 0.05, "iters_per_round": 3}})
    assert noise_warnings(steady) == []
    noisy = Comparison(result(10, 30), result(5, 5.5), rounds={1: {
        "rounds": 3, "speedups": [1.0, 2.0, 3.0], "speedup_median": 2.0, "speedup_min": 1.0, "speedup_max": 3.0,
        "spread": 1.0, "iters_per_round": 3}})
    lines = noise_warnings(noisy)
    assert any("original at batch 1: noisy timing" in w and "3.0×" in w for w in lines)
    assert any("unstable across 3 rounds" in w for w in lines)


# ---------------------------------------------------------------------------------------------- CLI


def test_pretrained_offline_is_one_line_within_seconds():
    from fxsurgeon.cli import load_model

    t = time.perf_counter()
    with pytest.raises(fxsurgeon.SurgeryError, match="--pretrained: cannot get the weights of 'resnet18'"):
        load_model("resnet18", pretrained=True)
    assert time.perf_counter() - t < 15  # no minute of hub retries
    proc = _subprocess("convert", "resnet18", "--pretrained")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "--weights FILE" in proc.stderr
    assert "FutureWarning" not in proc.stderr


def test_set_options_are_validated_like_recipes(capsys):
    code, out, _ = _run(capsys, "convert", *R20_ARGS, "--set", "separable.multiplier=2", "--no-savings")
    assert code == 0 and "m=2" in out
    code, out, err = _run(capsys, "convert", *R20_ARGS, "--set", "separable.multipler=2")
    assert code == 2 and out == "" and "--set 'separable.multipler=2'" in err and "did you mean 'multiplier'" in err
    code, _, err = _run(capsys, "convert", *R20_ARGS, "--set", "conv_head=no")
    assert code == 2 and "conv_head" in err and "got str 'no'" in err
    code, _, err = _run(capsys, "convert", *R20_ARGS, "--set", "nonsense")
    assert code == 2 and "PASS.OPTION=VALUE" in err


def test_shipped_recipes_by_name_and_listed(capsys):
    code, out, _ = _run(capsys, "recipes")
    assert code == 0 and {"exact", "mobile", "fully_conv", "mobile_budget"} <= {ln.split()[0] for ln in out.splitlines() if ln.strip() and not ln.startswith("use ")}
    code, out, _ = _run(capsys, "recipes", "mobile")
    assert code == 0 and out.startswith("# mobile.yaml")
    code, out, _ = _run(capsys, "convert", *R20_ARGS, "--recipe", "exact", "--no-savings")
    assert code == 0 and "exact" in out
    code, _, err = _run(capsys, "convert", *R20_ARGS, "--recipe", "mobiel")
    assert code == 2 and "shipped recipes: exact, fully_conv, mobile, mobile_budget" in err


def test_repository_recipes_are_the_package_data():
    from fxsurgeon.recipe_files import list_recipes, resolve_recipe

    repo = {p.stem: p.read_text() for p in (ROOT / "recipes").glob("*.yaml")}
    assert set(repo) == set(list_recipes())
    for name, text in repo.items():
        assert resolve_recipe(name).read_text() == text, name


def test_same_model_flags_on_every_subcommand_that_builds_a_model():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("convert", "report", "bench"):
        helps = {opt: a.help for a in sub.choices[name]._actions for opt in a.option_strings}
        for flag in ("--weights", "--pretrained", "--device", "--input-size", "--recipe", "--set", "--quiet"):
            assert flag in helps, (name, flag)
        assert "state dict or checkpoint" in helps["--weights"]
    # the same words for the same flag
    first = {a.option_strings[0]: a.help for a in sub.choices["convert"]._actions if a.option_strings}
    second = {a.option_strings[0]: a.help for a in sub.choices["bench"]._actions if a.option_strings}
    assert first["--weights"] == second["--weights"] and first["--input-size"] == second["--input-size"]


def test_help_has_no_rst_markup():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for text in [parser.format_help()] + [p.format_help() for p in sub.choices.values()]:
        assert "``" not in text and ":func:" not in text and ":class:" not in text, text[:200]


def test_out_onnx_runs_in_onnxruntime_and_matches(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "small.onnx"
    code, out, _ = _run(capsys, "convert", *R20_ARGS, "--out", str(path), "--quiet", "--no-savings")
    assert code == 0 and "checked in onnxruntime" in out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 32, 32)
    torch.manual_seed(0)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (1, 10)
    # the same conversion in Python gives the same outputs
    torch.manual_seed(0)
    model = fxsurgeon.cli.load_model(R20)
    small = fxsurgeon.convert(model, example_inputs=torch.randn(1, 3, 32, 32,
                                                                generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(torch.from_numpy(got), small(x).detach(), rtol=1e-4, atol=1e-4)


def test_out_pt2_is_an_exported_program_and_unknown_suffixes_are_refused(tmp_path, capsys):
    path = tmp_path / "small.pt2"
    code, _, err = _run(capsys, "convert", *R20_ARGS, "--out", str(path), "--quiet", "--no-savings")
    assert code == 0, err
    program = torch.export.load(str(path))
    assert program.module()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    code, out, err = _run(capsys, "convert", *R20_ARGS, "--out", str(tmp_path / "small.bin"))
    assert code == 2 and out == "" and "unknown model file type '.bin'" in err
    assert not (tmp_path / "small.bin").exists()
    code, _, err = _run(capsys, "convert", *R20_ARGS, "--out", str(tmp_path / "small.bin"), "--out-format", "pt",
                        "--quiet", "--no-savings")
    assert code == 0 and isinstance(torch.load(tmp_path / "small.bin", weights_only=False), nn.Module)


def test_report_out_format_by_suffix_or_flag(tmp_path, capsys):
    code, _, _ = _run(capsys, "report", *R20_ARGS, "--out", str(tmp_path / "r.md"))
    assert code == 0 and (tmp_path / "r.md").read_text().startswith("### fxsurgeon savings report")
    code, _, err = _run(capsys, "report", *R20_ARGS, "--out", str(tmp_path / "r.xyz"))
    assert code == 2 and "--format" in err
    code, _, _ = _run(capsys, "report", *R20_ARGS, "--out", str(tmp_path / "r.xyz"), "--format", "csv")
    assert code == 0 and (tmp_path / "r.xyz").read_text().startswith("model,weights,")


def test_dataparallel_and_wrapped_checkpoints_load_without_editing(tmp_path, capsys):
    trained = _trained_like()
    sd = trained.state_dict()
    wrapped = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_prec1": 91.0}, wrapped)
    model = fxsurgeon.cli.load_model(R20, weights=str(wrapped))
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v)
    code, out, _ = _run(capsys, "convert", *R20_ARGS, "--weights", str(wrapped), "--no-savings")
    assert code == 0 and "RANDOM" not in out
    broken = tmp_path / "broken.pth"
    torch.save({"state_dict": {"module.nope": torch.zeros(1)}}, broken)
    code, _, err = _run(capsys, "convert", *R20_ARGS, "--weights", str(broken))
    assert code == 2 and "missing" in err and "unexpected (e.g. nope)" in err


def test_shared_resnet20_checkpoint_loads_as_shipped(capsys):
    from fxsurgeon.models import default_data_dir

    ckpt = default_data_dir() / "resnet20-12fca82f.th"
    if not ckpt.exists():
        pytest.skip(f"shared data not found at {ckpt.parent}")
    code, out, err = _run(capsys, "report", *R20_ARGS, "--weights", str(ckpt), "--recipe", "exact",
                          "--max-rel-error", "1e-4")
    assert code == 0, err
    assert "weights checkpoint" in out


def test_load_original_state_dict_maps_heads_and_recomputes_decompositions(tmp_path):
    from fxsurgeon.models import resnet20

    trained = _trained_like()
    x = torch.randn(2, 3, 32, 32)
    shape_x = torch.randn(1, 3, 32, 32)
    # an exact head conversion: fc's (out, in) weight becomes the 1×1 conv's (out, in, 1, 1)
    head = fxsurgeon.convert(resnet20().eval(), example_inputs=shape_x, separable=False, conv_head=True)
    done = fxsurgeon.load_original_state_dict(head, {f"module.{k}": v for k, v in trained.state_dict().items()})
    assert done["reshaped"] == ["linear.weight"] and not done["recomputed"]
    torch.testing.assert_close(head(x), trained(x))
    # separable layers: recomputed from the original weights by replaying the recorded decomposition
    small = fxsurgeon.convert(resnet20().eval(), example_inputs=shape_x, source=resnet20,
                              separable={"multiplier": 2})
    done = fxsurgeon.load_original_state_dict(small, trained.state_dict())
    assert done["recomputed"] and all(".depthwise." in k or ".pointwise." in k for k in done["recomputed"])
    reference = fxsurgeon.convert(trained, example_inputs=shape_x, separable={"multiplier": 2})
    torch.testing.assert_close(small(x), reference(x))
    # without a source to rebuild the original from, it refuses and names the layers
    blind = fxsurgeon.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).eval(),
                              example_inputs=torch.randn(1, 3, 8, 8), separable={"include_stem": True})
    with pytest.raises(fxsurgeon.SurgeryError, match="no source to rebuild the original"):
        fxsurgeon.load_original_state_dict(blind, nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).state_dict())


def test_weights_of_the_original_onto_a_saved_converted_model(tmp_path, capsys):
    trained = _trained_like()
    ckpt = tmp_path / "trained.pth"
    torch.save(trained.state_dict(), ckpt)
    saved = tmp_path / "small.safetensors"
    _run(capsys, "convert", *R20_ARGS, "--out", str(saved), "--quiet", "--no-savings")
    model = fxsurgeon.cli.load_model(str(saved), weights=str(ckpt))
    reference = fxsurgeon.convert(trained, example_inputs=torch.randn(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x))


def test_version_quiet_verbose_and_json(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith(f"fxsurgeon {fxsurgeon.__version__}")
    code, out, err = _run(capsys, "convert", *R20_ARGS, "--quiet")
    assert code == 0 and len(out.strip().splitlines()) == 1 and out.startswith("CifarResNet: 19 rewrites")
    assert err == ""
    code, out, _ = _run(capsys, "convert", *R20_ARGS, "--verbose", "--no-savings")
    assert code == 0 and "… " not in out
    code, out, err = _run(capsys, "convert", *R20_ARGS, "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["weights"] == "random" and len(data["record"]["rewrites"]) == 19
    assert data["savings"]["macs_per_sample_before"] == 40_927_872 and "RANDOM" in err


def test_usage_errors_are_one_line(capsys):
    for argv, message in (
        (["convert", R20, "--input-size", "3", "-5", "32"], "'-5' must be ≥ 1"),
        (["convert", R20, "--batch-size", "x"], "'x' is not an int"),
        (["report", R20, "--input-size", "3", "x", "32"], "'x' is not an int"),
        (["bench", R20, "--input-size", "0", "32", "32"], "'0' must be ≥ 1"),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_factory_errors_are_one_line(capsys):
    code, out, err = _run(capsys, "convert", "surface_models:boom")
    assert code == 2 and out == "" and "RuntimeError: this factory always fails" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "report", "torch.nn:Conv2d")
    assert code == 2 and "missing 3 required positional arguments" in err and len(err.strip().splitlines()) == 1


def test_no_negative_budget_in_messages(capsys):
    code, _, err = _run(capsys, "convert", *R20_ARGS, "--set", "separable.target_macs=0.01")
    assert code == 2 and "budget cannot be met" in err
    assert "budget of -" not in err


def test_broken_pipe_is_quiet():
    proc = _subprocess("recipes", "exact", "--verbose", shell_pipe="head -c 1")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    proc = _subprocess("convert", *R20_ARGS, "--verbose", "--no-savings", shell_pipe="head -n 1")
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert "FutureWarning" not in proc.stderr


def test_progress_only_for_a_terminal():
    import argparse

    from fxsurgeon.cli.common import show_progress

    assert show_progress(argparse.Namespace(quiet=True)) is False
    assert show_progress(argparse.Namespace(quiet=False)) is sys.stderr.isatty()


def test_distill_without_data_names_the_flag(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "distill.py"), "--data", str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "--data" in proc.stderr and "resnet20-12fca82f.th" in proc.stderr


def test_activity_line_shows_elapsed_time_only_when_enabled(monkeypatch):
    import io

    from fxsurgeon.cli.common import activity

    for enabled in (False, True):
        buf = io.StringIO()
        monkeypatch.setattr(sys, "stderr", buf)
        with activity("converting m", enabled=enabled, interval=0.05):
            time.sleep(0.2)
        assert ("converting m: 00:00" in buf.getvalue()) is enabled
