"""fxsurgeon.load on hostile or corrupt files: no code from the file runs, no memory bomb, one-line errors.

Every file here is a real saved conversion whose JSON metadata was then edited, as an attacker would.
"""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fxsurgeon
from fxsurgeon import SurgeryError
from fxsurgeon.cli import main
from fxsurgeon.models import resnet20


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A resnet20 converted with an example input (so its tracing record has one), saved with fxsurgeon.save."""
    path = tmp_path_factory.mktemp("saved") / "r20.safetensors"
    small = fxsurgeon.convert(resnet20(), source=resnet20, example_inputs=torch.randn(1, 3, 32, 32))
    fxsurgeon.save(small, path)
    return path


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["fxsurgeon"])


def craft(src, dst, edit=None, *, text=None, tensors=None):
    """Copy a saved file with its metadata changed by ``edit(meta)`` (or replaced by ``text``)."""
    meta = _meta(src)
    if edit is not None:
        edit(meta)
    save_file(tensors if tensors is not None else load_file(str(src)), str(dst),
              metadata={"format": "pt", "fxsurgeon": text if text is not None else json.dumps(meta)})
    return dst


def refused(path, **kwargs):
    with pytest.raises(SurgeryError) as info:
        fxsurgeon.load(path, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------- 1. no code from the file


def _canary_factories(canary):
    """Factories that today's loaders would import and call, each writing the canary file."""
    return [
        {"factory": "os:system", "kwargs": {"command": f"touch {canary}"}},
        {"factory": "subprocess:run", "kwargs": {"args": ["touch", str(canary)]}},
        {"factory": "shutil:copyfile", "kwargs": {"src": __file__, "dst": str(canary)}},
        {"factory": "pathlib:Path.touch", "kwargs": {"self": str(canary)}},
        {"factory": "fxsurgeon.models.cifar_resnet:torch.save", "kwargs": {"obj": 1, "f": str(canary)}},
        {"factory": "canary_module_never_imported:build", "kwargs": {}},
    ]


@pytest.fixture
def canary_module(tmp_path, monkeypatch):
    """A module on sys.path whose import would create the canary file."""
    canary = tmp_path / "CANARY"
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "canary_module_never_imported.py").write_text(textwrap.dedent(f"""
        open({str(canary)!r}, "w").close()
        def build(**kw):
            open({str(canary)!r}, "w").close()
    """))
    monkeypatch.syspath_prepend(str(mod_dir))
    yield canary
    sys.modules.pop("canary_module_never_imported", None)


@pytest.mark.parametrize("case", range(6))
def test_factory_named_in_the_file_is_never_run(saved, tmp_path, canary_module, case):
    source = _canary_factories(canary_module)[case]
    path = craft(saved, tmp_path / "evil.safetensors", lambda m: m.update(source=source))
    msg = refused(path)
    assert not canary_module.exists(), "code named in the file ran"
    assert "canary_module_never_imported" not in sys.modules
    if source["factory"] in ("os:system", "subprocess:run"):
        assert f"trust_factories=['{source['factory']}']" in msg and "--trust-factory" in msg


def test_names_outside_the_allow_list_are_refused_before_any_import(saved, tmp_path, monkeypatch):
    import importlib

    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: (imported.append(name), real(name, *a))[1])
    for spec in ("builtins:eval", "builtins:exec", "os..path:join", ".os:system", "os:system ", "os:system\n",
                 "fxsurgeon.models:os.system", "fxsurgeon.models:torch.load", "fxsurgeon.models:__builtins__.eval",
                 "fxsurgeon.models:_private", "torchvision.models:_api.os.system", "torchvision.models:os",
                 "importlib:import_module", "ctypes:CDLL", "x" * 400 + ":y"):
        edit = lambda m, spec=spec: m.update(source={"factory": spec, "kwargs": {}})  # noqa: E731
        refused(craft(saved, tmp_path / "evil.safetensors", edit))
    assert [n for n in imported if n not in ("torchvision.models",)] == [], imported


def test_builder_kwargs_that_read_or_download_are_refused(saved, tmp_path, canary_module):
    for source, field in (
        ({"timm": "resnet18", "kwargs": {"checkpoint_path": str(canary_module)}}, "['checkpoint_path']"),
        ({"timm": "resnet18", "kwargs": {"pretrained_cfg_overlay": {"file": str(canary_module)}}},
         "['pretrained_cfg_overlay']"),
        ({"timm": "resnet18", "kwargs": {"pretrained": True}}, "['pretrained']"),
        ({"factory": "torchvision.models:resnet18", "kwargs": {"weights": "IMAGENET1K_V1"}}, "['weights']"),
        ({"timm": "os:system", "kwargs": {}}, "timm's registry"),
    ):
        msg = refused(craft(saved, tmp_path / "evil.safetensors", lambda m, s=source: m.update(source=s)))
        assert field in msg, msg


