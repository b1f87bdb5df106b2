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

import datetime as _dt
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import SurgeryError
from ..runtime import batch_versions
from .isolation import IsolatedJob, run_isolated, write_atomic

# the entry points of the processes a batch starts, under the names older parents used
from .isolation import child_cli as _child_cli  # noqa: F401
from .isolation import fork_server_main as _fork_server_main  # noqa: F401
from .job import (
    RESULT_KEYS,
    Job,
    convert_one,
    empty_result,
    perturb_constant_params,
    rounding_sensitivity,
    silencing_params,
)
from .results import ResultsFile, check_writable, latest_results
from .summary import error_cause, summary_markdown

__all__ = ["RESULT_KEYS", "BatchResults", "Job", "ResultsFile", "check_writable", "convert_one", "error_cause", "expand_models", "latest_results", "perturb_constant_params", "rounding_sensitivity", "run_batch", "run_isolated", "silencing_params", "summary_markdown"]


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
        res = {**empty_result(res.get("model", "?")), **res, **stamp,
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
        write_atomic(str(summary), text.encode())
    return outcome


def _progress_bar(total: int, already: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    desc = "fxsurgeon batch" + (f" ({already} done before)" if already else "")
    return tqdm(total=total, desc=desc, unit="model", dynamic_ncols=True, file=sys.stderr)


def _run_local(jobs: list[Job], workers: int, launcher: str, record: Callable, bar) -> None:
    pending = list(reversed(jobs))
    running: list[IsolatedJob] = []
    try:
        while pending or running:
            while pending and len(running) < workers:
                running.append(IsolatedJob(pending.pop(), launcher).start())
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
                    res = empty_result(job.model) | {"status": "error", "phase": "dask",
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
