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

import dataclasses
import datetime as _dt
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
    job: Job | None = None,
    summary: str | os.PathLike | None = None,
    workers: int = 1,
    force: bool = False,
    retry_failed: bool = False,
    dask_scheduler: Any = None,
    launcher: str = "auto",
    progress: bool = True,
    **job_fields: Any,
) -> BatchResults:
    """Convert every model in its own process, appending one JSON line per model to ``out``.

    What each model's job does is a :class:`Job`: pass a template (``job=Job("", recipe=..., timeout=600)``;
    its ``model`` is ignored) or its fields as keywords (``recipe=...``, ``timeout=...``, ``max_params=...``,
    ``input_size=...``, ``image_size=...``, ``batch_size=...``, ``seed=...``, ``threads=...``,
    ``max_memory=...``, ``count_macs=...``, ``perturb_init=...``, ``recipe_name=...``), not both.

    Args:
        models: model specs (see :func:`expand_models`).
        out: the JSON-lines results file, appended to (created when missing).
        job: the settings every model's job gets (see :class:`Job`); ``threads=None`` there means the CPU
            count divided by ``workers``.
        summary: also write a Markdown summary of every model of ``models`` recorded in ``out`` here.
        workers: models converted at the same time (local scheduler; a Dask cluster sets its own).
        force: convert again models already recorded; the newer line wins in summaries.
        retry_failed: convert again models recorded as ``error`` or ``timeout``.
        dask_scheduler: run the jobs on a Dask cluster: a scheduler address (``"tcp://host:8786"``), a
            ``distributed.Client`` or a ``LocalCluster``. Needs the ``distributed`` extra.
        launcher: ``"auto"`` (the fork server where the OS has ``fork``), ``"fork"`` or ``"subprocess"``.
        progress: show a tqdm progress bar on stderr.
        **job_fields: instead of ``job``, its fields.

    Returns:
        A :class:`BatchResults`: this run's results (``ran``) and the latest of every requested model
        (``results``), including models recorded by earlier runs with the same settings.

    Raises:
        SurgeryError: ``out`` or ``summary`` cannot be written or the disk is nearly full (checked before
            any model runs), or bad arguments (an unknown job field names the known ones).
    """
    base = _job_template(job, job_fields)
    timeout, recipe_name = base.timeout, base.recipe_name
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
    if base.threads is None:
        base = replace(base, threads=max(1, (os.cpu_count() or 1) // workers))
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
    jobs = [replace(base, model=m) for m in todo]
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


def _job_template(job: Job | None, fields: dict[str, Any]) -> Job:
    """The job every model gets: ``job`` (its model ignored), or one built from keyword fields."""
    known = [f.name for f in dataclasses.fields(Job) if f.name != "model"]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise SurgeryError(f"run_batch() got unknown argument(s) {unknown}; a job's fields are {', '.join(known)}")
    if job is not None:
        if fields:
            raise SurgeryError(f"run_batch(): give job=Job(...) or its fields ({', '.join(sorted(fields))}), not both")
        if not isinstance(job, Job):
            raise SurgeryError(f"run_batch(job=...) takes a fxsurgeon.batch.Job, got {type(job).__name__}")
        return replace(job, model="")
    fields = dict(fields)
    fields["recipe"] = dict(fields.get("recipe") or {})
    if fields.get("input_size"):
        fields["input_size"] = tuple(fields["input_size"])
    return Job(model="", **fields)


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