def test_record_source_and_tracing_names_are_not_imported(saved, tmp_path, canary_module):
    for edit in (
        lambda m: m["record"]["tracing"].update(leaf_modules=["canary_module_never_imported:build"]),
        lambda m: m["record"]["tracing"].update(autowrap_functions=["canary_module_never_imported:build"]),
        lambda m: m["record"]["tracing"].update(autowrap_functions=["os:system"]),
        lambda m: m["record"]["tracing"].update(autowrap_functions=["builtins:eval"]),
        lambda m: m["record"]["tracing"].update(leaf_modules=["torch.nn:Module.__subclasses__"]),
    ):
        refused(craft(saved, tmp_path / "evil.safetensors", edit))
        assert not canary_module.exists()
        assert "canary_module_never_imported" not in sys.modules
    # report rebuilds the original from the record: the same allow-list applies
    with pytest.raises(SurgeryError, match="not allowed"):
        fxsurgeon.io.build_original({"factory": "os:system", "kwargs": {"command": f"touch {canary_module}"}})
    assert not canary_module.exists()


def trusted_net(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))


def test_trusted_factories_load_with_an_explicit_pattern(tmp_path):
    small = fxsurgeon.convert(trusted_net(), source=trusted_net)
    path = tmp_path / "t.safetensors"
    fxsurgeon.save(small, path)
    msg = refused(path)
    assert f"trust_factories=['{__name__}:trusted_net']" in msg
    x = torch.randn(1, 3, 8, 8)
    for trust in ([f"{__name__}:trusted_net"], [f"{__name__}:*"]):
        torch.testing.assert_close(fxsurgeon.load(path, trust_factories=trust)(x), small(x), rtol=0, atol=0)
    # a source or model the caller names is the caller's choice
    torch.testing.assert_close(fxsurgeon.load(path, source=trusted_net)(x), small(x), rtol=0, atol=0)
    original = trusted_net()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    torch.testing.assert_close(fxsurgeon.load(path, model=original)(x), small(x), rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())
    for bad in ("mypkg:*", [3], ["mypkg"], ["mypkg:a:b"], ["../x:y"], ["a..b:c"]):
        with pytest.raises(SurgeryError, match="trust_factories"):
            fxsurgeon.load(path, trust_factories=bad)
    # a wildcard covers names, not a path through them
    evil = craft(path, tmp_path / "e.safetensors",
                 lambda m: m.update(source={"factory": f"{__name__}:os.system", "kwargs": {"command": "true"}}))
    refused(evil, trust_factories=[f"{__name__}:*"])


