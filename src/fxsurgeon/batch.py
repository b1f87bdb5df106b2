"""Batch conversion: many models, each converted and verified in its own process; resumable; summarised.

:func:`run_batch` converts every model of a list (timm names, ``package.module:factory`` specs or saved model
files; :func:`expand_models` turns ``timm.list_models`` patterns into one) with one recipe, and appends one
JSON line per model to a results file:

- **Isolation.** Every model runs in a process of its own (:func:`run_isolated`), in a new process group: a
  Python exception, a segfault, an out-of-memory kill or a SIGKILL is recorded for that model and the batch
  goes on; past its ``timeout`` the whole process group is killed and the model recorded as ``timeout``.
  Processes are forked from a small fork server that has already imported torch, timm and fxsurgeon (a fresh
  interpreter costs 5–15 s of imports per model on a small machine; a fork costs milliseconds) and that
  runs no torch op itself, so no thread pool is forked; where ``fork`` is unavailable each model gets a
  fresh interpreter (``launcher="subprocess"``).
- **Resumable.** Each result is written with one ``os.write`` of the complete line on an ``O_APPEND`` file
  descriptor and fsynced, so a killed run leaves whole lines; a torn last line (power loss, disk full) is cut
  off when the file is next opened. A rerun skips the models already recorded with the same settings.
- **One job function** (:func:`convert_one`) runs inside those processes, whether they are started by the
  local scheduler here or on a Dask cluster (``dask_scheduler=``): Dask workers call :func:`run_isolated`.

Each result line has at least ``model``, ``status`` (``ok`` / ``skipped`` / ``error`` / ``timeout``),
``error``, ``params_before/after``, ``macs_before/after`` (fvcore: one multiply-add = 1 MAC),
``max_abs_error`` / ``rel_error`` (verification on the example input), ``passes`` (rewrites, exact
rewrites and skips per pass) and ``seconds``. :func:`summary_markdown` renders a summary.

>>> import tempfile, os
>>> out = os.path.join(tempfile.mkdtemp(), "results.jsonl")
>>> res = run_batch(["fxsurgeon.models:resnet20"], out=out, recipe={"separable": {"multiplier": "full"}},
...                 progress=False)  # doctest: +SKIP
>>> res.ran[0]["status"], res.ran[0]["rel_error"] < 1e-4  # doctest: +SKIP
('ok', True)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cli.common import MIN_FREE_BYTES, load_model
from .errors import SurgeryError
from .runtime import batch_versions

__all__ = [
    "RESULT_KEYS",
    "BatchResults",
    "Job",
    "ResultsFile",
    "check_writable",
    "convert_one",
    "error_cause",
    "expand_models",
    "latest_results",
    "perturb_constant_params",
    "rounding_sensitivity",
    "run_batch",
    "run_isolated",
    "silencing_params",
    "summary_markdown",
]

#: keys every result line carries (None where not known)
RESULT_KEYS = (
    "model", "status", "error", "cause", "phase", "params_before", "params_after", "macs_before", "macs_after",
    "macs_error", "perturbed", "max_abs_error", "rel_error", "tolerance", "exact_expected", "verified",
    "verified_dtype", "input_shape",
    "passes", "skip_reasons", "seconds", "seconds_by_step", "recipe", "config", "versions", "finished",
)

STATUSES = ("ok", "skipped", "error", "timeout")

#: what the fork server imports once for all model processes
_PRELOAD = ["torch", "timm", "fvcore.nn", "fxsurgeon", "fxsurgeon.cli", "fxsurgeon.recipes", "fxsurgeon.convert"]


# ------------------------------------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class Job:
    """One model to convert, with everything the isolated process needs (picklable, JSON-able).

    Attributes:
        model: timm name, ``package.module:factory`` or a saved model file.
        recipe: ``convert()`` keyword arguments (see :func:`fxsurgeon.recipes.load_recipe`).
        recipe_name: for the record (a file name).
        input_size: (C, H, W) for every model; None picks a small one per model (see ``image_size``).
        image_size: with ``input_size=None``: try H = W = this first (timm models that take ``img_size=``
            are built for it), and fall back to the model's own ``pretrained_cfg["input_size"]`` when the
            model does not run at that size.
        batch_size: example batch for verification and MAC counting.
        max_params: skip (status ``skipped``) models with more parameters, counted on the meta device.
        seed: for the random example input and the random weights.
        threads: torch intra-op threads in the model's process (None: torch's default).
        timeout: seconds before the model's process group is killed (None: no limit).
        max_memory: address-space limit in bytes for the model's process (``RLIMIT_AS``; None: none), so
            one huge model fails alone instead of waking the machine's out-of-memory killer. It counts
            virtual memory, which starts at about 4 GB once torch and timm are loaded.
        count_macs: count MACs before/after with fvcore.
        perturb_init: give constant-initialised parameters random values first (see
            :func:`perturb_constant_params`): random-init timm models silence whole residual branches with
            zero-initialised norms and 1e-6 layer scales, and a verification that cannot see a branch cannot
            catch a wrong rewrite in it.
    """

    model: str
    recipe: dict[str, Any] = field(default_factory=dict)
    recipe_name: str | None = None
    input_size: tuple[int, int, int] | None = None
    image_size: int = 64
    batch_size: int = 1
    max_params: int | None = None
    seed: int = 0
    threads: int | None = None
    timeout: float | None = None
    max_memory: int | None = None
    count_macs: bool = True
    perturb_init: bool = True

    def config(self) -> str:
        """A short hash of the settings that change a result: a rerun with the same one may skip the model."""
        keys = {"recipe": self.recipe, "input_size": self.input_size, "image_size": self.image_size,
                "batch_size": self.batch_size, "max_params": self.max_params, "seed": self.seed,
                "count_macs": self.count_macs, "perturb_init": _PERTURB_SCHEME if self.perturb_init else False}
        blob = json.dumps(keys, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _empty_result(model: str) -> dict[str, Any]:
    return dict.fromkeys(RESULT_KEYS) | {"model": model}


def convert_one(job: Job, phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build, convert, verify and count one model; the job function of every batch process.

    Runs in the calling process (the batch runs it in an isolated one through :func:`run_isolated`).
    Exceptions propagate; ``phase`` is told each step (``count``, ``build``, ``convert``, ``macs``) so a
    timeout or a crash can say where it happened.

    Returns:
        A result dict with :data:`RESULT_KEYS`: status ``ok`` (converted, and verified when the recipe
        verifies) or ``skipped`` (over ``max_params``).
    """
    import torch

    from .convert import convert
    from .record import get_record

    tell = phase or (lambda _: None)
    t0 = time.perf_counter()
    torch.manual_seed(job.seed)
    if job.threads:
        torch.set_num_threads(job.threads)
    out = _empty_result(job.model)
    steps: dict[str, float] = {}
    if job.max_params is not None:
        tell("count")
        t = time.perf_counter()
        n = _meta_param_count(job.model)
        steps["count"] = time.perf_counter() - t
        if n is not None and n > job.max_params:
            out.update(status="skipped", params_before=n, error=f"{n:,} parameters > max_params {job.max_params:,}",
                       cause="over max_params", seconds_by_step=steps, seconds=time.perf_counter() - t0)
            return out
    tell("build")
    t = time.perf_counter()
    model, x, out["perturbed"] = _model_and_input(job)
    steps["build"] = time.perf_counter() - t
    out["input_shape"] = list(x.shape)
    tell("convert")
    recipe = dict(job.recipe)
    try:
        converted = convert(model, example_inputs=x, **recipe)
    except SurgeryError as exc:
        if "claim to be exact" not in str(exc) or not _chaotic(model, x, recipe.get("tolerance")):
            raise
        # float32 rounding alone fails the comparison on this random-init model: verify the same conversion
        # in float64, where rounding is ~1e-16 and the exactness check means something again
        model, x = model.double(), x.double()
        try:
            converted = convert(model, example_inputs=x, **recipe)
        except SurgeryError as exc64:
            _raise_if_chaotic(model, x, exc64, recipe.get("tolerance"))
            raise
        out["verified_dtype"] = "float64"
    rec = get_record(converted)
    steps.update({f"convert.{k}": v for k, v in rec.seconds.items()})
    out.update(status="ok", params_before=rec.params_before, params_after=rec.params_after,
               passes=rec.counts(), skip_reasons=_skip_reasons(rec))
    v = rec.verification
    out["verified"] = v is not None
    if v is not None:
        out.update(max_abs_error=v.max_abs_error, rel_error=v.rel_error, tolerance=v.tolerance,
                   exact_expected=v.exact_expected)
    if job.count_macs:
        tell("macs")
        t = time.perf_counter()
        try:
            out["macs_before"] = _count_macs(model, x)
            out["macs_after"] = _count_macs(converted, x)
        except Exception as exc:  # counting is a report, not the conversion: the model still converted
            out["macs_error"] = f"{type(exc).__name__}: {_first_line(str(exc))}"
        steps["macs"] = time.perf_counter() - t
    out["seconds_by_step"] = steps
    out["seconds"] = time.perf_counter() - t0
    return out


