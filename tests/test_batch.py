"""Batch conversion: isolation (crash, hang, SIGKILL), atomic resumable results, summary, Dask."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fxsurgeon import SurgeryError
from fxsurgeon.batch import (
    RESULT_KEYS,
    Job,
    ResultsFile,
    check_writable,
    convert_one,
    error_cause,
    expand_models,
    latest_results,
    run_batch,
    run_isolated,
    summary_markdown,
)

# Models for the tests, imported by name (`batchhooks:ok`) in the model processes. `slow<i>` take a second
# each so a test can kill the batch half way.
HOOKS = textwrap.dedent('''
    import os, signal, time
    import torch.nn as nn

    def ok():
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
        m.pretrained_cfg = {"input_size": (3, 16, 16)}
        return m

    def boom():
        raise ValueError("forced failure for the test")

    def hang():
        time.sleep(3600)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def spawner():
        """Starts a process of its own that would outlive the model (a data loader worker, say)."""
        import subprocess

        child = subprocess.Popen(["sleep", "300"])
        with open(os.path.join(os.path.dirname(__file__), "spawned.pid"), "w") as f:
            f.write(str(child.pid))
        return ok()

    def hog():
        import torch

        return torch.ones(16 * 2**30, dtype=torch.uint8)  # 16 GiB

    def _slow():
        time.sleep(1.0)
        return ok()

    slow1 = slow2 = slow3 = slow4 = slow5 = slow6 = _slow

    class ZeroBranch(nn.Module):
        """A residual block as timm initialises it: the branch's last norm has zero weight."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            nn.init.zeros_(self.bn.weight)
            self.pretrained_cfg = {"input_size": (8, 8, 8)}

        def forward(self, x):
            return x + self.bn(self.conv(x))

    def zero_branch():
        return ZeroBranch()

    class Chaotic(nn.Module):
        """Amplifies rounding: no output comparison can tell an exact rewrite from a wrong one."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.pretrained_cfg = {"input_size": (8, 8, 8)}

        def forward(self, x):
            return (self.conv(x) * 1e12).sin()

    def chaotic():
        return Chaotic()

    class Touchy(Chaotic):
        """Amplifies rounding 1e5-fold: float32 comparisons fail, float64 ones still tell."""

        def forward(self, x):
            return (self.conv(x) * 1e5).sin()

    def touchy():
        return Touchy()
''')

EXACT = {"separable": {"multiplier": "full"}}


@pytest.fixture
def hooks(tmp_path, monkeypatch):
    """Make `batchhooks:<factory>` importable here and in every model process (which gets our sys.path)."""
    d = tmp_path / "hooks"
    d.mkdir()
    (d / "batchhooks.py").write_text(HOOKS)
    monkeypatch.syspath_prepend(str(d))
    return d


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------- job and isolation


def test_convert_one_fields_and_numbers(hooks):
    res = convert_one(Job("batchhooks:ok", recipe=EXACT))
    assert set(RESULT_KEYS) <= set(res)
    assert res["status"] == "ok" and res["verified"] and res["exact_expected"]
    assert res["rel_error"] <= 1e-4
    assert res["input_shape"] == [1, 3, 16, 16]  # the model's own size, smaller than image_size=64
    assert res["passes"]["separable"]["rewrites"] == 1  # the 8→16 conv; the RGB stem is skipped
    # 3x3 8→16 on 16×16: 8·16·9·256 = 294,912 MACs; exact form m=9: dw 8·9·9·256 + pw 72·16·256
    assert res["macs_before"] - res["macs_after"] == 294_912 - (8 * 9 * 9 * 256 + 72 * 16 * 256)


def test_perturbed_init_lets_verification_see_silenced_branches(hooks):
    approx = {"separable": {"multiplier": 1}}
    blind = convert_one(Job("batchhooks:zero_branch", recipe=approx, perturb_init=False, count_macs=False))
    assert blind["rel_error"] == 0.0 and blind["passes"]["separable"]["rewrites"] == 1
    seen = convert_one(Job("batchhooks:zero_branch", recipe=approx, count_macs=False))
    assert seen["perturbed"] == 1 and seen["rel_error"] > 1e-3  # the zero bn weight; its zero bias adds
    exact = convert_one(Job("batchhooks:zero_branch", recipe=EXACT, count_macs=False))
    assert exact["rel_error"] <= 1e-4


def test_model_chaotic_in_float32_is_verified_in_float64(hooks):
    res = convert_one(Job("batchhooks:touchy", recipe=EXACT, count_macs=False))
    assert res["status"] == "ok" and res["verified"] and res["verified_dtype"] == "float64"
    assert res["rel_error"] <= 1e-9
    assert convert_one(Job("batchhooks:ok", recipe=EXACT, count_macs=False))["verified_dtype"] is None


def test_chaotic_model_is_reported_unverifiable(hooks):
    with pytest.raises(SurgeryError, match=r"unverifiable: .* numerically chaotic .* changes its output by"):
        convert_one(Job("batchhooks:chaotic", recipe=EXACT, count_macs=False))
    res = run_isolated(Job("batchhooks:chaotic", recipe=EXACT, count_macs=False))
    assert res["status"] == "error" and res["cause"].startswith("unverifiable: the random-init model is")


def test_silencing_params_found():
    from torch import nn

    from fxsurgeon.batch import silencing_params

    block = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3))
    assert silencing_params(block) == []
    nn.init.zeros_(block[1].weight)
    assert silencing_params(block) == ["1.weight"]


def test_max_params_skips_without_building(hooks):
    res = convert_one(Job("batchhooks:ok", max_params=100))
    assert res["status"] == "skipped"
    assert res["params_before"] == sum(p.numel() for p in __import__("batchhooks").ok().parameters())
    assert "max_params 100" in res["error"]


def test_isolated_failures_are_recorded(hooks):
    boom = run_isolated(Job("batchhooks:boom"))
    assert boom["status"] == "error" and "forced failure for the test" in boom["error"]
    assert boom["phase"] == "build" and "ValueError" in boom["cause"]
    died = run_isolated(Job("batchhooks:die"))
    assert died["status"] == "error" and "SIGKILL" in died["error"] and died["phase"] == "build"
    t = time.monotonic()
    hung = run_isolated(Job("batchhooks:hang", timeout=2))
    assert hung["status"] == "timeout" and "during build" in hung["error"]
    assert time.monotonic() - t < 30
    hog = run_isolated(Job("batchhooks:hog", max_memory=12 * 2**30))
    assert hog["status"] == "error" and hog["error"].startswith("out of memory") and hog["cause"] == "out of memory"
    ok = run_isolated(Job("batchhooks:ok", recipe=EXACT))  # the fork server survives all of that
    assert ok["status"] == "ok"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("launcher", ["fork", "subprocess"])
def test_processes_a_model_started_die_with_it(hooks, launcher):
    pidfile = hooks / "spawned.pid"
    res = run_isolated(Job("batchhooks:spawner", recipe=EXACT), launcher=launcher)
    assert res["status"] == "ok", res
    pid = int(pidfile.read_text())
    try:
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "a process the model started outlived it"
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def test_dead_fork_server_is_detected_at_once(hooks):
    import threading

    from fxsurgeon.batch import isolation as batch

    assert run_isolated(Job("batchhooks:ok", recipe=EXACT), launcher="fork")["status"] == "ok"
    server = batch._fork_server().proc

    def kill_server():
        time.sleep(2)  # the hanging model is running by then
        server.kill()

    threading.Thread(target=kill_server, daemon=True).start()
    t = time.monotonic()
    res = run_isolated(Job("batchhooks:hang", timeout=90), launcher="fork")
    assert time.monotonic() - t < 20, "waited for the timeout instead of noticing the dead server"
    assert res["status"] == "error" and "fork server died" in res["error"], res
    assert run_isolated(Job("batchhooks:ok", recipe=EXACT), launcher="fork")["status"] == "ok"  # a new server


def test_work_directory_of_a_sigkilled_run_is_removed_by_the_next(hooks, tmp_path, monkeypatch):
    import tempfile

    from fxsurgeon.batch import isolation as batch

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp),
           "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "fxsurgeon.cli", "batch", "batchhooks:hang", "--out",
                             str(tmp_path / "r.jsonl"), "--no-progress", "--no-macs", "--timeout", "300"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(tmp.glob("fxsurgeon-batch-*/phase")):
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(tmp.glob("fxsurgeon-batch-*"))
    assert len(left) == 1  # what the kill left behind
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(batch, "_SWEPT", False, raising=False)
    keep = tmp / "fxsurgeon-batch-unrelated"  # not named after a run: not ours to remove
    keep.mkdir()
    res = run_batch(["batchhooks:ok"], out=tmp_path / "r2.jsonl", recipe=EXACT, progress=False)
    assert res.ran[0]["status"] == "ok"
    assert not left[0].exists()
    assert sorted(p.name for p in tmp.glob("fxsurgeon-batch-*")) == ["fxsurgeon-batch-unrelated"]


# ------------------------------------------------------------------------------------------ results file


def test_batch_outputs_honour_the_umask(hooks, tmp_path):
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        out = tmp_path / oct(umask)
        out.mkdir()
        old = os.umask(umask)
        try:
            run_batch(["batchhooks:ok"], out=out / "r.jsonl", summary=out / "s.md", recipe=EXACT, progress=False)
        finally:
            os.umask(old)
        for name in ("r.jsonl", "s.md"):
            assert os.stat(out / name).st_mode & 0o777 == mode, (oct(umask), name)


def test_results_file_append_read_and_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    rf = ResultsFile(path)
    rf.append({"model": "a", "status": "ok", "rel_error": float("nan")})
    rf.append({"model": "b", "status": "error"})
    with open(path, "ab") as f:
        f.write(b'{"model": "c", "sta')  # a writer killed mid-line
    rf2 = ResultsFile(path)
    assert rf2.repaired_bytes == len(b'{"model": "c", "sta')
    rows, bad = rf2.read()
    assert [r["model"] for r in rows] == ["a", "b"] and bad == 0
    assert rows[0]["rel_error"] is None  # NaN is not JSON: stored as null
    rf2.append({"model": "c", "status": "ok"})
    assert [r["model"] for r in _lines(path)] == ["a", "b", "c"]


def test_results_file_short_write_is_taken_back(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    rf = ResultsFile(path)
    rf.append({"model": "a", "status": "ok"})
    before = path.read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(SurgeryError, match="disk full"):
        rf.append({"model": "b", "status": "ok", "pad": "x" * 100})
    monkeypatch.undo()
    assert path.read_bytes() == before


def test_latest_results_keeps_the_newest_line():
    rows = [{"model": "a", "status": "error"}, {"model": "b", "status": "ok"}, {"model": "a", "status": "ok"}]
    latest = latest_results(rows)
    assert latest["a"]["status"] == "ok" and len(latest) == 2


def test_check_writable(tmp_path, monkeypatch):
    with pytest.raises(SurgeryError, match="does not exist"):
        check_writable(tmp_path / "missing" / "r.jsonl")
    with pytest.raises(SurgeryError, match="is a directory"):
        check_writable(tmp_path)
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SurgeryError, match="nearly full"):
        check_writable(tmp_path / "r.jsonl")


# ------------------------------------------------------------------------------------------------- batch


def test_expand_models_patterns_and_specs():
    models = expand_models(["resnet1*", "resnet18", "pkg.mod:factory"], exclude=["*d"])
    assert models[:3] == ["resnet10t", "resnet14t", "resnet18"] and models.count("resnet18") == 1
    assert models[-1] == "pkg.mod:factory" and not any(m.endswith("d") for m in models)
    with pytest.raises(SurgeryError, match="matches no timm model"):
        expand_models(["no_such_model_anywhere"])


def test_batch_rerun_skips_done_and_retries_failures(hooks, tmp_path):
    out = tmp_path / "r.jsonl"
    first = run_batch(["batchhooks:ok", "batchhooks:boom"], out=out, recipe=EXACT, progress=False)
    assert sorted(r["status"] for r in first.ran) == ["error", "ok"]
    second = run_batch(["batchhooks:ok", "batchhooks:boom"], out=out, recipe=EXACT, progress=False)
    assert second.ran == [] and [r["model"] for r in second.results] == ["batchhooks:ok", "batchhooks:boom"]
    assert [r["model"] for r in second.failed] == ["batchhooks:boom"]
    again = run_batch(["batchhooks:ok", "batchhooks:boom"], out=out, recipe=EXACT, progress=False,
                      retry_failed=True)
    assert [r["model"] for r in again.ran] == ["batchhooks:boom"]
    # other settings are another configuration: nothing counts as done
    other = run_batch(["batchhooks:ok"], out=out, recipe={"separable": {"multiplier": 2}}, progress=False)
    assert len(other.ran) == 1 and other.config != first.config
    forced = run_batch(["batchhooks:ok"], out=out, recipe=EXACT, progress=False, force=True)
    assert len(forced.ran) == 1
    assert len(_lines(out)) == 5
    # a Job template is the same configuration as its fields given as keywords
    templated = run_batch(["batchhooks:ok"], out=out, job=Job("ignored", recipe=EXACT), progress=False)
    assert templated.ran == [] and templated.config == first.config


def test_run_batch_job_template_or_fields_not_both(tmp_path):
    out = tmp_path / "r.jsonl"
    with pytest.raises(SurgeryError, match=r"unknown argument\(s\) \['timeuot'\]; a job's fields are recipe, "):
        run_batch(["x"], out=out, timeuot=3, progress=False)
    with pytest.raises(SurgeryError, match="not both"):
        run_batch(["x"], out=out, job=Job("", timeout=3), seed=1, progress=False)
    with pytest.raises(SurgeryError, match=r"takes a fxsurgeon\.batch\.Job, got dict"):
        run_batch(["x"], out=out, job={"timeout": 3}, progress=False)
    assert not out.exists()


@pytest.mark.slow
def test_resume_after_sigkill_of_the_runner(hooks, tmp_path, capsys):
    """Kill the batch process with SIGKILL half way; the rerun finishes, every model exactly once."""
    from fxsurgeon.cli import main

    out = tmp_path / "r.jsonl"
    models = [f"batchhooks:slow{i}" for i in range(1, 7)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    args = ["batch", *models, "--out", str(out), "--no-progress", "--no-macs", "--timeout", "120"]
    proc = subprocess.Popen([sys.executable, "-m", "fxsurgeon.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done_before = len(_lines(out))
    assert 2 <= done_before < len(models)
    with open(out, "ab") as f:  # as if the kill had torn a line
        f.write(b'{"model": "batchhooks:slow6", "status": "o')
    assert main(args) == 0  # the rerun, here in the test process
    assert f"({done_before} already in" in capsys.readouterr().out
    rows = _lines(out)  # every line parses: no corrupt line left
    assert sorted(r["model"] for r in rows) == sorted(models)
    assert all(r["status"] == "ok" for r in rows)


def test_summary_markdown_groups_errors():
    rows = [
        {"model": "a", "status": "ok", "verified": True, "rel_error": 1e-7, "max_abs_error": 1e-6,
         "tolerance": 1e-4, "exact_expected": True, "params_before": 10, "params_after": 12,
         "macs_before": 100, "macs_after": 150, "passes": {"separable": {"rewrites": 2, "exact": 2, "skipped": 1}},
         "seconds": 2.0},
        {"model": "b", "status": "error", "error": "SurgeryError: torch.fx could not trace B: in module 'x' (m.X) "
         "at f.py:1 in forward: `if x.sum() > 0:`: TraceError: symbolically traced variables cannot be used "
         "as inputs to control flow. What you can do: ...", "seconds": 1.0},
        {"model": "c", "status": "error", "error": "SurgeryError: torch.fx could not trace C: in module 'y' "
         "(m.Y) at g.py:9 in forward: `if n > 3:`: TraceError: symbolically traced variables cannot be used "
         "as inputs to control flow. What you can do: ...", "seconds": 1.0},
        {"model": "d", "status": "timeout", "error": "timed out after 5 s (during convert)", "phase": "convert",
         "seconds": 5.0},
        {"model": "e", "status": "skipped", "error": "300 parameters > max_params 100", "cause": "over max_params"},
    ]
    text = summary_markdown(rows, title="t")
    assert "**Coverage: 1 of 4 attempted models converted and verified (25.0%).**" in text
    assert "| trace: TraceError: symbolically traced variables cannot be used as inputs to control flow | 2 | b, c |" in text
    assert "| timeout during convert | 1 | d |" in text
    assert "parameters: 10 → 12 (+20.0%)" in text and "MACs (fvcore; one multiply-add = 1 MAC)" in text
    assert "`separable`: 2 rewrites (2 exact), 1 skipped" in text


def test_error_cause_strips_specifics():
    a = error_cause({"status": "error", "error": "RuntimeError: shape '[1, 64, 7, 7]' is invalid for input of size 3136",
                     "phase": "build"})
    b = error_cause({"status": "error", "error": "RuntimeError: shape '[2, 32, 5, 5]' is invalid for input of size 99",
                     "phase": "build"})
    assert a == b == "build: RuntimeError: shape … is invalid for input of size N"


# -------------------------------------------------------------------------------------------------- dask


def test_dask_local_cluster_runs_the_same_jobs(hooks, tmp_path):
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "r.jsonl"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None,
                                  protocol="tcp://", host="127.0.0.1", scheduler_port=0) as cluster:
        res = run_batch(["batchhooks:ok", "batchhooks:boom"], out=out, recipe=EXACT, progress=False,
                        dask_scheduler=cluster.scheduler_address)
    by = {r["model"]: r for r in res.ran}
    assert by["batchhooks:ok"]["status"] == "ok" and by["batchhooks:ok"]["rel_error"] <= 1e-4
    assert by["batchhooks:boom"]["status"] == "error" and "forced failure" in by["batchhooks:boom"]["error"]
    local = convert_one(Job("batchhooks:ok", recipe=EXACT))
    assert local["params_after"] == by["batchhooks:ok"]["params_after"]
    assert local["macs_after"] == by["batchhooks:ok"]["macs_after"]
    assert len(_lines(out)) == 2