def test_torchvision_builders_are_allowed_by_name(tmp_path):
    tv = pytest.importorskip("torchvision.models")
    model = tv.resnet18(num_classes=10)
    small = fxsurgeon.convert(model, source={"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 10}})
    path = tmp_path / "tv.safetensors"
    fxsurgeon.save(small, path)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(fxsurgeon.load(path).eval()(x), small.eval()(x), rtol=0, atol=0)
    evil = craft(path, tmp_path / "e.safetensors",
                 lambda m: m["source"].update(factory="torchvision.models:get_weight"))
    assert "not a torchvision model builder" in refused(evil)


# ------------------------------------------------------------------------------------- 2. memory bombs


def peak_rss_kib(reset: bool = False) -> int:
    """This process's peak resident memory in KiB. ``reset=True`` first resets the peak to the current size
    (Linux /proc/self/clear_refs), so the delta measures what comes next even in a long pytest process whose
    earlier tests already set a higher peak; where that is not possible the delta is only an upper bound check.
    """
    import resource

    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


BOMB_SCRIPT = r"""
import json, resource, sys, time
import fxsurgeon
from fxsurgeon import SurgeryError
out = []
for path in sys.argv[1:]:
    t = time.perf_counter()
    try:
        fxsurgeon.load(path)
        out.append(("LOADED", path))
    except SurgeryError as exc:
        out.append(("refused", str(exc)[:200], time.perf_counter() - t))
try:  # this process's own peak: ru_maxrss keeps the parent's peak across fork + exec on Linux
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"results": out, "maxrss_mib": peak}))
"""


def test_memory_bombs_fail_fast_with_small_peak_memory(saved, tmp_path):
    """Each file would allocate tens of GB if its kwargs or shapes were used before the checks."""
    bombs = {
        # resnet20's fc would be 64 x 1e8 floats (25 GB)
        "num_classes": lambda m: m["source"]["kwargs"].update(num_classes=10**8),
        # a 1 x 3 x 1e5 x 1e5 example input (120 GB) for the replay's shape propagation
        "example": lambda m: m["record"]["tracing"]["example_inputs"][0].update(shape=[1, 3, 10**5, 10**5]),
        "example_dims": lambda m: m["record"]["tracing"]["example_inputs"][0].update(shape=[2] * 40),
        "int_cap": lambda m: m["source"]["kwargs"].update(num_classes=2**40),
        # a timm model 1e7 classes wide (2 GB fc) whose head the file does not hold
        "timm_head": lambda m: m.update(source={"timm": "resnet18", "kwargs": {"num_classes": 10**7}}),
        # a FuzzNet 100k channels wide (10^10 weights: 40 GB)
        "fuzz_width": lambda m: m.update(source={"factory": "fxsurgeon.testing.fuzz:FuzzNet", "kwargs": {"spec": {
            "input": [3, 8, 8], "head": None, "ops": [
                {"op": "conv", "in": 3, "out": 100_000, "k": [3, 3], "stride": 1, "dilation": 1, "padding": 1,
                 "padding_mode": "zeros", "groups": 1, "bias": True, "post": "relu", "src": 0},
                {"op": "conv", "in": 100_000, "out": 100_000, "k": [1, 1], "stride": 1, "dilation": 1,
                 "padding": 0, "padding_mode": "zeros", "groups": 1, "bias": True, "post": "relu", "src": 1}]}}}),
    }
    paths = [str(craft(saved, tmp_path / f"{name}.safetensors", edit)) for name, edit in bombs.items()]
    proc = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, *paths], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, result in zip(bombs, report["results"]):
        assert result[0] == "refused", (name, result)
        assert result[2] < 30, (name, result)  # seconds: refused before any big work
    assert report["maxrss_mib"] < 1500, report  # the whole process, torch and timm imports included


def needs_real_values(n: int = 8) -> nn.Module:
    """A factory that cannot run on the meta device (it reads a value), so load builds it on CPU."""
    width = int(torch.ones(1).sum().item()) * n
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))


def test_cpu_fallback_build_is_held_to_a_memory_budget(tmp_path):

    small = fxsurgeon.convert(needs_real_values(), source=needs_real_values)
    path = tmp_path / "cpu.safetensors"
    fxsurgeon.save(small, path)
    trust = [f"{__name__}:needs_real_values"]
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(fxsurgeon.load(path, trust_factories=trust)(x), small(x), rtol=0, atol=0)
    bomb = craft(path, tmp_path / "bomb.safetensors", lambda m: m["source"]["kwargs"].update(n=200_000))  # 1.4 TB
    before = peak_rss_kib(reset=True)
    msg = refused(bomb, trust_factories=trust)
    assert "budget" in msg
    assert peak_rss_kib() - before < 200 * 1024


def test_format_version_must_be_a_known_positive_int(saved, tmp_path):
    for version in (True, False, 0, -1, 1.0, "1", None, [1], 2, 10**30):
        path = craft(saved, tmp_path / "v.safetensors", lambda m, v=version: m.update(format_version=v))
        msg = refused(path)
        assert "format_version" in msg or "newer" in msg, (version, msg)


# ------------------------------------------------------------------------------------- 4. corrupt fields