#: names the perturbation rule in each result's settings hash: a rerun after it changes converts again
_PERTURB_SCHEME = "zero-gates-U(0.05,0.15)"

# zero-initialised parameters that add rather than multiply: they silence nothing, and shifting every bias
# of a deep random network makes its activations grow without bound
_NOT_GATES = ("bias", "token", "embed", "pos")


def rounding_sensitivity(model, x, delta: float = 1e-6) -> float:
    """Relative output change of ``model`` when its input is scaled by ``1 + delta``: ~delta when tame.

    A network whose output moves by much more than ``delta`` amplifies float rounding: comparing outputs
    cannot tell an exact rewrite (whose only change is rounding) from a wrong one.
    """
    import torch

    from .convert import compare_outputs

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, rel = compare_outputs(model(x), model(x * (1 + delta)))
    finally:
        model.train(was)
    return rel


def _chaotic(model, x, tolerance: float | None) -> bool:
    """Whether ``model`` amplifies a rounding-sized input change past the exactness tolerance."""
    return rounding_sensitivity(model, x) > (tolerance if tolerance is not None else 1e-4)


def _raise_if_chaotic(model, x, exc: Exception, tolerance: float | None) -> None:
    """After an exactness failure: when the original itself amplifies rounding past the tolerance, say so."""
    tol = tolerance if tolerance is not None else 1e-4
    sens = rounding_sensitivity(model, x)
    if sens > tol:
        raise SurgeryError(
            f"unverifiable: this randomly initialised model is numerically chaotic — scaling its input by "
            f"1 + 1e-6 changes its output by {sens:.3g} (relative L2), more than the tolerance {tol:g}, so float "
            f"rounding alone fails an exact comparison ({exc})"
        ) from exc