CORRUPT = {
    "record.model": (lambda m: m["record"].pop("model"), "'record'['model']"),
    "record.options": (lambda m: m["record"].update(options=[1]), "'record'['options']"),
    "record.options.pass": (lambda m: m["record"]["options"].update(separable=5), "'record'['options']['separable']"),
    "rewrites": (lambda m: m["record"].update(rewrites={"a": 1}), "'record'['rewrites']"),
    "rewrites.missing": (lambda m: m["record"].pop("rewrites"), "'record'['rewrites']"),
    "rewrite.target": (lambda m: m["record"]["rewrites"][0].update(target=7), "'record'['rewrites'][0]['target']"),
    "rewrite.missing": (lambda m: m["record"]["rewrites"][0].pop("after"), "'record'['rewrites'][0]['after']"),
    "rewrite.extra": (lambda m: m["record"]["rewrites"][0].update(evil=1), "'record'['rewrites'][0]['evil']"),
    "rewrite.rank": (lambda m: m["record"]["rewrites"][1]["details"].update(rank="x"), "['rank']"),
    "rewrite.rank_bool": (lambda m: m["record"]["rewrites"][1]["details"].update(rank=True), "['rank']"),
    "skipped": (lambda m: m["record"].update(skipped=[{"target": 1}]), "'record'['skipped'][0]"),
    "verification": (lambda m: m["record"].update(verification={"rel_error": "x"}), "'record'['verification']"),
    "tracing": (lambda m: m["record"].update(tracing=[]), "'record'['tracing']"),
    "leaf_modules": (lambda m: m["record"]["tracing"].update(leaf_modules="x"), "'leaf_modules'"),
    "example.dtype": (lambda m: m["record"]["tracing"]["example_inputs"][0].update(dtype="load"), "['dtype']"),
    "example.shape": (lambda m: m["record"]["tracing"]["example_inputs"][0].update(shape=[1, -3]), "['shape']"),
    "example.shape_bool": (lambda m: m["record"]["tracing"]["example_inputs"][0].update(shape=[True]), "['shape']"),
    "source": (lambda m: m.update(source="resnet20"), "'source'"),
    "source.both": (lambda m: m["source"].update(timm="resnet18"), "'source'"),
    "source.kwargs": (lambda m: m["source"].update(kwargs=[1]), "'source'['kwargs']"),
    "source.kwarg_name": (lambda m: m["source"]["kwargs"].update({"a b": 1}), "'source'['kwargs']['a b']"),
    "structure": (lambda m: m.update(structure="x"), "'structure'"),
    "structure.item": (lambda m: m["structure"].append(3), "'structure'["),
    "tied": (lambda m: m.update(tied=[1]), "'tied'"),
    "tied.target": (lambda m: m.update(tied={"fc.weight": "nope"}), "'tied'"),
    "frozen": (lambda m: m.update(frozen={"a": 1}), "'frozen'"),
    "channels_last": (lambda m: m.update(channels_last=[None]), "'channels_last'[0]"),
    "modes": (lambda m: m.update(modes={"root": "yes"}), "'modes'['root']"),
    "modes.others": (lambda m: m.update(modes={"root": False, "others": 3}), "'modes'['others']"),
    "params": (lambda m: m["record"].update(params_before="many"), "'record'['params_before']"),
    "top": (lambda m: (m.clear(), m.update(format_version=1, source={"timm": "resnet18"}, record=[],
                                           structure=[])), "'record'"),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_fields_are_one_line_errors_naming_the_field(saved, tmp_path, name):
    edit, field = CORRUPT[name]
    msg = refused(craft(saved, tmp_path / "c.safetensors", edit))
    assert field in msg, msg


def test_malformed_metadata_is_refused(saved, tmp_path):
    for text in (
        "[" * 100_000 + "]" * 100_000,  # RecursionError inside json
        '{"format_version": 1, "source": ' + "[" * 500 + "]" * 500 + "}",
        "{}", "[]", "null", "not json", '{"format_version": 1}',
    ):
        refused(craft(saved, tmp_path / "m.safetensors", text=text))


def test_header_shapes_that_disagree_with_the_recipe_are_refused_before_reading_tensors(saved, tmp_path,
                                                                                      monkeypatch):
    import safetensors.torch

    tensors = load_file(str(saved))
    key = next(k for k in sorted(tensors) if k.endswith(".weight"))
    tensors[key] = torch.zeros(3, 3)
    path = craft(saved, tmp_path / "s.safetensors", tensors=tensors)

    def no_data(*args, **kwargs):
        raise AssertionError("tensor data read before the shapes were checked")

    monkeypatch.setattr(safetensors.torch, "load_file", no_data)
    msg = refused(path)
    assert key in msg and "[3, 3]" in msg


def test_cli_load_errors_are_one_line_exit_2(saved, tmp_path, capsys):
    evil = craft(saved, tmp_path / "evil.safetensors",
                 lambda m: m.update(source={"factory": "os:system", "kwargs": {"command": "true"}}))
    for argv in (["convert", str(evil), "--no-savings"], ["report", str(evil)],
                 ["convert", "fxsurgeon.models:resnet20", "--weights", "/etc/passwd", "--no-savings"],
                 ["convert", "fxsurgeon.models:resnet20", "--weights", str(tmp_path), "--no-savings"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("fxsurgeon: error:") and "\n" not in err, err


def test_cli_trust_factory_flag(tmp_path, capsys):
    small = fxsurgeon.convert(trusted_net(), source=trusted_net)
    path = tmp_path / "t.safetensors"
    fxsurgeon.save(small, path)
    assert main(["convert", str(path), "--no-savings", "--input-size", "3", "8", "8"]) == 2
    assert "--trust-factory" in capsys.readouterr().err
    assert main(["convert", str(path), "--no-savings", "--input-size", "3", "8", "8",
                 "--trust-factory", f"{__name__}:*"]) == 0
    assert main(["report", str(path), "--input-size", "3", "8", "8", "--trust-factory", f"{__name__}:trusted_net",
                 "--format", "json"]) == 0
    capsys.readouterr()
    # bench takes a saved conversion too: its original is rebuilt from the file's source, which must be trusted
    bench = ["bench", str(path), "--device", "cpu", "--input-size", "3", "8", "8", "--warmup", "1", "--iters", "2",
             "--rounds", "1"]
    assert main(bench) == 2
    assert "--trust-factory" in capsys.readouterr().err
    assert main([*bench, "--trust-factory", f"{__name__}:*"]) == 0


# ------------------------------------------------------------------------------------- 3. file modes


def test_written_files_honour_the_umask(tmp_path):
    small = fxsurgeon.convert(resnet20(), source=resnet20)
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        d = tmp_path / oct(umask)
        d.mkdir()
        old = os.umask(umask)
        try:
            fxsurgeon.save(small, d / "a.safetensors")
            assert main(["convert", "fxsurgeon.models:resnet20", "--input-size", "3", "32", "32", "--no-savings",
                         "--out", str(d / "b.safetensors"), "--report", str(d / "b.md")]) == 0
            assert main(["convert", "fxsurgeon.models:resnet20", "--input-size", "3", "32", "32", "--no-savings",
                         "--out", str(d / "c.pt")]) == 0
            assert main(["report", "fxsurgeon.models:resnet20", "--input-size", "3", "32", "32",
                         "--out", str(d / "r.json"), "--format", "json"]) == 0
        finally:
            os.umask(old)
        for name in ("a.safetensors", "b.safetensors", "b.md", "c.pt", "r.json"):
            assert stat.S_IMODE(os.stat(d / name).st_mode) == mode, (oct(umask), name)
    # replacing a file keeps the permissions it had
    kept = tmp_path / oct(0o002) / "a.safetensors"
    os.chmod(kept, 0o640)
    fxsurgeon.save(small, kept)
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o640


# ------------------------------------------------------------------------------------- 6. fuzz slice


def test_saved_file_fuzz_slice(tmp_path):
    """100 seeded mutated files (the benchmark runs thousands): SurgeryError or a clean load, no canary ran."""
    import contextlib
    import io
    import random

    from fxsurgeon.testing.load_fuzz import LoadFuzzer, make_base_files

    fuzzer = LoadFuzzer(make_base_files(tmp_path, kinds=("resnet20", "fuzznet")), tmp_path)
    before = peak_rss_kib(reset=True)
    outcomes = []
    for seed in range(100):
        with contextlib.redirect_stderr(io.StringIO()):
            outcomes.append(fuzzer.run_one(random.Random(seed), tmp_path / "m.safetensors"))
    crashes = [o for o in outcomes if o["outcome"] == "CRASH"]
    assert crashes == [], crashes[:3]
    assert fuzzer.canaries() == []
    assert {o["outcome"] for o in outcomes} == {"refused", "loaded"}
    assert [o for o in outcomes if o.get("multiline")] == []  # the CLI prints errors as one line
    assert peak_rss_kib() - before < 400 * 1024


def test_fields_the_replay_reads_are_required(saved, tmp_path):
    """Found by the fuzzer: optional-looking fields the replay reads must be present or defaulted."""
    msg = refused(craft(saved, tmp_path / "p.safetensors", lambda m: m["record"]["rewrites"][1].pop("pass_name")))
    assert "'record'['rewrites'][1]['pass_name']" in msg
    small = fxsurgeon.load(craft(saved, tmp_path / "k.safetensors", lambda m: m["source"].pop("kwargs")))
    assert fxsurgeon.get_record(small).source == {"factory": "fxsurgeon.models.cifar_resnet:resnet20", "kwargs": {}}