def perturb_constant_params(model, seed: int = 0) -> int:
    """Give parameters that initialisation left at zero small random values; returns how many changed.

    A freshly built timm model sets the last norm of each residual block to zero (``zero_init_last``),
    layer scales to 1e-6, NFNet skip gains to 0: the branch behind them contributes nothing (or 1e-6) to the
    output, so comparing outputs cannot see an error in it. Every multiplying parameter (not a bias, token
    or embedding, which add) whose elements are all the same value of magnitude ≤ 1e-5 gets values drawn
    from U(0.05, 0.15): the branch then counts for about a tenth, enough for a wrong rewrite to show, and
    the network stays about as tame as at initialisation. (Larger values, or perturbing biases and the
    norms' unit weights too, make deep random networks chaotic: EfficientNetV2-S then amplifies a 1e-6
    input change to a 0.4 relative output change, and float32 rounding fails any exactness check.)
    Trained weights are never constant, so trained models are left alone.

    >>> import torch.nn as nn
    >>> bn = nn.BatchNorm2d(4); _ = nn.init.zeros_(bn.weight)
    >>> perturb_constant_params(bn), bool((bn.weight > 0).all()), bool((bn.bias == 0).all())
    (1, True, True)
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    changed = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0 or p.device.type == "meta":
                continue
            if any(word in name.rsplit(".", 1)[-1].lower() for word in _NOT_GATES):
                continue
            flat = p.detach().reshape(-1)
            if abs(float(flat[0])) > 1e-5 or not bool((flat == flat[0]).all()):
                continue
            p.copy_((0.05 + 0.1 * torch.rand(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype))
            changed += 1
    return changed


def silencing_params(model) -> list[str]:
    """Parameters that are all (near) zero multipliers in a fresh model: norm weights, gains, layer scales.

    Names of floating-point parameters called ``weight``, ``gamma``, ``gain``, ``scale`` (or ending so) whose
    every element has magnitude ≤ 1e-5: whatever branch they scale is invisible in the output.

    >>> import torch.nn as nn
    >>> bn = nn.BatchNorm2d(4); _ = nn.init.zeros_(bn.weight)
    >>> silencing_params(nn.Sequential(bn))
    ['0.weight']
    """
    out = []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1].lower()
        if not p.is_floating_point() or p.numel() == 0 or p.device.type == "meta":
            continue
        if leaf.endswith(("weight", "gamma", "gain", "scale")) and float(p.detach().abs().max()) <= 1e-5:
            out.append(name)
    return out


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]


def _skip_reasons(rec) -> dict[str, int]:
    from .record import reason_key

    # "groups=32 > 1" and "groups=64 > 1" are one reason here
    counts = Counter(re.sub(r"(?<==)\d+", "N", f"{s.pass_name}: {reason_key(s.reason)}") for s in rec.skipped)
    return dict(counts.most_common(8))


def _load(spec: str, **kwargs: Any):
    return load_model(spec, **kwargs)


def _meta_param_count(spec: str) -> int | None:
    """Parameter count without allocating weights (meta device); None when the model cannot be built so."""
    import torch

    try:
        with torch.device("meta"):
            model = _load(spec)
    except Exception:  # some constructors compute with real tensors: count after the real build instead
        return None
    return sum(p.numel() for p in model.parameters())


def _in_chans(model) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") or (3,)
    return int(getattr(model, "in_chans", None) or size[0])


def _default_size(model) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(int(s) for s in cfg.get("input_size") or (3, 224, 224))  # type: ignore[return-value]


def _model_and_input(job: Job):
    """(model in eval mode, seeded random input, parameters perturbed or None): ``input_size``, else small."""
    import torch

    gen = torch.Generator().manual_seed(job.seed)
    perturbed = None

    def build(**kwargs):
        nonlocal perturbed
        model = _load(job.model, **kwargs)
        if job.perturb_init:  # before any forward: some models (levit) cache tensors made from parameters
            perturbed = perturb_constant_params(model, job.seed)
        return model

    if job.input_size is not None:
        return build(), torch.randn(job.batch_size, *job.input_size, generator=gen), perturbed
    small = job.image_size
    sized = False
    model = None
    if _is_timm_name(job.model):
        import timm

        cfg = timm.get_pretrained_cfg(job.model)  # None for names without a pretrained config
        size = getattr(cfg, "input_size", None) if cfg is not None else None
        small = min(small, *size[1:]) if size else small
        try:  # ViTs, Swins, ... fix their position tables at build time: ask for the small size up front
            model = build(img_size=small)
            sized = True
        except Exception:
            model = None
    if model is None:
        model = build()
        small = min(small, *_default_size(model)[1:])
    shape = (_in_chans(model), small, small)
    try:
        with torch.no_grad():
            model(torch.randn(1, *shape, generator=torch.Generator().manual_seed(job.seed)))
    except Exception:  # does not run that small: use the size the model was made for
        if sized:
            model = build()
        shape = _default_size(model)
    return model, torch.randn(job.batch_size, *shape, generator=gen), perturbed


def _is_timm_name(spec: str) -> bool:
    return ":" not in spec and not os.path.exists(spec)


def _count_macs(model, x) -> int:
    """fvcore's total (one multiply-add = 1 MAC), without its per-op warnings."""
    import warnings

    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(model.eval(), (x,))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return int(fca.total())


# ------------------------------------------------------------------------------------ isolated processes


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so a killed batch leaves no orphans."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # best effort: without it an orphan still finishes its one model and exits
        return


def _child_main(workdir: str) -> None:
    """A model's process: isolate, run :func:`convert_one` on ``workdir/job.json``, write the result, exit."""
    parent = os.getppid()
    with contextlib.suppress(OSError):
        os.setsid()  # own process group: a timeout kills the model and whatever it started
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    log = os.open(os.path.join(workdir, "log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    job = _read_job(workdir)
    paths = _read_json(os.path.join(workdir, "sys_path.json")) or []
    # the model is importable here wherever it was importable in the process that asked for it
    sys.path[:] = [*paths, *(p for p in sys.path if p not in paths)]
    if job.max_memory:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (job.max_memory, job.max_memory))
    current = ["start"]

    def phase(name: str) -> None:
        current[0] = name
        _write_atomic(os.path.join(workdir, "phase"), name.encode())

    try:
        result = convert_one(job, phase)
    except BaseException as exc:  # every failure becomes that model's record
        result = _empty_result(job.model)
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
            message = f"out of memory (max_memory={job.max_memory}): {message}"
        result.update(status="error", error=message[:4000], phase=current[0],
                      traceback="".join(traceback.format_exception(exc)[-12:])[-4000:])
    try:
        blob = json.dumps(_finite(result), default=str).encode()
    except Exception as exc:  # never lose the model's status to a serialisation problem
        blob = json.dumps(_empty_result(job.model) | {"status": "error", "error": f"result not JSON: {exc}"}).encode()
    _write_atomic(os.path.join(workdir, "result.json"), blob)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: nothing left to save, and some extensions crash in it


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_job(workdir: str) -> Job:
    with open(os.path.join(workdir, "job.json")) as f:
        data = json.load(f)
    if data.get("input_size") is not None:
        data["input_size"] = tuple(data["input_size"])
    return Job(**data)


def _child_cli() -> None:
    """``python -c 'from fxsurgeon.batch import _child_cli; _child_cli()' WORKDIR``: a fresh interpreter."""
    _child_main(sys.argv[1])


def _fork_server_main() -> None:
    """The fork server: import torch, timm and fxsurgeon once, then fork one process per model on request.

    Protocol on stdin/stdout: the parent writes a work directory per line, the server forks a child that
    runs :func:`_child_main` on it and answers the child's pid; when a child ends, the server reaps it and
    writes its exit code (negative: killed by that signal) to ``WORKDIR/exit``. It exits when its stdin
    closes (the batch ended or died); its children follow (``PR_SET_PDEATHSIG``).
    """
    import selectors
    import warnings

    _die_with_parent()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _PRELOAD:
            with contextlib.suppress(Exception):
                __import__(name)
    children: dict[int, str] = {}
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    os.write(1, b"ready\n")
    buf = b""
    alive = True
    while alive or children:
        if alive and sel.select(timeout=0.05):
            data = os.read(0, 65536)
            if not data:
                alive = False  # the batch is gone: reap what is left, then leave
                for pid in children:
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                workdir = line.decode()
                pid = os.fork()
                if pid == 0:
                    try:
                        sel.close()
                        _child_main(workdir)
                    finally:
                        os._exit(70)
                children[pid] = workdir
                os.write(1, f"{pid}\n".encode())
        elif not alive:
            time.sleep(0.05)
        while children:
            try:
                if hasattr(os, "waitid"):
                    pid = _exited_child(-1)
                    if pid is None:
                        break
                    # whatever the model started dies with it; the unreaped leader keeps the group id from reuse
                    _kill_group(pid)
                    pid, status = os.waitpid(pid, 0)
                else:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                    if pid == 0:
                        break
                    _kill_group(pid)
            except ChildProcessError:
                children.clear()
                break
            workdir = children.pop(pid, None)
            if workdir is not None:
                with contextlib.suppress(OSError):
                    _write_atomic(os.path.join(workdir, "exit"), str(os.waitstatus_to_exitcode(status)).encode())
    os._exit(0)


def _exited_child(pid: int) -> int | None:
    """The pid of an exited, not yet reaped child (``pid`` or, with -1, any), without reaping it."""
    if not hasattr(os, "waitid"):
        return None
    idtype, ident = (os.P_ALL, 0) if pid == -1 else (os.P_PID, pid)
    info = os.waitid(idtype, ident, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info.si_pid if info is not None and info.si_pid else None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _start_time(pid: int) -> int | None:
    """Kernel start time of a process (clock ticks since boot), or None when it is gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


_WORKDIR_PREFIX = "fxsurgeon-batch-"
_WORKDIR_RE = re.compile(rf"^{_WORKDIR_PREFIX}(\d+)-(\d+)-")


def remove_stale_workdirs(tmpdir: str | None = None) -> list[str]:
    """Remove the work directories of batch runs whose process is gone (killed with SIGKILL, say).

    A work directory is named after the process that made it (pid and kernel start time), so one whose owner
    no longer runs is left over and removed here; directories of live runs, other users' and unrelated ones
    are kept. Returns the removed paths.
    """
    tmpdir = tmpdir or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(tmpdir))
    except OSError:
        return removed
    for entry in entries:
        m = _WORKDIR_RE.match(entry.name)
        if not m:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        pid, started = int(m.group(1)), int(m.group(2))
        if pid == os.getpid() or (_start_time(pid) == started and started):
            continue
        if not started and _start_time(pid) is not None:
            continue  # no start time known where it was made: keep while that pid lives
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


_SWEPT = False


class _ForkServer:
    """Parent side of :func:`_fork_server_main`: one server per process, shared by threads (Dask workers)."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.proc: Any = None

    def _ensure(self) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            return
        code = "from fxsurgeon.batch import _fork_server_main; _fork_server_main()"
        # the server imports the same fxsurgeon, torch and timm as this process, wherever they came from
        paths = [p for p in sys.path if isinstance(p, str)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, bufsize=0, start_new_session=True, env=env)
        if self.proc.stdout.readline() != b"ready\n":
            raise SurgeryError("fxsurgeon batch: the fork server did not start (is fxsurgeon importable?)")

    def fork(self, workdir: str) -> int:
        with self.lock:
            for _attempt in range(2):  # a server that died since the last model is replaced once
                self._ensure()
                try:
                    self.proc.stdin.write(f"{workdir}\n".encode())
                    line = self.proc.stdout.readline()
                except OSError:  # a broken pipe: the server is gone
                    line = b""
                if line.strip().isdigit():
                    return int(line)
                self.proc.kill()
                self.proc.wait()
            raise SurgeryError("fxsurgeon batch: the fork server died twice in a row; rerun, or use "
                               "launcher='subprocess'")


_SERVER: _ForkServer | None = None


def _fork_server() -> _ForkServer:
    # One per process, started on first use, like multiprocessing's own fork server: it costs one import of
    # torch and timm, which every model process then shares.
    global _SERVER
    if _SERVER is None:
        _SERVER = _ForkServer()
    return _SERVER


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _finite(obj: Any) -> Any:
    """NaN/inf → None, so every line is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class _Isolated:
    """One model's process: start it, poll it, kill its process group, read its result."""

    def __init__(self, job: Job, launcher: str = "auto") -> None:
        if launcher == "auto":
            launcher = "fork" if hasattr(os, "fork") and sys.platform != "darwin" else "subprocess"
        if launcher not in ("fork", "subprocess"):
            raise SurgeryError(f"launcher must be 'auto', 'fork' or 'subprocess', got {launcher!r}")
        self.job = job
        self.launcher = launcher
        global _SWEPT
        if not _SWEPT:  # once per process: what a SIGKILLed earlier run left behind
            _SWEPT = True
            remove_stale_workdirs()
        owner = f"{os.getpid()}-{_start_time(os.getpid()) or 0}"
        self.workdir = tempfile.mkdtemp(prefix=f"{_WORKDIR_PREFIX}{owner}-")
        self.proc: Any = None
        self.server: Any = None
        self.server_died: int | None = None
        self.pid = -1
        self.started = 0.0
        self.timed_out = False

    def start(self) -> _Isolated:
        with open(os.path.join(self.workdir, "job.json"), "w") as f:
            json.dump(asdict(self.job), f)
        with open(os.path.join(self.workdir, "sys_path.json"), "w") as f:
            json.dump([p for p in sys.path if isinstance(p, str)], f)
        if self.launcher == "fork":
            server = _fork_server()
            self.pid = server.fork(self.workdir)
            self.server = server.proc  # the server that reaps this model and reports its exit code
        else:
            import subprocess

            code = "from fxsurgeon.batch import _child_cli; _child_cli()"
            self.proc = subprocess.Popen([sys.executable, "-c", code, self.workdir], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.pid = self.proc.pid
        self.started = time.monotonic()  # after the fork server's start-up: a timeout is the model's own time
        return self

    def exitcode(self) -> int | None:
        if self.launcher == "subprocess":
            if self.proc.returncode is None:
                with contextlib.suppress(ChildProcessError, OSError):
                    if _exited_child(self.proc.pid) is not None:
                        _kill_group(self.proc.pid)  # before reaping: the group id cannot be reused yet
            return self.proc.poll()
        text = _read_text(os.path.join(self.workdir, "exit"))
        if text:
            return int(text)
        if self.server_died is not None:
            return -int(signal.SIGKILL)
        return None

    def _server_gone(self) -> bool:
        """The fork server that would report this model's exit has died: nobody will, so stop waiting."""
        if self.server is None or self.server.poll() is None:
            return False
        if _read_text(os.path.join(self.workdir, "exit")):
            return False
        self.server_died = self.server.returncode
        _kill_group(self.pid)  # its children die with it (PR_SET_PDEATHSIG); the group's stragglers too
        return True

    def poll(self) -> bool:
        """True once the process has ended (killing it first when past the timeout)."""
        if self.exitcode() is not None or self._server_gone():
            return True
        if self.job.timeout is not None and time.monotonic() - self.started > self.job.timeout:
            self.timed_out = True
            self.kill()
            return True
        return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # the model's group: it and anything it started
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)  # in case it died before making its group
        deadline = time.monotonic() + 10
        while self.exitcode() is None and time.monotonic() < deadline:  # reaped: no zombie left
            time.sleep(0.02)

    def result(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        path = os.path.join(self.workdir, "result.json")
        phase = _read_text(os.path.join(self.workdir, "phase")) or "start"
        res: dict[str, Any] | None = None
        if os.path.exists(path) and not self.timed_out:
            try:
                with open(path) as f:
                    res = json.load(f)
            except (OSError, ValueError):
                res = None
        if res is None:
            res = _empty_result(self.job.model)
            if self.server_died is not None and not self.timed_out:
                res.update(status="error", error=f"the fork server died (exit code {self.server_died}) while this "
                           f"model ran (during {phase}): its result is lost; the next model gets a new server")
            elif self.timed_out:
                res.update(status="timeout", error=f"timed out after {self.job.timeout:g} s (during {phase})")
            else:
                code = self.exitcode()
                tail = _tail(os.path.join(self.workdir, "log"))
                if code is not None and code < 0:
                    try:
                        name = signal.Signals(-code).name
                    except ValueError:
                        name = f"signal {-code}"
                    why = " (the out-of-memory killer sends SIGKILL)" if -code == signal.SIGKILL else ""
                    msg = f"process killed by {name}{why} during {phase}"
                else:
                    msg = f"process exited with code {code} during {phase} without a result"
                res.update(status="error", error=msg + (f"; last output: {tail}" if tail else ""))
            res["phase"] = phase
        res["seconds"] = seconds
        res["cause"] = res.get("cause") or (error_cause(res) if res["status"] in ("error", "timeout") else None)
        return res

    def cleanup(self) -> None:
        _kill_group(self.pid)  # anything the model started that outlived it (normally gone already)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _tail(path: str, lines: int = 5, limit: int = 800) -> str:
    text = _read_text(path) or ""
    keep = [ln for ln in text.splitlines() if ln.strip() and "Warning" not in ln][-lines:]
    return " | ".join(keep)[-limit:]


def run_isolated(job: Job, launcher: str = "auto", poll_s: float = 0.1) -> dict[str, Any]:
    """Run :func:`convert_one` for ``job`` in a process of its own and return its result, whatever happens.

    A crash, a kill or a hang (past ``job.timeout``) becomes an ``error`` / ``timeout`` result naming the
    step it happened in. This is what the local scheduler and Dask workers both run.
    """
    iso = _Isolated(job, launcher).start()
    try:
        while not iso.poll():
            time.sleep(poll_s)
        return iso.result()
    finally:
        if iso.exitcode() is None:
            iso.kill()
        iso.cleanup()


# --------------------------------------------------------------------------------------------- results


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse early, with a clear message, when ``path`` cannot be written or its disk is (nearly) full."""
    p = Path(path)
    if p.is_dir():
        raise SurgeryError(f"{what} {str(p)!r} is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise SurgeryError(f"cannot write {what} {str(p)!r}: directory {str(parent)!r} does not exist")
    try:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides, as for open()
        os.close(fd)
    except OSError as exc:
        raise SurgeryError(f"cannot write {what} {str(p)!r}: {exc.strerror or exc}") from exc
    free = shutil.disk_usage(parent).free
    if free < MIN_FREE_BYTES:
        raise SurgeryError(
            f"disk holding {what} {str(p)!r} is nearly full ({free / 2**20:.1f} MiB free, need at least "
            f"{MIN_FREE_BYTES // 2**20} MiB); free some space or write elsewhere"
        )
    return p


class ResultsFile:
    """A JSON-lines results file appended one complete line per model, safe against kills.

    Opening cuts off a torn last line (a line without its newline: the writer died mid-write or the disk
    filled); :meth:`read` skips any line that is not a JSON object with a ``model``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.repaired_bytes = 0
        self._repair()

    def _repair(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                f.truncate(keep)
                self.repaired_bytes = len(data) - keep

    def read(self) -> tuple[list[dict[str, Any]], int]:
        """(every valid result in file order, number of unreadable lines)."""
        if not self.path.exists():
            return [], 0
        out, bad = [], 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                if isinstance(obj, dict) and isinstance(obj.get("model"), str):
                    out.append(obj)
                else:
                    bad += 1
        return out, bad

    def append(self, result: dict[str, Any]) -> None:
        """Append one result as one line: a single ``os.write`` on an ``O_APPEND`` descriptor, then fsync."""
        data = (json.dumps(_finite(result), default=str, allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides
        try:
            size = os.fstat(fd).st_size
            written = os.write(fd, data)
            if written != len(data):  # disk full: take the partial line back out rather than leave it torn
                os.ftruncate(fd, size)
                raise SurgeryError(f"could not write a whole result line to {str(self.path)!r} (disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)


def latest_results(results: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last result per model (a ``--force`` or ``--retry-failed`` rerun appends a newer line)."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        out.pop(r["model"], None)
        out[r["model"]] = r
    return out


# ------------------------------------------------------------------------------------------- the batch


def expand_models(patterns: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Model specs from ``timm.list_models`` patterns (``"resnet*"``), exact names, factory specs or files.

    ``package.module:factory`` specs and existing files are taken as they are; everything else goes
    through ``timm.list_models(pattern, exclude_filters=exclude)``. A pattern that matches nothing is a
    :class:`SurgeryError`. The order is kept and duplicates dropped.

    >>> expand_models(["resnet1*"], exclude=["*d"])[:3]
    ['resnet10t', 'resnet14t', 'resnet18']
    """
    import fnmatch

    models: list[str] = []
    for pat in patterns:
        if ":" in pat or os.path.exists(pat):
            if not any(fnmatch.fnmatchcase(pat, e) for e in exclude):
                models.append(pat)
            continue
        import timm

        names = timm.list_models(pat, exclude_filters=list(exclude))
        if not names:
            hint = "" if any(c in pat for c in "*?[") else " (is it a timm model name? see timm.list_models())"
            raise SurgeryError(f"pattern {pat!r} matches no timm model{hint}")
        models += names
    return list(dict.fromkeys(models))


@dataclass
class BatchResults:
    """What :func:`run_batch` did.

    Attributes:
        ran: the results of the models converted this time, in the order they finished.
        results: the latest recorded result of every requested model with these settings, this run's and
            earlier runs' alike, in the order of the request (models never run are missing).
        config: the settings hash shared by those results (the ``config`` field of each line).
    """

    ran: list[dict[str, Any]]
    results: list[dict[str, Any]]
    config: str

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Requested models whose latest result is ``error`` or ``timeout``."""
        return [r for r in self.results if r.get("status") in ("error", "timeout")]


def run_batch(
    models: Sequence[str],
    *,
    out: str | os.PathLike,
    recipe: dict[str, Any] | None = None,
    recipe_name: str | None = None,
    summary: str | os.PathLike | None = None,
    workers: int = 1,
    timeout: float | None = None,
    max_params: int | None = None,
    input_size: Sequence[int] | None = None,
    image_size: int = 64,
    batch_size: int = 1,
    seed: int = 0,
    threads: int | None = None,
    max_memory: int | None = None,
    count_macs: bool = True,
    perturb_init: bool = True,
    force: bool = False,
    retry_failed: bool = False,
    dask_scheduler: Any = None,
    launcher: str = "auto",
    progress: bool = True,
) -> BatchResults:
    """Convert every model in its own process, appending one JSON line per model to ``out``.

    Args:
        models: model specs (see :func:`expand_models`).
        out: the JSON-lines results file, appended to (created when missing).
        recipe: ``convert()`` keyword arguments for every model (``load_recipe(path)``); None: defaults.
        recipe_name: recorded with each result.
        summary: also write a Markdown summary of every model of ``models`` recorded in ``out`` here.
        workers: models converted at the same time (local scheduler; a Dask cluster sets its own).
        timeout: seconds per model (its process group is killed after that; None: no limit).
        max_params: skip larger models (counted on the meta device before building them).
        input_size / image_size / batch_size / seed / max_memory / count_macs / perturb_init: see :class:`Job`.
        threads: torch threads per model process; default: the CPU count divided by ``workers``.
        force: convert again models already recorded; the newer line wins in summaries.
        retry_failed: convert again models recorded as ``error`` or ``timeout``.
        dask_scheduler: run the jobs on a Dask cluster: a scheduler address (``"tcp://host:8786"``), a
            ``distributed.Client`` or a ``LocalCluster``. Needs the ``distributed`` extra.
        launcher: ``"auto"`` (the fork server where the OS has ``fork``), ``"fork"`` or ``"subprocess"``.
        progress: show a tqdm progress bar on stderr.

    Returns:
        A :class:`BatchResults`: this run's results (``ran``) and the latest of every requested model
        (``results``), including models recorded by earlier runs with the same settings.

    Raises:
        SurgeryError: ``out`` or ``summary`` cannot be written or the disk is nearly full (checked before
            any model runs), or bad arguments.
    """
    if workers < 1:
        raise SurgeryError(f"workers must be ≥ 1, got {workers}")
    if timeout is not None and timeout <= 0:
        raise SurgeryError(f"timeout must be > 0 seconds, got {timeout}")
    check_writable(out, "results file")
    if summary is not None:
        check_writable(summary, "summary file")
    results_file = ResultsFile(out)
    if results_file.repaired_bytes and progress:
        print(f"fxsurgeon batch: cut a torn last line ({results_file.repaired_bytes} bytes) from {out}",
              file=sys.stderr)
    models = list(dict.fromkeys(models))
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
    base = Job(model="", recipe=dict(recipe or {}), recipe_name=recipe_name,
               input_size=tuple(input_size) if input_size else None, image_size=image_size, batch_size=batch_size,
               max_params=max_params, seed=seed, threads=threads, timeout=timeout, max_memory=max_memory,
               count_macs=count_macs, perturb_init=perturb_init)
    config = base.config()
    previous, _bad = results_file.read()
    done = {}
    for r in previous:
        if r.get("config") == config:
            done[r["model"]] = r
    todo = []
    for m in models:
        prev = done.get(m)
        if force or prev is None or (retry_failed and prev.get("status") in ("error", "timeout")):
            todo.append(m)
    jobs = [Job(**{**asdict(base), "model": m, "input_size": base.input_size}) for m in todo]
    stamp = {"recipe": recipe_name, "config": config, "versions": batch_versions()}

    finished: list[dict[str, Any]] = []
    bar = _progress_bar(len(jobs), len(models) - len(jobs), progress)
    failures = 0

    def record(res: dict[str, Any]) -> None:
        nonlocal failures
        res = {**_empty_result(res.get("model", "?")), **res, **stamp,
               "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        results_file.append(res)
        finished.append(res)
        failures += res["status"] in ("error", "timeout")
        if bar is not None:
            bar.set_postfix_str(f"{res['model']} {res['status']} | failures {failures}", refresh=False)
            bar.update(1)

    try:
        if dask_scheduler is not None:
            _run_dask(jobs, dask_scheduler, launcher, record)
        else:
            _run_local(jobs, workers, launcher, record, bar)
    finally:
        if bar is not None:
            bar.close()
    allres, _ = results_file.read()
    wanted = set(models)
    latest = latest_results(r for r in allres if r["model"] in wanted and r.get("config") == config)
    outcome = BatchResults(ran=finished, results=[latest[m] for m in models if m in latest], config=config)
    if summary is not None:
        text = summary_markdown(outcome.results, title=f"fxsurgeon batch: {Path(out).name}", recipe=recipe_name)
        _write_atomic(str(summary), text.encode())
    return outcome


def _progress_bar(total: int, already: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    desc = "fxsurgeon batch" + (f" ({already} done before)" if already else "")
    return tqdm(total=total, desc=desc, unit="model", dynamic_ncols=True, file=sys.stderr)


def _run_local(jobs: list[Job], workers: int, launcher: str, record: Callable, bar) -> None:
    pending = list(reversed(jobs))
    running: list[_Isolated] = []
    try:
        while pending or running:
            while pending and len(running) < workers:
                running.append(_Isolated(pending.pop(), launcher).start())
                if bar is not None:
                    bar.set_description_str(f"fxsurgeon batch [{', '.join(r.job.model for r in running)}]",
                                            refresh=True)
            still = []
            for iso in running:
                if iso.poll():
                    res = iso.result()
                    iso.cleanup()
                    record(res)
                else:
                    still.append(iso)
            running = still
            if running:
                time.sleep(0.05)
    finally:  # Ctrl-C or an error here: take every model process down with us
        for iso in running:
            iso.kill()
            iso.cleanup()


def _run_dask(jobs: list[Job], scheduler: Any, launcher: str, record: Callable) -> None:
    try:
        from distributed import Client, as_completed
    except ImportError as exc:
        raise SurgeryError(
            "dask_scheduler needs dask distributed: pip install 'fxsurgeon[distributed]'"
        ) from exc
    own = None
    if isinstance(scheduler, Client):
        client = scheduler
    else:
        try:
            client = own = Client(scheduler, timeout="30s")
        except Exception as exc:
            raise SurgeryError(f"cannot connect to the Dask scheduler {scheduler!r}: {type(exc).__name__}: {exc}") from exc
    try:
        futures = {client.submit(run_isolated, job, launcher, pure=False,
                                 key=f"fxsurgeon-{job.model}-{os.getpid()}-{i}"): job
                   for i, job in enumerate(jobs)}
        try:
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:  # the worker itself died or the task was lost
                    res = _empty_result(job.model) | {"status": "error", "phase": "dask",
                                                      "error": f"Dask task failed: {type(exc).__name__}: {exc}"}
                    res["cause"] = error_cause(res)
                record(res)
        finally:
            for fut in futures:
                if not fut.done():
                    fut.cancel()
    finally:
        if own is not None:
            own.close()


# --------------------------------------------------------------------------------------------- summary


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")
_NUMBER = re.compile(r"(?<![A-Za-z_])-?\d+(\.\d+)?(e-?\d+)?")


def error_cause(result: dict[str, Any]) -> str:
    """A short cause shared by similar failures: status, innermost error type and message without specifics.

    >>> error_cause({"status": "error", "error": "SurgeryError: torch.fx could not trace Net: in module "
    ...              "'blocks.0' (timm.X) at f.py:3 in forward: `x`: TraceError: symbolically traced "
    ...              "variables cannot be used as inputs to control flow. What you can do: ..."})
    'trace: TraceError: symbolically traced variables cannot be used as inputs to control flow'
    """
    status = result.get("status")
    err = str(result.get("error") or "")
    if status == "timeout":
        return f"timeout during {result.get('phase') or '?'}"
    if err.startswith("process killed by") or err.startswith("process exited"):
        return err.split(";")[0].split(" during ")[0]
    if "could not trace" in err:
        inner = err.split(": ", 1)[-1]
        inner = inner.split("What you can do")[0]
        m = re.search(r"`[^`]*`: ([A-Za-z_][\w.]*(Error|Exception)[^.]*)", inner)
        inner = m.group(1) if m else inner
        return "trace: " + _normalise(inner)
    if err.startswith("SurgeryError: unverifiable: this randomly initialised model is numerically chaotic"):
        return "unverifiable: the random-init model is numerically chaotic (amplifies float rounding)"
    if "changed" in err and "output" in err and "exact" in err:
        return "exact rewrites changed the output"
    if "out of memory" in err:
        return "out of memory"
    phase = result.get("phase")
    head = _normalise(err)
    return f"{phase}: {head}" if phase and phase not in ("convert",) else head


def _normalise(text: str, limit: int = 110) -> str:
    text = text.strip().splitlines()[0] if text.strip() else ""
    text = _QUOTED.sub("…", text)
    text = _NUMBER.sub("N", text)
    text = re.sub(r"0x[0-9a-f]+", "…", text)
    text = re.sub(r"\s+", " ", text).strip(" .:")
    return text[:limit]


def _fmt_int(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "–"


def _pct(after: float, before: float) -> str:
    return f"{after / before - 1:+.1%}" if before else "–"


def summary_markdown(results: Sequence[dict[str, Any]], title: str = "fxsurgeon batch", recipe: str | None = None,
                     worst: int = 10) -> str:
    """A Markdown summary: coverage line, status counts, totals, worst cases and errors grouped by cause."""
    by_status = Counter(r.get("status") for r in results)
    attempted = [r for r in results if r.get("status") != "skipped"]
    ok = [r for r in attempted if r.get("status") == "ok"]
    verified = [r for r in ok if r.get("verified")]
    within = [r for r in verified if (r.get("rel_error") is not None and r.get("tolerance") is not None
                                      and r["rel_error"] <= r["tolerance"])]  # "verified" means within tolerance
    lines = [f"# {title}", ""]
    meta = []
    if recipe:
        meta.append(f"recipe `{recipe}`")
    vers = next((r.get("versions") for r in results if r.get("versions")), None) or {}
    meta += [f"{k} {v}" for k, v in vers.items()]
    if meta:
        lines += [", ".join(meta), ""]
    share = f" ({len(within) / len(attempted):.1%})" if attempted else ""
    lines.append(f"**Coverage: {len(within)} of {len(attempted)} attempted models converted and verified{share}.**")
    lines.append("")
    lines += ["| status | models |", "|---|---:|"]
    lines += [f"| {s} | {by_status.get(s, 0)} |" for s in STATUSES]
    lines.append("")

    pb = sum(r.get("params_before") or 0 for r in ok)
    pa = sum(r.get("params_after") or 0 for r in ok)
    with_macs = [r for r in ok if r.get("macs_before") is not None and r.get("macs_after") is not None]
    mb = sum(r["macs_before"] for r in with_macs)
    ma = sum(r["macs_after"] for r in with_macs)
    secs = [r.get("seconds") or 0.0 for r in results]
    passes: dict[str, Counter] = defaultdict(Counter)
    for r in ok:
        for name, c in (r.get("passes") or {}).items():
            passes[name].update(c)
    lines += ["## Totals (converted models)", ""]
    lines.append(f"- parameters: {_fmt_int(pb)} → {_fmt_int(pa)} ({_pct(pa, pb)})")
    if with_macs:
        lines.append(f"- MACs (fvcore; one multiply-add = 1 MAC), {len(with_macs)} models counted: "
                     f"{_fmt_int(mb)} → {_fmt_int(ma)} ({_pct(ma, mb)})")
    else:
        lines.append("- MACs: not counted")
    for name, c in passes.items():
        lines.append(f"- `{name}`: {c['rewrites']:,} rewrites ({c['exact']:,} exact), {c['skipped']:,} skipped")
    if secs:
        srt = sorted(secs)
        lines.append(f"- time: {sum(secs) / 60:.1f} min in all, median {srt[len(srt) // 2]:.1f} s per model")
    lines.append("")

    lines += ["## Worst cases", ""]
    errs = sorted((r for r in verified if r.get("rel_error") is not None), key=lambda r: -r["rel_error"])[:worst]
    if errs:
        lines += ["Largest relative L2 output error:", "", "| model | rel. error | max abs error | tolerance | exact |",
                  "|---|---:|---:|---:|---|"]
        for r in errs:
            tol = f"{r['tolerance']:g}" if r.get("tolerance") is not None else "–"
            lines.append(f"| {r['model']} | {r['rel_error']:.3g} | {r.get('max_abs_error') or 0:.3g} | {tol} | "
                         f"{'yes' if r.get('exact_expected') else 'no'} |")
        lines.append("")
    grow = sorted(with_macs, key=lambda r: -(r["macs_after"] / r["macs_before"] if r["macs_before"] else 0))[:worst]
    if grow:
        lines += ["Highest MACs after / before:", "", "| model | MACs before | MACs after | change |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['macs_before']:,} | {r['macs_after']:,} | {_pct(r['macs_after'], r['macs_before'])} |"
                  for r in grow]
        lines.append("")
    slow = sorted(results, key=lambda r: -(r.get("seconds") or 0))[:min(worst, 5)]
    if slow:
        lines.append("Slowest: " + ", ".join(f"{r['model']} {r.get('seconds') or 0:.0f} s" for r in slow))
        lines.append("")

    failed = [r for r in attempted if r.get("status") in ("error", "timeout")]
    lines += ["## Errors by cause", ""]
    if not failed:
        lines += ["None.", ""]
    else:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in failed:
            groups[r.get("cause") or error_cause(r)].append(r)
        lines += ["| cause | models | which | example message |", "|---|---:|---|---|"]
        for cause, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            names = ", ".join(r["model"] for r in rs[:8]) + (f", … ({len(rs) - 8} more)" if len(rs) > 8 else "")
            example = _md_cell(str(rs[0].get("error") or ""), 300)
            lines.append(f"| {_md_cell(cause, 120)} | {len(rs)} | {names} | {example} |")
        lines.append("")
    skipped = [r for r in results if r.get("status") == "skipped"]
    if skipped:
        lines.append(f"Skipped: {len(skipped)} ({', '.join(sorted({str(r.get('cause') or r.get('error')) for r in skipped}))}).")
        lines.append("")
    return "\n".join(lines)


def _md_cell(text: str, limit: int) -> str:
    text = re.sub(r"\s+", " ", text).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"
